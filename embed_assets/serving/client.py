"""A small client for any NIM-compatible ``/v1/embeddings`` endpoint (ours or NVIDIA's NIM container)."""

from __future__ import annotations

import numpy as np


class EndpointEncoder:
    """Encode texts through a remote endpoint, batching requests.

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8000``.
        model: Model id to request (default: the first one ``/v1/models`` lists).
        api_key: Optional bearer token.
        truncate: ``"END"`` so long passages are cut like the local model cuts them.
        batch_size: Inputs per request.
        timeout_s: Per-request timeout.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        truncate: str = "END",
        batch_size: int = 64,
        timeout_s: float = 120.0,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model = model or self._client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        self.truncate = truncate
        self.batch_size = batch_size

    def encode(self, texts: list[str], input_type: str = "query") -> np.ndarray:
        """Embeddings in input order (float32)."""
        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            resp = self._client.post(
                "/v1/embeddings",
                json={
                    "input": texts[start : start + self.batch_size],
                    "model": self.model,
                    "input_type": input_type,
                    "truncate": self.truncate,
                },
            )
            if resp.status_code != 200:
                raise RuntimeError(f"{resp.request.url} answered {resp.status_code}: {resp.text[:500]}")
            data = sorted(resp.json()["data"], key=lambda d: d["index"])
            out.extend(d["embedding"] for d in data)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def close(self) -> None:
        self._client.close()
