"""Sentence embedders for serving: ONNX Runtime (the default) and a torch peer with the same interface.

The ONNX graph written by :func:`embed_assets.export.export_onnx` already contains pooling and normalization, so
serving only needs ``tokenizers`` + ``onnxruntime``; this module never imports torch unless
:class:`TorchEmbedder` is used.

Truncation follows NIM's ``truncate`` parameter:

- ``"NONE"``: an input longer than ``max_seq_length`` tokens raises :class:`InputTooLongError`;
- ``"END"``: keep the start of the text (drop tokens at the end);
- ``"START"``: keep the end of the text (drop tokens at the start; the query/passage prefix is kept).

Inputs may also be token-id arrays (OpenAI's ``input: [[101, 2023, ...]]``): ids of the *served model's*
vocabulary (see :meth:`TextTokenizer.from_token_ids`).

The export folder may carry ``embed_assets_model.json`` saying which model it is (see
:func:`load_model_identity`); the server reports it in ``/v1/models``.
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
#: Optional file of the export stage saying which model the folder holds (all keys optional).
MODEL_IDENTITY_FILE = "embed_assets_model.json"
#: Keys of :data:`MODEL_IDENTITY_FILE` the server reports (others are ignored).
IDENTITY_KEYS = (
    "source",
    "merge_weight",
    "checkpoint_run_id",
    "dagster_run_id",
    "base_model",
    "mlflow_run_id",
)
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


class EmptyInputError(ValueError):
    """An input has no content tokens once tokenized (empty, only whitespace or characters the tokenizer drops).

    Attributes:
        index: Position of the offending input in the request.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(
            f"input[{index}] has no tokens after tokenization (empty, whitespace or only characters the "
            "tokenizer drops); every input must contain text."
        )


class InvalidTokenIdsError(ValueError):
    """A token-id input holds ids outside the served model's vocabulary (or is empty).

    Attributes:
        index: Position of the offending input in the request.
    """

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(f"input[{index}]: {message}")


class TokenIds:
    """A tokenized input given as ids (the same ``ids`` / ``type_ids`` interface as ``tokenizers.Encoding``)."""

    __slots__ = ("ids", "type_ids")

    def __init__(self, ids: list[int], type_ids: list[int] | None = None) -> None:
        self.ids = ids
        self.type_ids = type_ids if type_ids is not None else [0] * len(ids)


