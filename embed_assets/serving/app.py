"""The NIM-compatible embedding service (FastAPI).

Endpoints: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{model_id}``, ``GET /v1/health/ready``,
``GET /v1/health/live``, ``GET /v1/metrics`` (Prometheus text 0.0.4, see :mod:`embed_assets.serving.metrics`),
``GET /openapi.json``; ``/embeddings``, ``/models`` and ``/models/{model_id}`` answer the same as their
``/v1`` routes. ``/openapi.json`` documents every status and body below (``schemathesis`` runs against it in
the test suite).

Every error is JSON of one shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``:

- 400 ``invalid_request_error``: a body that is not JSON or not UTF-8 (``invalid_json``, whatever the parser
  tripped on), empty input or an input with no tokens once tokenized (``empty_input``), too many inputs
  (``too_many_inputs``), an over-long input with ``truncate="NONE"`` (``input_too_long``), ``dimensions``
  larger than the model's (``invalid_dimensions``), a missing ``input_type`` for a model with query/passage
  prompts (``input_type_required``) or one contradicting the model suffix (``conflicting_input_type``),
  token ids outside the vocabulary or text that is not valid Unicode (``invalid_input``), ``embedding_type``
  int8/uint8 (``unsupported_embedding_type``);
- 401 ``authentication_error``: missing or wrong bearer token (only when an API key is configured);
- 404 ``not_found_error``: unknown ``model`` or route;
- 405 ``invalid_request_error``: wrong method (with ``Allow``);
- 413 ``request_too_large``: body above ``max_request_bytes``; ``too_many_tokens``: more tokens than
  ``max_request_tokens``;
- 422 ``invalid_request_error`` / ``invalid_type``: the body does not match the schema (wrong types, unknown
  enum values, a non-integral ``dimensions``);
- 429 ``rate_limit_error`` / ``server_busy``: accepting the request would put more than ``max_inflight_tokens``
  tokens in flight; ``Retry-After`` says when to retry (the openai SDK retries by itself);
- 500 ``server_error``: anything unexpected (the server keeps running).

(A client that disconnects while waiting gets nothing: its inputs that have not run are dropped, and the
request is counted with status 499 in the metrics.)

Clients as they are — decisions (contract-tested with the real client libraries in
``embed_assets_tests/test_serving_clients.py``):

- ``GET /v1/models/{model_id}`` answers the served model's card (404 for any other id), as OpenAI's
  ``models.retrieve`` expects. Every card carries an ``embed_assets`` object: which model is served
  (``source`` finetuned/merged/base/unknown and the run ids from the export folder's
  ``embed_assets_model.json``), the variant (fp32/int8), dimension, maximum length and prompts. OpenAI,
  langchain, llama-index and haystack clients ignore the extra key.
- Aliases without ``/v1``: ``/embeddings``, ``/models``, ``/models/{id}``; llama-index uses its ``base_url``
  as given, so ``http://host:port`` (without ``/v1``) works too. Health and metrics stay under ``/v1`` only.
- No API key configured: the ``Authorization`` header is ignored, so the placeholders clients send without a
  key (langchain ``Bearer **********``, llama-index ``Bearer NO_API_KEY_PROVIDED``, the openai SDK's
  mandatory key) just work. With a key configured, only ``Bearer <key>`` passes (placeholders get 401).
- NIM's model suffixes: ``model: "<id>-query"`` / ``"<id>-passage"`` set ``input_type`` for clients that cannot
  send it (the openai SDK); an explicit ``input_type`` that contradicts the suffix is a 400.
- A missing ``input_type``: 400 ``input_type_required`` when the model has different query and passage
  prompts (as NIM answers for its asymmetric models); ``query`` otherwise, where both are the same.
  llama-index's *sync* ``get_query_embedding`` sends ``input_type: "passage"`` (its async one sends
  ``"query"``): harmless for symmetric models, for prompted ones call ``aget_query_embedding``.
- NIM 2.x ``embedding_type``: ``binary`` and ``ubinary`` are served (sign bits packed 8 per value; identical
  to sentence-transformers' ``quantize_embeddings``), ``int8`` / ``uint8`` are a 400: they need calibration
  ranges, and without a calibration set ``quantize_embeddings`` takes them from the request's own batch, so
  one text would quantize differently depending on its neighbours.
- Token-id arrays (OpenAI's ``input: [[...], ...]``) are ids of the served model's tokenizer: ids outside its
  vocabulary are a 400 that names the fix for tiktoken-tokenizing clients (langchain-openai's
  ``check_embedding_ctx_length=False``). An array already framed by the special tokens is used as is.

Concurrent requests share forward passes under a padded-token budget, shortest work first, with no request
starving (:mod:`embed_assets.serving.batching`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from embed_assets.serving import api
from embed_assets.serving.batching import TokenBudgetBatcher, bucket, default_budgets
from embed_assets.serving.embedder import (
    BaseEmbedder,
    EmptyInputError,
    InputTooLongError,
    InvalidTokenIdsError,
    OnnxEmbedder,
    load_model_identity,
)
from embed_assets.serving.metrics import CONTENT_TYPE, ServerMetrics

#: Paths that never need the bearer token (probes and the API description); everything else does.
OPEN_PATHS = frozenset({"/v1/health/ready", "/v1/health/live", "/v1/metrics", "/openapi.json"})
#: Requests with more characters than this are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 4_000


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build the JSON error response every failure uses.

    Args:
        status: HTTP status.
        message: Human-readable explanation.
        type_: OpenAI error type.
        param: Offending request field, if any.
        code: Machine-readable code.
        headers: Extra response headers.

    Returns:
        A ``JSONResponse``.
    """
    return JSONResponse(ApiError(status, message, type_=type_, param=param, code=code).body, status, headers)


