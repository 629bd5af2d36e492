"""``python -m embed_assets.serving --onnx-dir DIR ...`` (see :mod:`embed_assets.serving.cli`)."""

from __future__ import annotations

from embed_assets.serving.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
