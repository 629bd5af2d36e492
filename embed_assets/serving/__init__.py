"""The NIM-compatible embedding service: embedders, the FastAPI app, a CLI and process management.

Import the submodules directly (``embed_assets.serving.app``, ``.embedder``, ``.process``, ``.deploy``);
this package imports nothing heavy so ``python -m embed_assets.serving`` starts fast and never loads torch
unless ``--backend torch`` is asked for.
"""

from __future__ import annotations
