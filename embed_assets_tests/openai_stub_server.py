"""A scripted OpenAI-compatible chat-completions server on loopback, for tests of the LLM generator.

It is a real HTTP server (``http.server`` in a thread, free port on 127.0.0.1) answering
``POST /v1/chat/completions``. It recognizes the SDG step from the ``TASK: <step>`` line of the prompt, reads the
``[Segment N]`` blocks it was sent and answers with schema-valid JSON built from them:

- artifact extraction: a few artifacts quoted from the segments,
- QA generation: questions made from the segments' sentences (round robin over the segments, every third pair
  multi-hop when several segments are given), via the replaceable ``qa_builder``,
- quality judge: scores for every ``[Pair k]``, ``overall`` from the replaceable ``judge_overall(question)``.

Faults are scripted with :class:`Fault` (malformed JSON, garbage, schema violations, HTTP statuses with
``Retry-After``, slow answers, broken envelopes), and ``fail_after`` turns every request after the first N
into a 500 (an outage). Every request is recorded (:class:`CallRecord`) so tests can count calls per step and
per segment text.
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


@dataclass
class Fault:
    """One scripted misbehaviour, applied to the next matching requests.

    Attributes:
        kind: ``"malformed"`` (truncated JSON), ``"garbage"`` (prose), ``"schema"`` (JSON violating the
            schema), ``"status"`` (HTTP ``status``, optional ``retry_after`` header), ``"slow"`` (sleep
            ``delay_s`` then answer normally), ``"envelope"`` (200 with a non-JSON body).
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

    def __init__(self, required_key: str | None = None) -> None:
        """Create (not start) the server.

        Args:
            required_key: When set, requests without ``Authorization: Bearer <required_key>`` get HTTP 401.
        """
        self.required_key = required_key
        self.calls: list[CallRecord] = []
        self.faults: list[Fault] = []
        self.fail_after: int | None = None
        self.qa_builder: Callable[[dict[int, str], int], list[dict[str, Any]]] = default_qa
        self.judge_overall: Callable[[str], float] = lambda question: 8.0
        self._ok = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> OpenAIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub._handle(self)

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
        """Number of requests received, optionally for one step / repair flag / answered status."""
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
            self.faults.clear()
            self.fail_after = None
            self._ok = 0

    # ------------------------------------------------------------------ request handling

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") != "/v1/chat/completions":
            self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        messages = body.get("messages", [])
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        first, last = (users[0], users[-1]) if users else ("", "")
        step_match = _TASK.search(first)
        step = step_match.group(1) if step_match else "unknown"
        repair = last.startswith("REPAIR")
        segments = {int(m.group(1)): m.group(2).strip() for m in _SEGMENT.finditer(first)}
        auth = h.headers.get("Authorization", "")
        with self._lock:
            fault = next((f for f in self.faults if f.applies(step, repair, first)), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
            failing = self.fail_after is not None and self._ok >= self.fail_after
            if not failing:
                self._ok += 1  # counted on receipt, so concurrent requests cannot overshoot fail_after
            record = CallRecord(
                step,
                repair,
                list(segments.values()),
                200,
                auth,
                str(body.get("model")),
                time.monotonic(),
                body=body,
            )
            record.fault = fault.kind if fault else ("fail_after" if failing else "")
            self.calls.append(record)
        if self.required_key is not None and auth != f"Bearer {self.required_key}":
            record.status = 401
            self._send(h, 401, {"error": {"message": "invalid API key"}})
            return
        if failing:
            record.status = 500
            self._send(h, 500, {"error": {"message": "scripted outage"}})
            return
        if fault is not None and fault.kind == "status":
            record.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            message = fault.body.replace("{auth}", auth) if fault.body else f"scripted {fault.status}"
            self._send(h, fault.status, {"error": {"message": message}}, headers)
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if fault is not None and fault.kind == "envelope":
            self._send_raw(h, 200, b"<html>not json</html>", {})
            return
        content = self._content(step, first, segments, fault)
        self._send(h, 200, self._completion(body, content))

    def _content(self, step: str, prompt: str, segments: dict[int, str], fault: Fault | None) -> str:
        if fault is not None and fault.kind == "malformed":
            return '```json\n{"pairs": [{"question": "unterminated'
        if fault is not None and fault.kind == "garbage":
            return "I am sorry, I cannot produce that."
        if fault is not None and fault.kind == "schema":
            return json.dumps({"pairs": [{"question": 5}], "evaluations": "none"})
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

    @staticmethod
    def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_tokens = len(content.split())
        return {
            "id": f"chatcmpl-stub-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

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
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)