# --- ASGI guard: auth, body size, request metrics -------------------------------------------------------


class GuardMiddleware:
    """Pure ASGI middleware: bearer-token auth, request-size limit (413) and per-request metrics.

    Args:
        app: The wrapped ASGI app.
        api_key: Required bearer token for every path but :data:`OPEN_PATHS`, or ``None`` (then the
            ``Authorization`` header is ignored).
        max_request_bytes: Largest accepted request body.
        metrics: Request counters.
    """

    def __init__(
        self, app: Any, *, api_key: str | None, max_request_bytes: int, metrics: ServerMetrics
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = {"status": 500}

        async def tracking_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, tracking_send)
        finally:
            self.metrics.observe_request(
                scope["method"], scope["path"], state["status"], time.perf_counter() - start
            )

    async def _guarded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            resp = error_response(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                type_="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await resp(scope, receive, send)
            return
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > self.max_request_bytes:
            await self._too_large(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # Buffer the body (at most max_request_bytes) so chunked uploads without Content-Length are
            # limited too, then replay it to the app.
            body = await self._read_body(receive)
            if body is None:
                await self._too_large(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Callable[[], Awaitable[Any]]) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # client went away; the app sees an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        value = headers.get("authorization", b"")
        scheme, _, token = value.partition(b" ")
        assert self.api_key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        resp = error_response(
            413,
            f"Request body larger than {self.max_request_bytes} bytes.",
            type_="request_too_large",
            code="request_too_large",
        )
        await resp(scope, receive, send)


def _replay(body: bytes, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for http.disconnect

    return replay


# --- the app ---------------------------------------------------------------------------------------------


class _Limits:
    """Request admission: per-request and in-flight token limits, with a throughput estimate for Retry-After."""

    def __init__(self, max_request_tokens: int, max_inflight_tokens: int) -> None:
        self.max_request_tokens = max_request_tokens
        self.max_inflight_tokens = max_inflight_tokens
        self.inflight = 0
        self.tokens_per_s = 5_000.0  # refined from every forward pass

    def admit(self, tokens: int) -> None:
        if tokens > self.max_request_tokens:
            raise ApiError(
                413,
                f"The request has {tokens} tokens, more than this server's limit of {self.max_request_tokens} "
                "per request; send fewer or shorter inputs per request.",
                type_="invalid_request_error",
                param="input",
                code="too_many_tokens",
            )
        if self.inflight and self.inflight + tokens > self.max_inflight_tokens:
            wait = max(1, math.ceil(self.inflight / max(self.tokens_per_s, 1.0)))
            raise ApiError(
                429,
                f"The server is busy: {self.inflight} tokens in flight, and this request's {tokens} would "
                f"exceed its limit of {self.max_inflight_tokens}; retry in {wait} s.",
                type_="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(wait)},
            )

    def observe(self, real_tokens: int, seconds: float) -> None:
        if seconds > 0 and real_tokens > 0:
            self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * real_tokens / seconds


def create_app(
    onnx_dir: str | None,
    *,
    variant: str = "fp32",
    api_key: str | None = None,
    max_batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    max_request_bytes: int = 1_000_000,
    max_inputs_per_request: int = 256,
    max_request_tokens: int = 65_536,
    max_inflight_tokens: int = 262_144,
    batch_wait_ms: float = 2.0,
    memory_arena: bool = False,
    embedder: BaseEmbedder | None = None,
    served_model_name: str | None = None,
) -> FastAPI:
    """Build the NIM-compatible FastAPI app.

    Args:
        onnx_dir: Folder written by :func:`embed_assets.export.export_onnx` (ignored when ``embedder`` is given,
            except for reading ``embed_assets_model.json``).
        variant: ``"fp32"`` or ``"int8"``.
        api_key: When set, every route but health, metrics and ``/openapi.json`` requires
            ``Authorization: Bearer <api_key>``.
        max_batch_size: Most inputs per forward pass (default per device, see
            :func:`~embed_assets.serving.batching.default_budgets`).
        max_batch_tokens: Padded-token budget of one forward pass (default per device); at least the model's
            maximum length.
        max_request_bytes: Largest request body (413 above).
        max_inputs_per_request: Most inputs in one request (400 above).
        max_request_tokens: Most tokens in one request after tokenization and truncation (413 above).
        max_inflight_tokens: Most tokens of accepted, unanswered requests; a request that would exceed it gets
            429 with ``Retry-After`` (a request is always accepted when nothing is in flight).
        batch_wait_ms: How long an idle worker waits for concurrent requests to join the first pass.
        memory_arena: Keep ONNX Runtime's CPU memory arena (see :class:`OnnxEmbedder`); off so RSS returns
            after bursts.
        embedder: A ready embedder (e.g. :class:`~embed_assets.serving.embedder.TorchEmbedder`) instead of
            loading ``onnx_dir``.
        served_model_name: Name clients send as ``model`` (default: the exported model name).

    Returns:
        The FastAPI application (its worker starts at startup or with the first request).

    Raises:
        ValueError: Bad limits, or an unreadable ``embed_assets_model.json``.
    """
    if embedder is None:
        if onnx_dir is None:
            raise ValueError("create_app needs onnx_dir or an embedder")
        embedder = OnnxEmbedder(onnx_dir, variant=variant, memory_arena=memory_arena)
    identity_dir = onnx_dir or getattr(embedder, "onnx_dir", None)
    identity = (
        load_model_identity(identity_dir) if identity_dir else {"source": "unknown", "identity_file": None}
    )
    model_name = served_model_name or embedder.model_name
    device = "cuda" if _uses_cuda(embedder) else "cpu"
    default_tokens, default_size = default_budgets(device)
    max_batch_tokens = int(max_batch_tokens or default_tokens)
    max_batch_size = int(max_batch_size or default_size)
    if max_batch_tokens < bucket(embedder.max_seq_length):
        raise ValueError(
            f"max_batch_tokens={max_batch_tokens} is below one input of the model's maximum length "
            f"({embedder.max_seq_length} tokens, {bucket(embedder.max_seq_length)} in the budget); raise it"
        )
    if max_request_tokens < embedder.max_seq_length or max_inflight_tokens < max_request_tokens:
        raise ValueError(
            f"need max_seq_length ({embedder.max_seq_length}) <= max_request_tokens ({max_request_tokens}) "
            f"<= max_inflight_tokens ({max_inflight_tokens})"
        )
    served = served_info(embedder, identity)
    metrics = ServerMetrics(
        {
            "model": model_name,
            "backend": embedder.backend,
            "variant": embedder.variant,
            "source": str(identity.get("source", "unknown")),
            "checkpoint_run_id": str(identity.get("checkpoint_run_id", "")),
        }
    )
    limits = _Limits(max_request_tokens, max_inflight_tokens)

    def on_pass(size: int, padded: int, real: int, seconds: float) -> None:
        metrics.observe_pass(size, padded, real, seconds)
        limits.observe(real, seconds)

    batcher = TokenBudgetBatcher(
        embedder.embed_tokens,
        embedder.dimension,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        on_pass=on_pass,
        on_queue=metrics.queue_depth.set,
    )
    state = {"ready": False}
    created = int(time.time())
    asymmetric = embedder.text_tokenizer.prefixes["query"] != embedder.text_tokenizer.prefixes["passage"]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.submit(embedder.tokenize(["warm up"], "query", "END"))  # first pass allocates buffers
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()

    app = FastAPI(
        title="embed_assets NIM-compatible embeddings",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.embedder = embedder
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.identity = identity
    app.state.served = served
    app.state.limits = limits
    _install_error_handlers(app)
    auth = api_key is not None
    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "embed_assets",
        "root": model_name,
        "embed_assets": served,
    }

    async def embeddings(body: api.EmbeddingRequest, request: Request) -> Response:
        input_type = _input_type(body, model_name, asymmetric)
        items = _validate(body, embedder.dimension, max_inputs_per_request)
        encodings = await _tokenize(embedder, items, input_type, body.truncate)
        tokens = sum(len(e.ids) for e in encodings)
        limits.admit(tokens)
        limits.inflight += tokens
        metrics.inflight_tokens.set(limits.inflight)
        try:
            vectors = await _unless_disconnected(request, batcher.submit(encodings))
        finally:
            limits.inflight -= tokens
            metrics.inflight_tokens.set(limits.inflight)
        if vectors is None:  # the client went away: its pending inputs were dropped, nobody reads this
            return Response(status_code=499)
        vectors = _apply_dimensions(vectors, body.dimensions, embedder.normalize)
        metrics.observe_embeddings(len(encodings), tokens)
        payload = _render(vectors, body.encoding_format, body.embedding_type, model_name, tokens)
        return Response(payload, media_type="application/json")

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise _unknown_model(model_id, model_name, "model_id")
        return card

    for prefix in ("/v1", ""):
        alias = "" if prefix else " (alias of the /v1 route)"
        app.add_api_route(
            f"{prefix}/embeddings",
            embeddings,
            methods=["POST"],
            response_model=api.EmbeddingResponse,
            responses=api.embeddings_responses(auth),
            summary="Create embeddings" + alias,
            operation_id=f"createEmbeddings{'Alias' if not prefix else ''}",
        )
        app.add_api_route(
            f"{prefix}/models",
            models,
            methods=["GET"],
            response_model=api.ModelList,
            responses=api.models_responses(auth),
            summary="List served models" + alias,
            operation_id=f"listModels{'Alias' if not prefix else ''}",
        )
        app.add_api_route(
            f"{prefix}/models/{{model_id:path}}",
            model,
            methods=["GET"],
            response_model=api.ModelCard,
            responses=api.models_responses(auth, single=True),
            summary="Retrieve the served model" + alias,
            operation_id=f"retrieveModel{'Alias' if not prefix else ''}",
        )

    @app.get("/v1/health/ready", response_model=api.HealthReady, responses=api.READY_RESPONSES)
    async def ready() -> JSONResponse:
        if state["ready"]:
            return JSONResponse({"object": "health.response", "message": "ready", "ready": True})
        return JSONResponse({"object": "health.response", "message": "not ready", "ready": False}, 503)

    @app.get("/v1/health/live", response_model=api.HealthLive, responses=api.OPEN_RESPONSES)
    async def live() -> dict[str, Any]:
        return {"object": "health.response", "message": "live", "live": True}

    @app.get(
        "/v1/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text format 0.0.4 (see embed_assets.serving.metrics).",
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
            },
            **api.OPEN_RESPONSES,
        },
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    _customize_openapi(app, max_inputs_per_request, embedder, auth)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes, metrics=metrics)
    return app


def served_info(embedder: BaseEmbedder, identity: dict[str, Any]) -> dict[str, Any]:
    """The ``embed_assets`` object of a model card: identity, variant and shape of the served model.

    Args:
        embedder: The serving embedder.
        identity: From :func:`~embed_assets.serving.embedder.load_model_identity`.

    Returns:
        A JSON-able dictionary.
    """
    info = embedder.describe()
    info.pop("model_name", None)
    return {**identity, **info}


def _uses_cuda(embedder: BaseEmbedder) -> bool:
    providers = getattr(embedder, "providers", None) or []
    return "CUDAExecutionProvider" in providers or str(embedder.variant).startswith("cuda")


def _customize_openapi(app: FastAPI, max_inputs: int, embedder: BaseEmbedder, auth: bool) -> None:
    """Put the server's own limits (inputs, vocabulary, dimension) and security into the OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            import copy

            from fastapi.openapi.utils import get_openapi

            schema = copy.deepcopy(get_openapi(title=app.title, version=app.version, routes=app.routes))
            props = schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
            _, texts, ids, id_arrays = props["input"]["anyOf"]
            for option in (texts, ids, id_arrays):
                option["maxItems"] = max_inputs
            top_id = embedder.text_tokenizer.vocab_size - 1
            ids["items"]["maximum"] = id_arrays["items"]["items"]["maximum"] = top_id
            for option in props["dimensions"].get("anyOf", [props["dimensions"]]):
                if option.get("type") == "integer":
                    option["maximum"] = embedder.dimension
            if auth:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    if path not in OPEN_PATHS:
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _unknown_model(name: str, model_name: str, param: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist; this server serves '{model_name}' (also as "
        f"'{model_name}-query' / '{model_name}-passage' to set input_type).",
        type_="not_found_error",
        param=param,
        code="model_not_found",
    )


def _input_type(body: api.EmbeddingRequest, model_name: str, asymmetric: bool) -> str:
    """Resolve ``input_type`` from the field, NIM's ``-query`` / ``-passage`` model suffix and the model."""
    from_suffix = None
    if body.model is not None and body.model != model_name:
        from_suffix = next((t for t in ("query", "passage") if body.model == f"{model_name}-{t}"), None)
        if from_suffix is None:
            raise _unknown_model(body.model, model_name, "model")
    if from_suffix and body.input_type and body.input_type != from_suffix:
        raise ApiError(
            400,
            f"input_type '{body.input_type}' contradicts the model name '{body.model}'; send one of them.",
            param="input_type",
            code="conflicting_input_type",
        )
    chosen = body.input_type or from_suffix
    if chosen is None:
        if asymmetric:
            raise ApiError(
                400,
                f"'input_type' is required for '{model_name}' (its queries and passages get different "
                f"prompts): send input_type 'query' or 'passage', or use the model name '{model_name}-query' "
                f"/ '{model_name}-passage'.",
                param="input_type",
                code="input_type_required",
            )
        chosen = "query"
    return chosen


def _validate(body: api.EmbeddingRequest, dimension: int, max_inputs: int) -> list[Any]:
    """Checks the schema cannot express; returns the inputs as a list (strings or token-id lists)."""
    raw = body.input
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and isinstance(raw[0], int):
        items = [list(raw)]  # one token-id array
    else:
        items = list(raw)
    if not items:
        raise ApiError(
            400, "'input' is an empty list; send at least one input.", param="input", code="empty_input"
        )
    if len(items) > max_inputs:
        raise ApiError(
            400,
            f"'input' has {len(items)} items, more than the limit of {max_inputs} per request.",
            param="input",
            code="too_many_inputs",
        )
    for i, item in enumerate(items):
        if isinstance(item, str):
            try:
                item.encode("utf-8")  # JSON may carry lone surrogates ("\ud800") the tokenizer cannot take
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    f"input[{i}] is not valid Unicode (unpaired surrogate at character {exc.start}).",
                    param="input",
                    code="invalid_input",
                ) from None
    if body.dimensions is not None and body.dimensions > dimension:
        raise ApiError(
            400,
            f"'dimensions'={body.dimensions} exceeds the model's embedding size {dimension}.",
            param="dimensions",
            code="invalid_dimensions",
        )
    if body.embedding_type in ("int8", "uint8"):
        raise ApiError(
            400,
            f"embedding_type '{body.embedding_type}' is not served: it needs calibration ranges this server "
            "does not have (without them the ranges would come from each request's own batch). Use "
            "'float', 'binary' or 'ubinary'.",
            param="embedding_type",
            code="unsupported_embedding_type",
        )
    return items


