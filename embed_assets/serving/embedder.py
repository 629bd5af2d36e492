"""Sentence embedders for serving: ONNX Runtime (the default) and a torch peer with the same interface.

The ONNX graph written by :func:`embed_assets.export.export_onnx` already contains pooling and normalization, so
serving only needs ``tokenizers`` + ``onnxruntime``; this module never imports torch unless
:class:`TorchEmbedder` is used.

Truncation follows NIM's ``truncate`` parameter:

- ``"NONE"``: an input longer than ``max_seq_length`` tokens raises :class:`InputTooLongError`;
- ``"END"``: keep the start of the text (drop tokens at the end);
- ``"START"``: keep the end of the text (drop tokens at the start; the query/passage prefix is kept).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Name of the metadata file written next to the ONNX files.
METADATA_FILE = "embed_assets_onnx.json"
#: Variant name -> ONNX file name.
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
TRUNCATE_MODES = ("NONE", "START", "END")
INPUT_TYPES = ("query", "passage")


class InputTooLongError(ValueError):
    """An input exceeds the model's maximum sequence length and truncation is disabled (``truncate="NONE"``).

    Attributes:
        index: Position of the offending input in the request.
        num_tokens: Its length in tokens (prefix and special tokens included).
        max_tokens: The model's maximum sequence length.
    """

    def __init__(self, index: int, num_tokens: int, max_tokens: int) -> None:
        self.index = index
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"input[{index}] has {num_tokens} tokens, more than the model's maximum of {max_tokens} tokens "
            "and truncate is NONE; shorten the input or send truncate='END' (keep the start) or "
            "truncate='START' (keep the end)."
        )


def load_metadata(onnx_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``embed_assets_onnx.json`` from an exported folder.

    Args:
        onnx_dir: Folder written by :func:`embed_assets.export.export_onnx`.

    Returns:
        The metadata dictionary.

    Raises:
        FileNotFoundError: The folder has no metadata file.
    """
    path = Path(onnx_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {onnx_dir} is not a folder written by export_onnx")
    return json.loads(path.read_text(encoding="utf-8"))


class TextTokenizer:
    """Prefixing, tokenization and NIM-style truncation on top of a ``tokenizers.Tokenizer``.

    Args:
        tokenizer: A ``tokenizers.Tokenizer`` (its own truncation/padding settings are switched off).
        max_seq_length: Maximum number of tokens fed to the model, special tokens included.
        query_prefix: Text prepended to ``input_type="query"`` inputs.
        passage_prefix: Text prepended to ``input_type="passage"`` inputs.
    """

    def __init__(self, tokenizer: Any, max_seq_length: int, query_prefix: str = "", passage_prefix: str = ""):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.prefixes = {"query": query_prefix or "", "passage": passage_prefix or ""}
        # Budget for content tokens once [CLS]/[SEP] (or the model's equivalents) are added back.
        self._budget = self.max_seq_length - tokenizer.num_special_tokens_to_add(False)
        if self._budget <= 0:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for content tokens")
        self._prefix_encodings = {
            k: tokenizer.encode(v, add_special_tokens=False) for k, v in self.prefixes.items() if v
        }

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike[str], **kwargs: Any) -> TextTokenizer:
        """Build from a ``tokenizer.json`` file.

        Args:
            tokenizer_json: Path of the file.
            **kwargs: Passed to the constructor.

        Returns:
            A :class:`TextTokenizer`.
        """
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(tokenizer_json)), **kwargs)

    def tokenize(self, texts: Sequence[str], input_type: str = "query", truncate: str = "END") -> list[Any]:
        """Prefix, tokenize and truncate ``texts``.

        Args:
            texts: Input strings.
            input_type: ``"query"`` or ``"passage"`` (selects the prefix).
            truncate: ``"NONE"``, ``"START"`` or ``"END"``.

        Returns:
            One ``tokenizers.Encoding`` per text, special tokens included, at most ``max_seq_length`` long.

        Raises:
            InputTooLongError: With ``truncate="NONE"``, for the first input that is too long.
            ValueError: Unknown ``input_type`` or ``truncate``.
        """
        _check_mode(input_type, truncate)
        prefix = self.prefixes[input_type]
        raw = self._tok.encode_batch([prefix + t for t in texts], add_special_tokens=False)
        out = []
        for i, enc in enumerate(raw):
            if len(enc.ids) > self._budget:
                enc = self._truncate(i, enc, texts[i], input_type, truncate)
            out.append(self._tok.post_process(enc))
        return out

    def count_tokens(
        self, texts: Sequence[str], input_type: str = "query", truncate: str = "END"
    ) -> list[int]:
        """Number of tokens each text occupies in the model input.

        Args:
            texts: Input strings.
            input_type: ``"query"`` or ``"passage"``.
            truncate: ``"END"``/``"START"`` count after truncation; ``"NONE"`` counts the full, untruncated
                length (and does not raise).

        Returns:
            Token counts, prefix and special tokens included.
        """
        _check_mode(input_type, truncate)
        prefix = self.prefixes[input_type]
        special = self._tok.num_special_tokens_to_add(False)
        raw = self._tok.encode_batch([prefix + t for t in texts], add_special_tokens=False)
        counts = [len(e.ids) + special for e in raw]
        if truncate == "NONE":
            return counts
        return [min(c, self.max_seq_length) for c in counts]

    def _truncate(self, index: int, enc: Any, text: str, input_type: str, truncate: str) -> Any:
        if truncate == "NONE":
            special = self._tok.num_special_tokens_to_add(False)
            raise InputTooLongError(index, len(enc.ids) + special, self.max_seq_length)
        if truncate == "END":
            enc.truncate(self._budget, direction="right")
            return enc
        prefix_enc = self._prefix_encodings.get(input_type)
        if prefix_enc is None:
            enc.truncate(self._budget, direction="left")
            return enc
        # Keep the prefix: cutting "query: " off the front would change what the model was trained on.
        from tokenizers import Encoding

        body = self._tok.encode(text, add_special_tokens=False)
        body.truncate(max(self._budget - len(prefix_enc.ids), 0), direction="left")
        return Encoding.merge([prefix_enc, body], growing_offsets=True)


