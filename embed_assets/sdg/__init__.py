"""Synthetic QA generation: the generator interface and its implementations.

- :mod:`embed_assets.sdg.offline`: the embedded default, needs no network and no key (inverse cloze).
- :mod:`embed_assets.sdg.llm`: any OpenAI-compatible chat endpoint (NVIDIA's hosted API, vLLM, Ollama, ...).
"""

from embed_assets.sdg.base import QAGenerator, SDGResult, SDGStats

__all__ = ["QAGenerator", "SDGResult", "SDGStats"]