async def _tokenize(embedder: BaseEmbedder, items: list[Any], input_type: str, truncate: str) -> list[Any]:
    """Tokenize (inline for small requests: a thread hop costs more than the work), mapping errors to 400."""
    try:
        if isinstance(items[0], str):
            if sum(len(t) for t in items) <= _INLINE_TOKENIZE_CHARS:
                return embedder.tokenize(items, input_type, truncate, reject_empty=True)
            return await run_in_threadpool(embedder.tokenize, items, input_type, truncate, reject_empty=True)
        return embedder.from_token_ids(items, input_type, truncate)
    except InputTooLongError as exc:
        raise ApiError(400, str(exc), param="input", code="input_too_long") from exc
    except EmptyInputError as exc:
        raise ApiError(400, str(exc), param="input", code="empty_input") from exc
    except InvalidTokenIdsError as exc:
        raise ApiError(400, str(exc), param="input", code="invalid_input") from exc


async def _unless_disconnected(request: Request, work: Awaitable[np.ndarray]) -> np.ndarray | None:
    """Await ``work`` unless the client disconnects first; then cancel it and return ``None``.

    Cancelling :meth:`TokenBudgetBatcher.submit` drops the request's pending inputs: an abandoned request
    does not keep the single inference thread busy for the clients still waiting.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read: the next ASGI message is http.disconnect (when the client closes the connection).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _apply_dimensions(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Matryoshka truncation; re-normalized when the model's embeddings are normalized."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    out = np.ascontiguousarray(vectors[:, :dimensions])
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def quantize(vectors: np.ndarray, embedding_type: str) -> np.ndarray:
    """NIM 2.x ``embedding_type`` ``binary`` / ``ubinary``: sign bits packed 8 per value, row by row.

    The same as sentence-transformers' ``quantize_embeddings(..., precision="binary" | "ubinary")``
    (positive -> 1, ``binary`` is ``ubinary - 128`` as int8).

    Args:
        vectors: ``(n, dim)`` float32.
        embedding_type: ``"binary"`` or ``"ubinary"``.

    Returns:
        ``(n, ceil(dim / 8))`` int8 or uint8.
    """
    packed = np.packbits(vectors > 0, axis=-1)
    if embedding_type == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)


def _render(
    vectors: np.ndarray, encoding_format: str, embedding_type: str, model_name: str, tokens: int
) -> bytes:
    """Serialize the response with orjson (numpy rows as they are: ~30x faster than json + tolist)."""
    values: np.ndarray = vectors if embedding_type == "float" else quantize(vectors, embedding_type)
    if encoding_format == "base64":
        dtype = "<f4" if embedding_type == "float" else values.dtype
        rows: Sequence[Any] = [base64.b64encode(v.astype(dtype).tobytes()).decode("ascii") for v in values]
    else:
        rows = np.ascontiguousarray(values, dtype=np.float32 if embedding_type == "float" else values.dtype)
    payload = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


#: What FastAPI says when the body cannot be decoded at all (not UTF-8, nested too deep, ...).
_BODY_PARSE_ERROR = "There was an error parsing the body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            where = first.get("ctx", {}).get("error", "")
            return error_response(
                400,
                f"The request body is not valid JSON{f' ({where})' if where else ''}.",
                code="invalid_json",
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        return error_response(422, f"Invalid request: {details}", param=param, code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and str(exc.detail) == _BODY_PARSE_ERROR:
            return error_response(
                400,
                "The request body is not valid JSON (or not UTF-8, or nested too deep).",
                code="invalid_json",
            )
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        return error_response(
            exc.status_code, str(exc.detail), type_=kind, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"Internal error: {type(exc).__name__}", type_="server_error")
