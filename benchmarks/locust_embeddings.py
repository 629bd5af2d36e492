"""Locust load for ``benchmarks/serve.py``: closed-loop users POSTing prepared embedding requests.

Run by serve.py in its own virtual environment (``benchmarks/.work/locust-venv``), e.g.::

    EMB_BODIES=bodies.json EMB_PATH=/v1/embeddings EMB_OUT=out.json \\
        locust -f benchmarks/locust_embeddings.py --headless -u 16 -r 16 -t 20s -H http://127.0.0.1:8000

``EMB_BODIES`` is a JSON list of request bodies (each user takes the next one, round robin); with
``EMB_TOTAL=N`` exactly N requests are sent and the test ends with the last answer. At the end the
file ``EMB_OUT`` gets every answered request's start and end (monotonic seconds, from the test's start) and
text count, and the failures; serve.py derives throughput and exact percentiles from them (locust's own
percentiles are rounded).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, events, task
from locust.exception import StopUser

_BODIES = [
    json.dumps(b).encode() for b in json.loads(Path(os.environ["EMB_BODIES"]).read_text(encoding="utf-8"))
]
_TEXTS = [len(json.loads(b)["input"]) for b in _BODIES]
_NEXT = itertools.count()
_PATH = os.environ.get("EMB_PATH", "/v1/embeddings")
_TOTAL = int(os.environ.get("EMB_TOTAL", "0"))  # > 0: send exactly this many requests, then quit
_DONE = itertools.count(1)
_START = time.monotonic()
_RECORD: dict[str, list] = {"texts": [], "failures": [], "window": []}


class EmbeddingUser(FastHttpUser):
    """One client: sends the next body as soon as the previous answer arrived (no think time)."""

    network_timeout = 900.0  # a loaded 2-core machine can take minutes for a long request: wait, do not fail
    connection_timeout = 60.0

    def wait_time(self) -> float:
        return 0.0

    @task
    def embed(self) -> None:
        n = next(_NEXT)
        if _TOTAL and n >= _TOTAL:
            raise StopUser()
        i = n % len(_BODIES)
        start = time.monotonic()
        with self.client.post(
            _PATH, data=_BODIES[i], headers={"content-type": "application/json"}, catch_response=True
        ) as resp:
            end = time.monotonic()
            ok = resp.status_code == 200 and b'"embedding"' in (resp.content or b"")
            if not ok:
                resp.failure(f"{resp.status_code}")
            if ok:
                _RECORD["texts"].append(_TEXTS[i])
                _RECORD["window"].append([start - _START, end - _START])
            else:
                _RECORD["failures"].append(resp.status_code)
        if _TOTAL and next(_DONE) == _TOTAL:  # the last answer of a fixed amount of work
            gevent.spawn(self.environment.runner.quit)  # not from this user's greenlet: quit() joins it


@events.test_stop.add_listener
def _write(**_: object) -> None:
    with open(os.environ["EMB_OUT"], "w", encoding="utf-8") as out:
        json.dump(_RECORD, out)
