"""Dagster wiring: configs, resources, assets, checks, jobs and sensors (thin layers over the library)."""