def load_model_identity(onnx_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read which model an export folder holds, from its optional ``embed_assets_model.json``.

    The export stage writes e.g. ``{"source": "finetuned" | "merged" | "base", "checkpoint_run_id": ...,
    "dagster_run_id": ..., "base_model": ..., "mlflow_run_id": ...}``; every key is optional.

    Args:
        onnx_dir: The export folder.

    Returns:
        The known keys of :data:`IDENTITY_KEYS` that are present (``source`` is ``"unknown"`` when the file
        or the key is missing), plus ``identity_file``: the file's name, or ``None`` when there is none.

    Raises:
        ValueError: The file exists but is not a JSON object (the message names the file).
    """
    path = Path(onnx_dir) / MODEL_IDENTITY_FILE
    if not path.is_file():
        return {"source": "unknown", "identity_file": None}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}; fix or remove the file")
    out: dict[str, Any] = {k: data[k] for k in IDENTITY_KEYS if data.get(k) is not None}
    out.setdefault("source", "unknown")
    out["identity_file"] = MODEL_IDENTITY_FILE
    return out


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
        self.vocab_size = int(tokenizer.get_vocab_size())
        # The special tokens the post-processor puts around one sequence (BERT: [CLS] ... [SEP]).
        probe = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.post_process(probe)
        at = _find(full.ids, probe.ids)
        self._lead = list(full.ids[:at]) if at >= 0 else []
        self._trail = list(full.ids[at + len(probe.ids) :]) if at >= 0 else []

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

    def tokenize(
        self,
        texts: Sequence[str],
        input_type: str = "query",
        truncate: str = "END",
        *,
        reject_empty: bool = False,
    ) -> list[Any]:
        """Prefix, tokenize and truncate ``texts``.

        Args:
            texts: Input strings.
            input_type: ``"query"`` or ``"passage"`` (selects the prefix).
            truncate: ``"NONE"``, ``"START"`` or ``"END"``.
            reject_empty: Raise :class:`EmptyInputError` for a text without content tokens (emptiness is
                judged after tokenization, so ``"\\u200b"`` counts as empty and ``"?"`` does not).

        Returns:
            One ``tokenizers.Encoding`` per text, special tokens included, at most ``max_seq_length`` long.

        Raises:
            InputTooLongError: With ``truncate="NONE"``, for the first input that is too long.
            EmptyInputError: With ``reject_empty``, for the first input without tokens.
            ValueError: Unknown ``input_type`` or ``truncate``.
        """
        _check_mode(input_type, truncate)
        prefix = self.prefixes[input_type]
        raw = self._tok.encode_batch([prefix + t for t in texts], add_special_tokens=False)
        prefix_len = len(self._prefix_encodings[input_type].ids) if prefix else 0
        out = []
        for i, enc in enumerate(raw):
            if (
                reject_empty
                and len(enc.ids) <= prefix_len
                and not self._tok.encode(texts[i], add_special_tokens=False).ids
            ):
                raise EmptyInputError(i)
            if len(enc.ids) > self._budget:
                enc = self._truncate(i, enc, texts[i], input_type, truncate)
            out.append(self._tok.post_process(enc))
        return out

    def from_token_ids(
        self, sequences: Sequence[Sequence[int]], input_type: str = "query", truncate: str = "END"
    ) -> list[TokenIds]:
        """Model inputs from token-id arrays (ids of this model's vocabulary, as OpenAI's API takes them).

        A sequence that already starts and ends with the model's special tokens (``[CLS] ... [SEP]``) is taken
        as the complete model input; otherwise it is the content and gets the special tokens, and the
        ``input_type`` prefix, added exactly as a text would. Truncation follows ``truncate``.

        Args:
            sequences: One list of ids per input.
            input_type: ``"query"`` or ``"passage"``.
            truncate: ``"NONE"``, ``"START"`` or ``"END"``.

        Returns:
            One :class:`TokenIds` per sequence.

        Raises:
            InvalidTokenIdsError: An id outside ``[0, vocab_size)``.
            EmptyInputError: A sequence without content tokens.
            InputTooLongError: With ``truncate="NONE"``, for the first sequence that is too long.
        """
        _check_mode(input_type, truncate)
        lead, trail = self._lead, self._trail
        prefix_ids = list(self._prefix_encodings[input_type].ids) if self.prefixes[input_type] else []
        out = []
        for i, seq in enumerate(sequences):
            ids = list(seq)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidTokenIdsError(
                    i,
                    f"token id {bad} is outside this model's vocabulary (0..{self.vocab_size - 1}). Token ids "
                    "must come from the served model's tokenizer; a client that tokenizes with tiktoken "
                    "(langchain-openai's OpenAIEmbeddings) should send text (check_embedding_ctx_length=False).",
                )
            wrapped = (lead or trail) and ids[: len(lead)] == lead and ids[len(ids) - len(trail) :] == trail
            content = ids[len(lead) : len(ids) - len(trail)] if wrapped else prefix_ids + ids
            if not content:
                raise EmptyInputError(i)
            if len(content) > self._budget:
                if truncate == "NONE":
                    raise InputTooLongError(i, len(content) + len(lead) + len(trail), self.max_seq_length)
                if truncate == "END":
                    content = content[: self._budget]
                else:  # START: keep the end (and the prefix, as for text)
                    keep = prefix_ids if not wrapped else []
                    content = keep + content[len(content) - (self._budget - len(keep)) :]
            out.append(TokenIds(lead + content + trail))
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


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int:
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if list(haystack[i : i + n]) == list(needle)), -1)


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

    def tokenize(
        self,
        texts: Sequence[str],
        input_type: str = "query",
        truncate: str = "END",
        *,
        reject_empty: bool = False,
    ) -> list[Any]:
        """See :meth:`TextTokenizer.tokenize`."""
        return self.text_tokenizer.tokenize(texts, input_type, truncate, reject_empty=reject_empty)

    def from_token_ids(
        self, sequences: Sequence[Sequence[int]], input_type: str = "query", truncate: str = "END"
    ) -> list[TokenIds]:
        """See :meth:`TextTokenizer.from_token_ids`."""
        return self.text_tokenizer.from_token_ids(sequences, input_type, truncate)

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
        memory_arena: Keep ONNX Runtime's CPU memory arena. The server turns it off (``--memory-arena`` keeps
            it): the arena keeps the peak of the largest forward pass for the life of the process, so one
            burst of long inputs raised the server's RSS for good; without it freed activations go back to
            the allocator (``benchmarks/serve.py`` measures RSS after a burst).
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
        memory_arena: bool = True,
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
        options.enable_cpu_mem_arena = memory_arena
        options.enable_mem_pattern = memory_arena  # memory patterns pre-plan arena blocks per input shape
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
