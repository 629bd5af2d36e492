"""Request and response schemas of the NIM-compatible API, and the OpenAPI description of every answer.

The request model validates types only; the limits that depend on tokenization or on the server's settings
(empty after tokenization, too long with ``truncate="NONE"``, too many inputs or tokens, ``dimensions`` above
the model's size) are checked by the app and answered with the documented 400 / 413 / 429 bodies.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, WithJsonSchema

InputType = Literal["query", "passage"]
EncodingFormat = Literal["float", "base64"]
Truncate = Literal["NONE", "START", "END"]
EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]


def _integral(value: Any) -> Any:
    """``dimensions``: an integer, or a float with no fractional part (``64.0``); never a string or bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError("must be an integer (a float is accepted only without a fractional part)")
        return int(value)
    return value


# The constraint goes before the validator, or the JSON schema says "gt" instead of "exclusiveMinimum".
Dimensions = Annotated[int, Field(gt=0), BeforeValidator(_integral)]
_TOKEN_ID = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
_TEXT_SCHEMA = {"type": "string", "minLength": 1}
_INPUT_SCHEMA = {
    "anyOf": [
        {**_TEXT_SCHEMA, "title": "One text"},
        {"type": "array", "items": _TEXT_SCHEMA, "minItems": 1, "title": "Texts"},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "title": "Token ids"},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            "minItems": 1,
            "title": "Token-id arrays",
        },
    ],
    "description": "Text(s) to embed, or token ids of the served model's tokenizer (one array per input). "
    "Each must have tokens once tokenized; with truncate=NONE none may exceed the model's maximum length.",
}


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings`` (NIM / OpenAI embeddings API). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: Annotated[
        StrictStr | list[StrictStr] | list[_TOKEN_ID] | list[list[_TOKEN_ID]], WithJsonSchema(_INPUT_SCHEMA)
    ]
    model: StrictStr | None = Field(
        default=None,
        description="The served model's id; '<id>-query' / '<id>-passage' also set input_type (NIM). "
        "Default: the served model.",
    )
    input_type: InputType | None = Field(
        default=None,
        description="Required for a model with query/passage prompts (unless the model name carries the "
        "suffix); 'query' otherwise.",
    )
    encoding_format: EncodingFormat = "float"
    truncate: Truncate = "NONE"
    dimensions: Dimensions | None = Field(
        default=None, description="Matryoshka truncation (re-normalized); at most the model's dimension."
    )
    embedding_type: Annotated[
        EmbeddingType,
        # int8 / uint8 pass validation only to get the 400 that explains why they are not served.
        WithJsonSchema({"type": "string", "enum": ["float", "binary", "ubinary"], "default": "float"}),
    ] = Field(
        default="float",
        description="NIM 2.x: 'binary' / 'ubinary' (sign bits packed 8 per value, as sentence-transformers' "
        "quantize_embeddings) are served; 'int8' / 'uint8' need calibration ranges and are refused with 400.",
    )
    user: StrictStr | None = None


class EmbeddingObject(BaseModel):
    """One embedding."""

    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | list[int] | str = Field(
        description="floats; packed ints for embedding_type binary/ubinary; base64 of the little-endian "
        "bytes (float32, or int8/uint8 when packed) with encoding_format=base64"
    )


class Usage(BaseModel):
    """Token counts (prefix and special tokens included)."""

    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingResponse(BaseModel):
    """Answer of ``POST /v1/embeddings``."""

    object: Literal["list"]
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the server answers."""

    error: ErrorDetail


class ServedModelInfo(BaseModel):
    """embed_assets' own description of the served model (OpenAI clients ignore unknown keys)."""

    model_config = ConfigDict(extra="allow")

    source: str = Field(description="finetuned | merged | base | unknown (from embed_assets_model.json)")
    variant: str = Field(description="fp32 | int8 (ONNX), or the torch device")
    backend: str
    dimension: int
    max_seq_length: int
    normalize: bool
    query_prefix: str
    passage_prefix: str
    merge_weight: float | None = Field(
        default=None, description="merged models: the fine-tuned weights' share (1 - it is the base model's)"
    )
    checkpoint_run_id: str | None = None
    dagster_run_id: str | None = None
    base_model: str | None = None
    mlflow_run_id: str | None = None
    identity_file: str | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    embed_assets: ServedModelInfo


class ModelList(BaseModel):
    """Answer of ``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


class HealthReady(BaseModel):
    """Answer of ``GET /v1/health/ready`` (200 ready, 503 not yet)."""

    object: Literal["health.response"]
    message: str
    ready: bool


class HealthLive(BaseModel):
    """Answer of ``GET /v1/health/live``."""

    object: Literal["health.response"]
    message: str
    live: bool


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = headers
    return out


_UNAUTHORIZED = _error(
    "Missing or wrong bearer token (only when the server has an API key).",
    {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
)
_SERVER_ERROR = _error("Unexpected failure (the server keeps running).")


def embeddings_responses(auth: bool) -> dict[int | str, dict[str, Any]]:
    """Documented answers of ``POST /v1/embeddings``.

    Args:
        auth: Whether the server requires a bearer token.

    Returns:
        FastAPI ``responses``.
    """
    out: dict[int | str, dict[str, Any]] = {
        400: _error(
            "Invalid request: body not JSON / not UTF-8 (invalid_json), empty input (empty_input), too many "
            "inputs (too_many_inputs), an input too long with truncate=NONE (input_too_long), dimensions too "
            "large (invalid_dimensions), input_type missing for a model with prompts (input_type_required) "
            "or contradicting the model suffix, invalid token ids (invalid_input), unsupported "
            "embedding_type (unsupported_embedding_type)."
        ),
        404: _error("Unknown model (model_not_found)."),
        413: _error(
            "Body larger than the byte limit (request_too_large) or more tokens than the per-request "
            "token limit (too_many_tokens)."
        ),
        422: _error("The body does not match the schema (invalid_type)."),
        429: _error(
            "Too many tokens in flight (server_busy); retry after the given seconds.",
            {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}},
        ),
        500: _SERVER_ERROR,
    }
    if auth:
        out[401] = _UNAUTHORIZED
    return out


def models_responses(auth: bool, *, single: bool = False) -> dict[int | str, dict[str, Any]]:
    """Documented answers of ``GET /v1/models`` (and ``/v1/models/{model_id}`` with ``single``)."""
    out: dict[int | str, dict[str, Any]] = {500: _SERVER_ERROR}
    if single:
        out[404] = _error("Unknown model (model_not_found).")
    if auth:
        out[401] = _UNAUTHORIZED
    return out


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": HealthReady, "description": "Not ready yet (loading / warming up)."},
    500: _SERVER_ERROR,
}
OPEN_RESPONSES: dict[int | str, dict[str, Any]] = {500: _SERVER_ERROR}
