"""A scripted OpenAI-compatible chat-completions server on loopback, for tests of the LLM generator.

It is a real HTTP server (``http.server`` in a thread, free port on 127.0.0.1) answering
``POST /v1/chat/completions`` (plain JSON, or an SSE stream when the request says ``"stream": true``) and
``GET /v1/models``. It recognizes the SDG step from the ``TASK: <step>`` line of the prompt, reads the
``[Segment N]`` blocks it was sent and answers with schema-valid JSON built from them:

- artifact extraction: a few artifacts quoted from the segments,
- QA generation: questions made from the segments' sentences (round robin over the segments, every third pair
  multi-hop when several segments are given), via the replaceable ``qa_builder``,
- quality judge: scores for every ``[Pair k]``, ``overall`` from the replaceable ``judge_overall(question)``,
- a repair request (``REPAIR of TASK``): the answer it should have given to the request whose faulty answer is
  quoted (faulty answers carry a ``<stub-ref N>`` marker, as a model recognizes its own answer).

Faults are scripted with :class:`Fault` (malformed JSON, garbage, schema violations, HTTP statuses with
``Retry-After``, slow answers, endless generation, broken envelopes), and ``fail_after`` turns every request
after the first N into a 500 (an outage). ``context_length`` makes it reject prompts that do not fit, like
OpenAI/vLLM (prompt + max_tokens) or llama-cpp-python (prompt alone; max_tokens is clamped; a streamed request
gets an empty 200 event stream, a plain one the HTTP 400). Answers longer
than ``max_tokens`` words are cut off with ``finish_reason: "length"``. Every request is recorded
(:class:`CallRecord`) so tests can count calls per step and per segment text; the generator's model-name probe
is recorded apart, in ``checks``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REASONING = ("factual", "relational", "inferential", "temporal", "procedural", "causal")
_SEGMENT = re.compile(r"\[Segment (\d+)\]\n(.*?)(?=\n\n\[Segment \d+\]\n|\n</segments>)", re.DOTALL)
_PAIR = re.compile(r"\[Pair (\d+)\] segments: [^\n]*\nQ: ([^\n]*)\nA: ([^\n]*)")
_NUM_PAIRS = re.compile(r"Generate (\d+) question-answer pairs")
_TASK = re.compile(r"TASK: (\w+)")
_REF = re.compile(r"<stub-ref (\d+)>")
MODEL_CHECK_PROMPT = "embed_assets model-name check"  # the start of the generator's model-name probe


@dataclass
class Fault:
    """One scripted misbehaviour, applied to the next matching requests.

    Attributes:
        kind: ``"malformed"`` (truncated JSON), ``"garbage"`` (prose), ``"schema"`` (JSON violating the
            schema), ``"status"`` (HTTP ``status``, optional ``retry_after`` header), ``"slow"`` (sleep
            ``delay_s`` then answer normally), ``"endless"`` (generate one word every ``delay_s`` for
            ``duration_s``: streamed, it stops when the client goes away; not streamed, it runs to the end),
            ``"envelope"`` (200 with a non-JSON body), ``"interrupt"`` (a stream that ends with
            ``[DONE]`` but no ``finish_reason``, as llama-cpp-python's interrupted requests do).
        step: Only for this step (``None``: any step).
        repair: ``True``: only repair requests, ``False``: only first attempts, ``None``: both.
        match: Only when the prompt contains this text.
        times: How many requests it applies to (``None``: forever).
        body: Error message of a ``"status"`` answer (``{auth}`` echoes the request's Authorization header,
            to test that clients redact what servers echo).
    """

    kind: str
    step: str | None = None
    repair: bool | None = None
    match: str | None = None
    times: int | None = 1
    status: int = 500
    retry_after: str | None = None
    delay_s: float = 0.0
    duration_s: float = 30.0  # "endless": how long generation goes on at most
    body: str | None = None  # error message for "status"; "{auth}" is replaced by the Authorization header

    def applies(self, step: str, repair: bool, prompt: str) -> bool:
        return (
            (self.times is None or self.times > 0)
            and (self.step is None or self.step == step)
            and (self.repair is None or self.repair == repair)
            and (self.match is None or self.match in prompt)
        )


@dataclass
class CallRecord:
    """What the server saw for one request."""

    step: str
    repair: bool
    segments: list[str]
    status: int
    authorization: str
    model: str
    at: float
    fault: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    words_generated: int = 0  # "endless" faults: how far generation got
    ended_at: float = 0.0  # when the server stopped working on the request
    client_left: bool = False  # the client closed the connection before the answer was complete


def split_sentences(text: str) -> list[str]:
    """Naive sentence split on ``.``, ``!`` and ``?``."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def default_qa(segments: dict[int, str], num_pairs: int) -> list[dict[str, Any]]:
    """Questions from the segments' sentences, round robin over segments; every third pair is multi-hop."""
    ids = sorted(segments)
    sentences = {sid: split_sentences(segments[sid]) or [segments[sid]] for sid in ids}
    pairs = []
    for i in range(num_pairs):
        sid = ids[i % len(ids)]
        sents = sentences[sid]
        sentence = sents[(i // len(ids)) % len(sents)]
        seg_ids, qtype = [sid], "contextual"
        if len(ids) > 1 and i % 3 == 0:
            seg_ids, qtype = [sid, ids[(i + 1) % len(ids)]], "multi_hop"
        pairs.append(
            {
                "question": sentence.rstrip(".!?") + "?",
                "answer": sentence,
                "query_type": qtype,
                "reasoning_type": REASONING[i % len(REASONING)],
                "complexity": 3,
                "segment_ids": seg_ids,
            }
        )
    return pairs


class OpenAIStub:
    """The scripted server. Use as a context manager; ``base_url`` ends with ``/v1``."""

    def __init__(
        self,
        required_key: str | None = None,
        served_models: list[str] | None = None,
        strict_models: bool = False,
        context_length: int | None = None,
        context_style: str = "openai",
    ) -> None:
        """Create (not start) the server.

        Args:
            required_key: When set, requests without ``Authorization: Bearer <required_key>`` get HTTP 401.
            served_models: What ``GET /v1/models`` lists (``None``: the route answers 404).
            strict_models: Answer 404 for a model not in ``served_models`` (like vLLM and OpenAI); otherwise
                any model name is answered (like llama.cpp).
            context_length: Reject requests that do not fit this many "tokens" (words) with HTTP 400.
            context_style: ``"openai"`` (prompt + max_tokens must fit) or ``"llama_cpp"`` (the prompt must
                fit; max_tokens is clamped to the rest).
        """
        self.required_key = required_key
        self.served_models = served_models
        self.strict_models = strict_models
        self.context_length = context_length
        self.context_style = context_style
        self.calls: list[CallRecord] = []
        self.checks: list[CallRecord] = []
        self.model_list_requests = 0
        self.faults: list[Fault] = []
        self.fail_after: int | None = None
        self.qa_builder: Callable[[dict[int, str], int], list[dict[str, Any]]] = default_qa
        self.judge_overall: Callable[[str], float] = lambda question: 8.0
        self._ok = 0
        self._refs: dict[int, tuple[str, str, dict[int, str]]] = {}  # ref -> (good answer, prompt, segments)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub._handle(self)

            def do_GET(self) -> None:
                stub._handle_get(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------ counting

    def count(self, step: str | None = None, repair: bool | None = None, status: int | None = None) -> int:
        """Number of SDG requests received (not the model-name probe), optionally for one step / repair
        flag / answered status."""
        with self._lock:
            return sum(
                1
                for c in self.calls
                if (step is None or c.step == step)
                and (repair is None or c.repair == repair)
                and (status is None or c.status == status)
            )

    def calls_with_text(self, text: str) -> list[CallRecord]:
        """Requests whose prompt contained ``text`` in one of its segments."""
        with self._lock:
            return [c for c in self.calls if any(text in s for s in c.segments)]

    def reset(self) -> None:
        """Forget recorded calls, faults and ``fail_after``."""
        with self._lock:
            self.calls.clear()
            self.checks.clear()
            self.faults.clear()
            self.fail_after = None
            self.model_list_requests = 0
            self._ok = 0

    # ------------------------------------------------------------------ request handling

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        auth = h.headers.get("Authorization", "")
        if self.required_key is not None and auth != f"Bearer {self.required_key}":
            self._send(h, 401, {"error": {"message": "invalid API key"}})
            return False
        return True

    def _handle_get(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") != "/v1/models":
            self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        with self._lock:
            self.model_list_requests += 1
        if not self._authorized(h):
            return
        if self.served_models is None:
            self._send(h, 404, {"detail": "Not Found"})
            return
        data = [{"id": m, "object": "model", "owned_by": "stub"} for m in self.served_models]
        self._send(h, 200, {"object": "list", "data": data})

    def _unknown_model(self, model: str) -> bool:
        return self.strict_models and model not in (self.served_models or [])

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") != "/v1/chat/completions":
            self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        messages = body.get("messages", [])
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        first, last = (users[0], users[-1]) if users else ("", "")
        auth = h.headers.get("Authorization", "")
        model = str(body.get("model"))
        if MODEL_CHECK_PROMPT in first:
            self._handle_check(h, body, auth, model)
            return
        step_match = _TASK.search(first)
        step = step_match.group(1) if step_match else "unknown"
        repair = "REPAIR of TASK" in last
        segments = {int(m.group(1)): m.group(2).strip() for m in _SEGMENT.finditer(first)}
        match_text, good = first, None
        if repair:
            ref = _REF.search(last)
            with self._lock:
                known = self._refs.get(int(ref.group(1))) if ref else None
            if known is not None:
                good, match_text, segments = known
        with self._lock:
            fault = next((f for f in self.faults if f.applies(step, repair, match_text)), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
            failing = self.fail_after is not None and self._ok >= self.fail_after
            if not failing:
                self._ok += 1  # counted on receipt, so concurrent requests cannot overshoot fail_after
            record = CallRecord(
                step, repair, list(segments.values()), 200, auth, model, time.monotonic(), body=body
            )
            record.fault = fault.kind if fault else ("fail_after" if failing else "")
            self.calls.append(record)
        try:
            self._answer(h, body, record, fault, failing, first, segments, good)
        finally:
            record.ended_at = record.ended_at or time.monotonic()

    def _handle_check(self, h: BaseHTTPRequestHandler, body: dict[str, Any], auth: str, model: str) -> None:
        record = CallRecord("model_check", False, [], 200, auth, model, time.monotonic(), body=body)
        with self._lock:
            self.checks.append(record)
        if not self._authorized(h):
            record.status = 401
            return
        if self._unknown_model(model):
            record.status = 404
            self._send(h, 404, {"error": {"message": f"The model `{model}` does not exist."}})
            return
        self._send(h, 200, self._completion(body, "OK", "length"))

    def _answer(
        self,
        h: BaseHTTPRequestHandler,
        body: dict[str, Any],
        record: CallRecord,
        fault: Fault | None,
        failing: bool,
        first: str,
        segments: dict[int, str],
        good: str | None,
    ) -> None:
        if not self._authorized(h):
            record.status = 401
            return
        if self._unknown_model(record.model):
            record.status = 404
            self._send(h, 404, {"error": {"message": f"The model `{record.model}` does not exist."}})
            return
        if failing:
            record.status = 500
            self._send(h, 500, {"error": {"message": "scripted outage"}})
            return
        if fault is not None and fault.kind == "status":
            record.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            message = (
                fault.body.replace("{auth}", record.authorization)
                if fault.body
                else f"scripted {fault.status}"
            )
            self._send(h, fault.status, {"error": {"message": message}}, headers)
            return
        overflow = self._overflow(body)
        if overflow is not None and body.get("stream") and self.context_style == "llama_cpp":
            self._start_stream(h)  # llama-cpp-python: the stream has started; the error ends it, silently
            record.fault = "empty_stream"
            return
        if overflow is not None:
            record.status = 400
            self._send(h, 400, overflow)
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if fault is not None and fault.kind == "envelope":
            self._send_raw(h, 200, b"<html>not json</html>", {})
            return
        if fault is not None and fault.kind == "endless":
            self._endless(h, body, record, fault)
            return
        if good is not None and fault is None:
            content = good  # a repair of a faulty answer: what it should have been
        elif record.repair and good is None and fault is None:
            content = "I do not know which answer you mean."
        else:
            content = self._content(record.step, first, segments, fault)
        limit = body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit > 0 and len(content.split(" ")) > limit:
            content, finish = " ".join(content.split(" ")[:limit]), "length"
        if body.get("stream"):
            self._stream(h, body, record, content, "" if fault and fault.kind == "interrupt" else finish)
        else:
            self._send(h, 200, self._completion(body, content, finish))

    def _prompt_tokens(self, body: dict[str, Any]) -> int:
        return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))

    def _overflow(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The 400 body of a request that does not fit ``context_length`` (``None`` when it fits)."""
        if self.context_length is None:
            return None
        prompt = self._prompt_tokens(body)
        completion = int(body.get("max_tokens") or 0)
        fits = prompt < self.context_length
        if self.context_style == "openai":
            fits = prompt + completion <= self.context_length
        if fits:
            return None
        message = (
            f"This model's maximum context length is {self.context_length} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }

    def _content(self, step: str, prompt: str, segments: dict[int, str], fault: Fault | None) -> str:
        if fault is not None and fault.kind in ("malformed", "garbage", "schema"):
            good = self._content(step, prompt, segments, None) if segments or step == "quality_judge" else ""
            with self._lock:
                ref = len(self._refs) + 1
                self._refs[ref] = (good, prompt, segments)
            if fault.kind == "malformed":
                return f'```json\n{{"pairs": [{{"question": "unterminated <stub-ref {ref}>'
            if fault.kind == "garbage":
                return f"I am sorry, I cannot produce that. <stub-ref {ref}>"
            return json.dumps({"pairs": [{"question": 5}], "evaluations": "none", "ref": f"<stub-ref {ref}>"})
        if step == "artifact_extraction":
            return json.dumps(self._artifacts(segments))
        if step == "qa_generation":
            found = _NUM_PAIRS.search(prompt)
            n = int(found.group(1)) if found else 3
            return "<think>planning the questions</think>\n" + json.dumps(
                {"pairs": self.qa_builder(segments, n)}
            )
        if step == "quality_judge":
            evaluations = []
            for m in _PAIR.finditer(prompt):
                overall = float(self.judge_overall(m.group(2)))
                scores = dict.fromkeys(("relevance", "accuracy", "context_support", "clarity"), 8)
                evaluations.append({"pair_id": int(m.group(1)), **scores, "overall": overall})
            return f"```json\n{json.dumps({'evaluations': evaluations})}\n```"
        return json.dumps({"error": "unknown task"})

    @staticmethod
    def _artifacts(segments: dict[int, str]) -> dict[str, Any]:
        names = (
            "key_concepts",
            "relationships",
            "themes",
            "entities",
            "processes",
            "insights",
            "technical_terms",
            "contextual_factors",
        )
        out: dict[str, Any] = {name: [] for name in names}
        out["key_concepts"] = [
            {"text": " ".join(text.split()[:6]), "description": "opening of a segment", "importance": "high"}
            for text in segments.values()
        ]
        return out

    def _usage(self, body: dict[str, Any], content: str) -> dict[str, int]:
        prompt_tokens, completion_tokens = self._prompt_tokens(body), len(content.split())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _completion(self, body: dict[str, Any], content: str, finish: str = "stop") -> dict[str, Any]:
        return {
            "id": f"chatcmpl-stub-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
            ],
            "usage": self._usage(body, content),
        }

    # ------------------------------------------------------------------ streaming

    @staticmethod
    def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    @staticmethod
    def _start_stream(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

    @staticmethod
    def _event(h: BaseHTTPRequestHandler, data: Any) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        h.wfile.write(f"data: {text}\n\n".encode())
        h.wfile.flush()

    def _stream(
        self, h: BaseHTTPRequestHandler, body: dict[str, Any], record: CallRecord, content: str, finish: str
    ) -> None:
        """SSE: role, the content in a few pieces, the finish_reason, usage if asked, ``[DONE]``."""
        try:
            self._start_stream(h)
            self._event(h, self._chunk(body, {"role": "assistant", "content": ""}))
            step = max(1, len(content) // 4)
            for i in range(0, len(content), step):
                self._event(h, self._chunk(body, {"content": content[i : i + step]}))
            if finish:
                self._event(h, self._chunk(body, {}, finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                self._event(h, {**self._chunk(body, {}), "choices": [], "usage": self._usage(body, content)})
            self._event(h, "[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            record.client_left = True

    def _endless(
        self, h: BaseHTTPRequestHandler, body: dict[str, Any], record: CallRecord, fault: Fault
    ) -> None:
        """Generate one word per ``delay_s`` for ``duration_s`` (a model that rambles until its context is full)."""
        deadline = time.monotonic() + fault.duration_s
        streamed = bool(body.get("stream"))
        try:
            if streamed:
                self._start_stream(h)
            while time.monotonic() < deadline:
                time.sleep(fault.delay_s)
                record.words_generated += 1
                if streamed:  # a streaming server notices the client is gone at its next write
                    self._event(h, self._chunk(body, {"content": "and "}))
            record.ended_at = time.monotonic()
            if not streamed:
                self._send(h, 200, self._completion(body, "and " * record.words_generated))
        except (BrokenPipeError, ConnectionResetError):
            record.client_left = True
            record.ended_at = time.monotonic()

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict[str, str] | None = None
    ) -> None:
        self._send_raw(h, status, json.dumps(obj).encode(), headers or {})

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str]) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)
