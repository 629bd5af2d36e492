"""ONNX export (fp32 + dynamic int8) with parity checks, and the TensorRT engine builder (Dagster-free).

The exported graph maps ``input_ids``/``attention_mask``(/``token_type_ids``) to the final sentence embedding:
the sentence-transformers pipeline (transformer, pooling as configured, Dense/Normalize when present) is traced
as one module, so serving needs no torch and no pooling code. The default exporter is torch's TorchScript-based
one (``dynamo=False``): no extra dependency, ~2 s for MiniLM, cosine 1.000000 to torch. ``exporter="dynamo"``
(``torch.export``, opset >= 18, needs ``onnxscript``) gives the same parity and is the way forward should a
future torch drop the TorchScript exporter.

Folder layout written by :func:`export_onnx`::

    model.onnx            fp32 graph, dynamic batch and sequence axes
    model_int8.onnx       dynamic int8 quantization (weights int8 per channel, activations uint8 at run time)
    tokenizer.json ...    the model's tokenizer files
    config.json           the transformer config (for reference)
    embed_assets_onnx.json  metadata read by the server (see ``embed_assets.serving.embedder``)
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embed_assets.serving.embedder import METADATA_FILE, VARIANT_FILES, OnnxEmbedder

#: Minimum cosine between the fp32 ONNX and the torch embeddings; below it the export fails.
FP32_MIN_COSINE = 0.999

#: Varied texts for the parity check: short/long, code, numbers, unicode, casing, punctuation.
DEFAULT_PARITY_TEXTS: list[str] = [
    "What is the capital of France?",
    "hello",
    "a",
    "How do I reset my password if I no longer have access to my e-mail account?",
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "Error 0x80070005: access denied when writing C:\\Program Files\\App\\config.ini",
    "Die Katze sitzt auf der Matte und schläft in der Sonne.",
    "Le chiffre d'affaires a augmenté de 12,5 % au troisième trimestre 2024.",
    "東京は日本の首都です。",
    "Ünïcödé ✓ emoji 🚀 and math ∑ x² ≤ ∞",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "1234567890 3.14159 2.71828 6.022e23",
    "Kubernetes schedules pods onto nodes; a Deployment manages ReplicaSets that keep N replicas running.",
    "Retrieval-augmented generation combines a retriever over a document index with a generator LLM. " * 4,
    "Patients receiving 5 mg/kg twice daily showed a 23% reduction in symptoms (p < 0.01) versus placebo.",
    "Q: Which port does the service listen on? A: 8000, behind the ingress.",
    "   leading and trailing whitespace   ",
    "Section 4.2 of the agreement limits liability to the fees paid in the twelve months preceding the claim. "
    "Neither party excludes liability for fraud, gross negligence or wilful misconduct. " * 6,
]


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model's embeddings."""


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`.

    Cosines compare each ONNX variant, served through :class:`OnnxEmbedder` (tokenizer included), with
    ``SentenceTransformer.encode`` on the same texts and the same ``max_seq_length``.
    """

    out_dir: str
    model_name: str
    metadata_path: str
    fp32_path: str
    fp32_bytes: int
    fp32_cosine_min: float
    fp32_cosine_mean: float
    fp32_texts_per_second: float
    int8_path: str | None = None
    int8_bytes: int | None = None
    int8_cosine_min: float | None = None
    int8_cosine_mean: float | None = None
    int8_texts_per_second: float | None = None
    int8_preset: str | None = None
    torch_texts_per_second: float = 0.0
    export_seconds: float = 0.0
    quantize_seconds: float = 0.0
    opset: int = 17
    exporter: str = "torchscript"
    dimension: int = 0
    max_seq_length: int = 0
    pooling: str = ""
    normalize: bool = True
    num_parity_texts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """Flat dictionary of JSON-able values (for Dagster metadata / MLflow params).

        Returns:
            Every field; ``extra`` entries are flattened with an ``extra_`` prefix.
        """
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update({f"extra_{k}": v for k, v in self.extra.items()})
        # None (int8 fields without int8) is dropped: not every metadata sink accepts null.
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items() if v is not None}


def export_onnx(
    model_dir: str,
    out_dir: str,
    *,
    opset: int = 17,
    quantize_int8: bool = True,
    parity_texts: list[str] | None = None,
    max_seq_length: int | None = None,
    model_name: str | None = None,
    int8_preset: str = "balanced",
    exporter: str = "torchscript",
) -> ExportReport:
    """Export a sentence-transformers folder to ONNX (fp32 and optionally int8) and check parity.

    Args:
        model_dir: A sentence-transformers model folder (e.g. the ``checkpoint`` asset).
        out_dir: Destination folder (created; existing files are overwritten).
        opset: ONNX opset (>= 17).
        quantize_int8: Also write ``model_int8.onnx`` (dynamic int8 quantization).
        parity_texts: Texts for the parity check (default :data:`DEFAULT_PARITY_TEXTS`).
        max_seq_length: Override the model's maximum sequence length (recorded in the metadata and used by
            the server's tokenizer; the graph itself accepts any length up to the position embeddings).
        model_name: Name to serve the model under (default: derived from the folder name).
        int8_preset: Which nodes to quantize, see :data:`INT8_PRESETS`.
        exporter: ``"torchscript"`` (default, no extra dependency) or ``"dynamo"`` (needs ``onnxscript``).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ParityError: The fp32 graph's minimum cosine to torch is below :data:`FP32_MIN_COSINE`.
        ValueError: ``opset < 17`` or an unknown ``int8_preset``.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    if int8_preset not in INT8_PRESETS:
        raise ValueError(f"int8_preset must be one of {sorted(INT8_PRESETS)}, got {int8_preset!r}")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    texts = list(parity_texts or DEFAULT_PARITY_TEXTS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _load_model(model_dir, max_seq_length)
    info = describe_model(model, model_dir, model_name)

    start = time.perf_counter()
    input_names = export_graph(model, out / VARIANT_FILES["fp32"], opset=opset, exporter=exporter)
    export_seconds = time.perf_counter() - start
    opset = _graph_opset(out / VARIANT_FILES["fp32"])
    _save_tokenizer(model, model_dir, out)
    meta = {
        **info,
        "opset": opset,
        "exporter": exporter,
        "inputs": input_names,
        "output": "sentence_embedding",
    }
    meta["variants"] = {}
    meta["variants"]["fp32"] = {"file": VARIANT_FILES["fp32"]}
    _write_metadata(out, meta)

    reference, torch_tps = _reference_embeddings(model, texts, info)
    fp32 = _measure_variant(out, "fp32", texts, info, reference)
    meta["variants"]["fp32"].update(fp32)
    _write_metadata(out, meta)
    if fp32["cosine_min"] < FP32_MIN_COSINE:
        raise ParityError(
            f"fp32 ONNX parity failed: min cosine {fp32['cosine_min']:.6f} < {FP32_MIN_COSINE} vs the torch "
            f"model on {len(texts)} texts (mean {fp32['cosine_mean']:.6f}); the exported graph in {out} "
            "does not reproduce the model (unsupported pooling/module or a tracing problem)."
        )
    report = ExportReport(
        out_dir=str(out),
        model_name=info["model_name"],
        metadata_path=str(out / METADATA_FILE),
        fp32_path=str(out / VARIANT_FILES["fp32"]),
        fp32_bytes=fp32["bytes"],
        fp32_cosine_min=fp32["cosine_min"],
        fp32_cosine_mean=fp32["cosine_mean"],
        fp32_texts_per_second=fp32["texts_per_second"],
        torch_texts_per_second=torch_tps,
        export_seconds=export_seconds,
        opset=opset,
        exporter=exporter,
        dimension=info["dimension"],
        max_seq_length=info["max_seq_length"],
        pooling=info["pooling"],
        normalize=info["normalize"],
        num_parity_texts=len(texts),
    )
    if quantize_int8:
        start = time.perf_counter()
        qinfo = quantize_onnx_int8(
            out / VARIANT_FILES["fp32"], out / VARIANT_FILES["int8"], preset=int8_preset
        )
        report.quantize_seconds = time.perf_counter() - start
        int8 = _measure_variant(out, "int8", texts, info, reference)
        meta["variants"]["int8"] = {"file": VARIANT_FILES["int8"], **int8, "quantization": qinfo}
        _write_metadata(out, meta)
        report.int8_path = str(out / VARIANT_FILES["int8"])
        report.int8_bytes = int8["bytes"]
        report.int8_cosine_min = int8["cosine_min"]
        report.int8_cosine_mean = int8["cosine_mean"]
        report.int8_texts_per_second = int8["texts_per_second"]
        report.int8_preset = int8_preset
        report.extra["int8_quantized_nodes"] = qinfo["num_quantized_nodes"]
    return report


def _load_model(model_dir: str, max_seq_length: int | None) -> Any:
    from embed_assets.models import load_sentence_transformer

    model = load_sentence_transformer(model_dir, device="cpu", max_seq_length=max_seq_length)
    return model.eval()


def describe_model(model: Any, model_dir: str, model_name: str | None = None) -> dict[str, Any]:
    """What the server must know about a sentence-transformers model.

    Args:
        model: A loaded ``SentenceTransformer``.
        model_dir: Its folder (for the default name).
        model_name: Explicit name, else derived from the folder.

    Returns:
        ``model_name``, ``dimension``, ``max_seq_length``, ``pooling``, ``normalize``, ``query_prefix``,
        ``passage_prefix``, ``prompts``, ``pad_token_id``, ``modules`` and library versions.
    """
    import onnx
    import onnxruntime
    import sentence_transformers
    import torch

    prompts = dict(getattr(model, "prompts", None) or {})
    pooling = next((m for m in model if type(m).__name__ == "Pooling"), None)
    return {
        "format_version": 1,
        "model_name": model_name or _default_model_name(model_dir),
        "source_model_dir": str(model_dir),
        "dimension": int(model.get_embedding_dimension()),
        "max_seq_length": int(model.max_seq_length),
        "pooling": _pooling_mode(pooling),
        "normalize": any(type(m).__name__ == "Normalize" for m in model),
        "query_prefix": prompts.get("query", "") or "",
        "passage_prefix": next((prompts[k] for k in ("passage", "document") if k in prompts), "") or "",
        "prompts": prompts,
        "pad_token_id": int(model.tokenizer.pad_token_id or 0),
        "tokenizer_file": "tokenizer.json",
        "modules": [type(m).__name__ for m in model],
        "versions": {
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _pooling_mode(pooling: Any) -> str:
    if pooling is None:
        return "none"
    mode = getattr(pooling, "pooling_mode", None)
    if isinstance(mode, str):
        return mode
    # sentence-transformers < 6 keeps one boolean per mode.
    flags = [k for k, v in vars(pooling).items() if k.startswith("pooling_mode_") and v is True]
    return "+".join(f.removeprefix("pooling_mode_") for f in flags) or "unknown"


def _default_model_name(model_dir: str) -> str:
    path = Path(model_dir).resolve()
    generic = {"model", "checkpoint", "final", "best", "output"}
    if path.name.lower() in generic and path.parent.name:
        return path.parent.name
    return path.name


class _SentenceEmbeddingGraph:
    """Builds the traced module lazily so importing this file does not import torch."""

    @staticmethod
    def wrap(model: Any, input_names: list[str]) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(
                self,
                input_ids: torch.Tensor,
                attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
            ) -> torch.Tensor:
                tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
                tensors["token_type_ids"] = token_type_ids
                features = {k: tensors[k] for k in input_names}
                return self.model(features)["sentence_embedding"]

        return Wrapper().eval()


def export_graph(
    model: Any, path: str | os.PathLike[str], *, opset: int = 17, exporter: str = "torchscript"
) -> list[str]:
    """Trace a ``SentenceTransformer`` into one ONNX graph ending in the sentence embedding.

    Args:
        model: The model (on CPU, eval mode).
        path: Output ``.onnx`` file.
        opset: ONNX opset version.
        exporter: ``"torchscript"`` (torch's classic tracer, no extra dependency) or ``"dynamo"``
            (``torch.export``-based; needs the ``onnxscript`` package; opset >= 18).

    Returns:
        The graph's input names.
    """
    import torch

    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    # Two texts of different length: the trace must see padding, or the attention-mask path could be
    # specialised away (transformers skips the mask when it is all ones).
    sample = model.tokenizer(
        ["short", "a noticeably longer sentence so that the batch contains padding"],
        padding=True,
        return_tensors="pt",
    )
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    wrapper = _SentenceEmbeddingGraph.wrap(model, input_names)
    args = tuple(sample[n] for n in input_names)
    common = {"input_names": input_names, "output_names": ["sentence_embedding"], "opset_version": opset}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches are expected
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "sequence"} for n in input_names} | {
                "sentence_embedding": {0: "batch"}
            }
            torch.onnx.export(
                wrapper, args, str(path), dynamic_axes=axes, do_constant_folding=True, dynamo=False, **common
            )
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=_max_positions(model))
            large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamic_shapes={n: {0: batch, 1: seq} for n in input_names},
                dynamo=True,
                external_data=large,
                **common | {"opset_version": max(opset, 18)},
            )
    return input_names


def _max_positions(model: Any) -> int:
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 8192)


def _graph_opset(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _save_tokenizer(model: Any, model_dir: str, out: Path) -> None:
    model.tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():  # pragma: no cover - slow tokenizers only
        raise RuntimeError(
            "the model's tokenizer has no fast (tokenizers) version; serving needs tokenizer.json"
        )
    config = Path(model_dir) / "config.json"
    if config.is_file():
        shutil.copyfile(config, out / "config.json")


def _write_metadata(out: Path, meta: dict[str, Any]) -> None:
    from embed_assets.storage import write_json

    write_json(out / METADATA_FILE, meta)


def _reference_embeddings(
    model: Any, texts: list[str], info: dict[str, Any]
) -> tuple[dict[str, np.ndarray], float]:
    """Torch embeddings per input type (only "query" when both prefixes are equal) and torch texts/s."""
    kinds = {"query": info["query_prefix"], "passage": info["passage_prefix"]}
    if kinds["query"] == kinds["passage"]:
        kinds = {"query": kinds["query"]}
    refs = {}
    start = time.perf_counter()
    for kind, prefix in kinds.items():
        refs[kind] = model.encode(texts, prompt=prefix or None, batch_size=32, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    return refs, len(texts) * len(kinds) / max(seconds, 1e-9)


def _measure_variant(
    out: Path, variant: str, texts: list[str], info: dict[str, Any], reference: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Cosine vs torch (through the serving embedder, tokenizer included), size and throughput.

    Throughput is timed on the parity encode itself (after a warm-up call) so the export pays for no extra
    passes.
    """
    embedder = OnnxEmbedder(str(out), variant=variant, providers=["CPUExecutionProvider"])
    embedder.encode(texts[:2], truncate="END")
    start = time.perf_counter()
    cosines = [
        _row_cosines(embedder.encode(texts, input_type=kind, truncate="END"), ref)
        for kind, ref in reference.items()
    ]
    seconds = time.perf_counter() - start
    cos = np.concatenate(cosines)
    return {
        "bytes": onnx_bytes(out / VARIANT_FILES[variant]),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "texts_per_second": len(cos) / max(seconds, 1e-9),
    }


def onnx_bytes(path: str | os.PathLike[str]) -> int:
    """Size of an ONNX model including its external-data files (``model.onnx.data`` etc.).

    Args:
        path: The ``.onnx`` file.

    Returns:
        Bytes on disk.
    """
    path = Path(path)
    extra = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".") and p.is_file()]
    return path.stat().st_size + sum(p.stat().st_size for p in extra)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


# --- int8 ------------------------------------------------------------------------------------------------

#: Quantization presets, measured on all-MiniLM-L6-v2 (22 texts, cosine vs torch fp32, min / mean):
#: ``naive`` (onnxruntime defaults: every op, per-tensor) 0.897 / 0.954; ``per_channel`` (weight MatMuls and
#: embedding Gathers, per-channel) 0.975 / 0.989; ``balanced`` (as per_channel but the FFN down-projections,
#: whose inputs carry GELU outliers, stay fp32) 0.988 / 0.994; ``accurate`` (attention projections and
#: embeddings only) 0.995 / 0.998.
INT8_PRESETS: dict[str, str] = {
    "naive": "onnxruntime quantize_dynamic defaults (all supported ops, per-tensor)",
    "per_channel": "weight MatMuls + embedding Gathers, per-channel int8 weights",
    "balanced": "per_channel, FFN output projections kept fp32",
    "accurate": "per_channel, all FFN MatMuls kept fp32 (attention projections + embeddings only)",
}


_ACTIVATIONS = frozenset({"Erf", "Tanh", "Sigmoid", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu"})
_ELEMENTWISE = frozenset({"Add", "Mul", "Div", "Sub", "Pow", "Cast", "Identity"})


def _int8_node_selection(onnx_path: Path, preset: str) -> list[str] | None:
    """Names of the nodes to quantize for ``preset`` (``None`` = onnxruntime's default selection).

    FFN MatMuls are found by structure, not by name (exporters name nodes differently): the FFN input
    projection feeds an activation (GELU's Erf/Tanh, SiLU's Sigmoid) through element-wise ops only, the FFN
    output projection reads from one.
    """
    import onnx

    if preset == "naive":
        return None
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_activation(start: list[Any], step: Any, depth: int = 6) -> bool:
        frontier = start
        for _ in range(depth):
            if any(n.op_type in _ACTIVATIONS for n in frontier):
                return True
            frontier = [m for n in frontier if n.op_type in _ELEMENTWISE for m in step(n)]
            if not frontier:
                return False
        return False

    def upstream(node: Any) -> list[Any]:
        return [producer[i] for i in node.input if i in producer]

    def downstream(node: Any) -> list[Any]:
        return [m for o in node.output for m in consumers.get(o, [])]

    selected = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gather") or not any(i in weights for i in node.input):
            continue  # activation x activation MatMuls (attention scores) stay fp32
        if node.op_type == "MatMul":
            ffn_out = reaches_activation(upstream(node), upstream)
            ffn_in = reaches_activation(downstream(node), downstream)
            if (preset == "balanced" and ffn_out) or (preset == "accurate" and (ffn_in or ffn_out)):
                continue
        selected.append(node.name)
    return selected


def quantize_onnx_int8(
    onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, preset: str = "balanced"
) -> dict[str, Any]:
    """Dynamic int8 quantization with onnxruntime.

    Args:
        onnx_path: fp32 graph.
        out_path: Quantized graph.
        preset: One of :data:`INT8_PRESETS`.

    Returns:
        JSON-able description (preset, per_channel, number of quantized nodes).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = _int8_node_selection(Path(onnx_path), preset)
    large = Path(onnx_path).stat().st_size > 1_800_000_000
    kwargs: dict[str, Any] = {"weight_type": QuantType.QInt8, "use_external_data_format": large}
    if nodes is not None:
        kwargs |= {
            "per_channel": True,
            "op_types_to_quantize": ["MatMul", "Gather"],
            "nodes_to_quantize": nodes,
        }
    quiet = _DropMessage("pre-processing before quantization")  # onnxruntime's generic advice, not actionable
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(str(onnx_path), str(out_path), **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)
    return {
        "preset": preset,
        "description": INT8_PRESETS[preset],
        "per_channel": nodes is not None,
        "weight_type": "int8",
        "num_quantized_nodes": len(nodes) if nodes is not None else -1,
    }


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# --- TensorRT --------------------------------------------------------------------------------------------


def tensorrt_status() -> tuple[bool, str]:
    """Whether a TensorRT engine can be built here.

    Returns:
        ``(available, reason)``; the reason names what is missing, or the TensorRT version and GPU.
    """
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False, "CUDA not available (torch is not installed)"
    if not cuda:
        return False, "CUDA not available (torch.cuda.is_available() is False)"
    try:
        import tensorrt
    except ImportError:
        return False, "tensorrt Python package not installed (pip install tensorrt)"
    return True, f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name(0)}"


def tensorrt_profiles(
    batch: tuple[int, int, int] = (1, 16, 64),
    seq: tuple[int, int, int] = (3, 128, 512),
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids"),
) -> dict[str, dict[str, tuple[int, int]]]:
    """Optimization-profile shapes (min/opt/max) for every graph input.

    Args:
        batch: min, opt, max batch size.
        seq: min, opt, max sequence length.
        input_names: The graph's inputs (all shaped ``[batch, sequence]``).

    Returns:
        ``{input_name: {"min": (b, s), "opt": (b, s), "max": (b, s)}}``.

    Raises:
        ValueError: A triple is not positive and non-decreasing.
    """
    for label, triple in (("batch", batch), ("seq", seq)):
        if len(triple) != 3 or not 0 < triple[0] <= triple[1] <= triple[2]:
            raise ValueError(f"{label} must be (min, opt, max) with 0 < min <= opt <= max, got {triple}")
    shapes = {k: (batch[i], seq[i]) for i, k in enumerate(("min", "opt", "max"))}
    return {name: dict(shapes) for name in input_names}


def build_tensorrt_engine(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    profiles: dict[str, dict[str, tuple[int, int]]] | None = None,
    workspace_gb: float = 4.0,
) -> dict[str, Any]:
    """Build and serialize a TensorRT engine (plan) from the ONNX graph. Needs CUDA and ``tensorrt``.

    Args:
        onnx_path: fp32 ONNX graph (``model.onnx``).
        out_path: Output ``.plan`` file.
        fp16: Allow fp16 kernels.
        profiles: Shapes per input (default :func:`tensorrt_profiles` for the graph's inputs).
        workspace_gb: Builder workspace memory limit.

    Returns:
        ``{"path", "bytes", "build_seconds", "fp16", "tensorrt_version", "profiles"}``.

    Raises:
        RuntimeError: TensorRT is unavailable, the ONNX parser fails, or the build fails.
    """
    available, reason = tensorrt_status()
    if not available:
        raise RuntimeError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode (and default) from TRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    names = tuple(network.get_input(i).name for i in range(network.num_inputs))
    profiles = profiles or tensorrt_profiles(input_names=names)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name in names:
        if name not in profiles:
            raise RuntimeError(f"no optimization profile for input {name!r} (profiles: {sorted(profiles)})")
        shapes = profiles[name]
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path} (see the TensorRT log above)")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_bytes(bytes(plan))
    return {
        "path": str(out_path),
        "bytes": Path(out_path).stat().st_size,
        "build_seconds": time.perf_counter() - start,
        "fp16": fp16,
        "tensorrt_version": trt.__version__,
        "profiles": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in profiles.items()},
    }
