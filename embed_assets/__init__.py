"""embed_assets: domain adaptation of embedding models as Dagster software-defined assets.

The package keeps Dagster wiring (``embed_assets.defs`` and ``embed_assets.definitions``) apart from plain,
Dagster-free library modules, one per stage:

- ``corpus``    : reading a folder of documents (with rejected files and reasons)
- ``chunking``  : sentence-based chunking with content-hash chunk ids
- ``sdg``       : synthetic QA generation (offline inverse-cloze default, OpenAI-compatible LLM path)
- ``prep``      : split by document, BEIR eval folder
- ``mining``    : hard-negative mining
- ``training``  : fine-tuning with sentence-transformers
- ``metrics``   : retrieval and BEIR/pytrec_eval-equivalent metrics
- ``export``    : ONNX / TensorRT export with parity checks
- ``serving``   : the NIM-compatible ``/v1/embeddings`` server
"""

__version__ = "0.1.0"
