"""Reliability tests: bad input, faults, process kills and load, asserting that nothing is lost."""