def _check_mode(input_type: str, truncate: str) -> None:
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")


class BaseEmbedder:
    """Common interface of the serving embedders (tokenize, pad, run a backend, return float32 vectors).

    Subclasses set the attributes below and implement :meth:`_forward`.

    Attributes:
        model_name: Name the model is served under.
        dimension: Embedding size.
        max_seq_length: Maximum tokens per input (special tokens included).
        normalize: Whether the returned vectors are L2-normalized.
        backend: ``"onnx"`` or ``"torch"``.
        variant: ``"fp32"``/``"int8"`` for ONNX, the device for torch.
    """

    model_name: str
    dimension: int
    max_seq_length: int
    normalize: bool
    backend: str
    variant: str
    input_names: tuple[str, ...]
    pad_token_id: int
    text_tokenizer: TextTokenizer

    def tokenize(self, texts: Sequence[str], input_type: str = "query", truncate: str = "END") -> list[Any]:
        """See :meth:`TextTokenizer.tokenize`."""
        return self.text_tokenizer.tokenize(texts, input_type, truncate)

    def count_tokens(
        self, texts: Sequence[str], input_type: str = "query", truncate: str = "END"
    ) -> list[int]:
        """See :meth:`TextTokenizer.count_tokens`."""
        return self.text_tokenizer.count_tokens(texts, input_type, truncate)

    def embed_tokens(self, encodings: Sequence[Any]) -> np.ndarray:
        """Run one forward pass over already tokenized inputs (padded to the longest).

        Args:
            encodings: ``tokenizers.Encoding`` objects from :meth:`tokenize`.

        Returns:
            ``float32`` array of shape ``(len(encodings), dimension)``.
        """
        if not encodings:
            return np.zeros((0, self.dimension), dtype=np.float32)
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        out = self._forward({k: v for k, v in feeds.items() if k in self.input_names})
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode(
        self, texts: Sequence[str], input_type: str = "query", truncate: str = "END", batch_size: int = 32
    ) -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: Input strings.
            input_type: ``"query"`` or ``"passage"`` (selects the model's prefix).
            truncate: ``"NONE"`` (raise :class:`InputTooLongError`), ``"START"`` or ``"END"``.
            batch_size: Inputs per forward pass; inputs are sorted by length first to limit padding.

        Returns:
            ``float32`` array ``(len(texts), dimension)``, L2-normalized when the model normalizes.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        encodings = self.tokenize(list(texts), input_type, truncate)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out = np.zeros((len(encodings), self.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.embed_tokens([encodings[i] for i in idx])
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able description (served by ``/v1/models``).

        Returns:
            Name, dimension, max_seq_length, normalize, backend, variant and prefixes.
        """
        return {
            "model_name": self.model_name,
            "dimension": self.dimension,
            "max_seq_length": self.max_seq_length,
            "normalize": self.normalize,
            "backend": self.backend,
            "variant": self.variant,
            "query_prefix": self.text_tokenizer.prefixes["query"],
            "passage_prefix": self.text_tokenizer.prefixes["passage"],
        }

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def default_providers() -> list[str]:
    """ONNX Runtime providers to use: CUDA first when this onnxruntime build has it, then CPU.

    Returns:
        Provider names.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxEmbedder(BaseEmbedder):
    """Embeds with ONNX Runtime from a folder written by :func:`embed_assets.export.export_onnx`.

    Args:
        onnx_dir: The exported folder (``model.onnx``, ``model_int8.onnx``, tokenizer, metadata).
        variant: ``"fp32"`` or ``"int8"``.
        providers: ONNX Runtime execution providers; default: CUDA when available, else CPU.
        max_seq_length: Optional lower limit than the exported one.
        intra_op_threads: ONNX Runtime intra-op threads (0 = one per core).
        allow_spinning: Let idle ONNX Runtime threads busy-wait. Off by default: on a shared or small CPU the
            spinning threads starve the event loop and tokenizer (measured here on 2 cores: +30-80 % texts/s
            with it off, in-process and served).
    """

    def __init__(
        self,
        onnx_dir: str,
        variant: str = "fp32",
        providers: list[str] | None = None,
        *,
        max_seq_length: int | None = None,
        intra_op_threads: int = 0,
        allow_spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        if variant not in VARIANT_FILES:
            raise ValueError(f"variant must be one of {sorted(VARIANT_FILES)}, got {variant!r}")
        meta = load_metadata(onnx_dir)
        self.onnx_dir = str(onnx_dir)
        self.metadata = meta
        path = Path(onnx_dir) / meta.get("variants", {}).get(variant, {}).get("file", VARIANT_FILES[variant])
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (variant {variant!r} was not exported)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        self.providers = self.session.get_providers()
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._output_name = self.session.get_outputs()[0].name
        self.model_name = meta["model_name"]
        self.dimension = int(meta["dimension"])
        self.max_seq_length = int(min(max_seq_length or meta["max_seq_length"], meta["max_seq_length"]))
        self.normalize = bool(meta["normalize"])
        self.pad_token_id = int(meta.get("pad_token_id", 0))
        self.backend = "onnx"
        self.variant = variant
        self.text_tokenizer = TextTokenizer.from_file(
            Path(onnx_dir) / meta.get("tokenizer_file", "tokenizer.json"),
            max_seq_length=self.max_seq_length,
            query_prefix=meta.get("query_prefix", ""),
            passage_prefix=meta.get("passage_prefix", ""),
        )

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self._output_name], feeds)[0]


class TorchEmbedder(BaseEmbedder):
    """A sentence-transformers model behind the same interface (the benchmark's torch peer).

    Tokenization uses the model's own fast tokenizer through :class:`TextTokenizer`, so truncation and
    prefixes behave exactly as with :class:`OnnxEmbedder`.

    Args:
        model_dir: A sentence-transformers model folder.
        device: Torch device (``"cpu"``, ``"cuda"``); default: CUDA when available.
        max_seq_length: Optional override of the model's maximum sequence length.
        model_name: Name to serve the model under (default: the folder name).
    """

    def __init__(
        self,
        model_dir: str,
        device: str | None = None,
        *,
        max_seq_length: int | None = None,
        model_name: str | None = None,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(model_dir, device=device).eval()
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        prompts = dict(getattr(self.model, "prompts", None) or {})
        self.model_name = model_name or Path(model_dir).name
        self.dimension = int(self.model.get_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self.normalize = any(type(m).__name__ == "Normalize" for m in self.model)
        self.pad_token_id = int(self.model.tokenizer.pad_token_id or 0)
        self.backend = "torch"
        self.variant = device
        self.device = device
        self.input_names = tuple(self.model.tokenizer.model_input_names)
        from tokenizers import Tokenizer

        # A copy: TextTokenizer switches truncation/padding off, the model's own tokenizer stays as it is.
        self.text_tokenizer = TextTokenizer(
            Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str()),
            max_seq_length=self.max_seq_length,
            query_prefix=prompts.get("query", ""),
            passage_prefix=prompts.get("passage", prompts.get("document", "")),
        )

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        features = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.model(features)["sentence_embedding"]
        return out.float().cpu().numpy()
