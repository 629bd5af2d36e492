"""schemathesis hooks for the server's contract test (loaded through ``SCHEMATHESIS_HOOKS``).

schemathesis' own ``positive_data_acceptance`` wants every schema-valid request answered 2xx (or 401, 403,
404, 409, 429, 5xx). The embedding API has refusals a JSON schema cannot express because they depend on
tokenization: a text with no tokens (``"\\u0013"``) or one longer than the model's window with
``truncate="NONE"``. ``positive_data_acceptance_after_tokenization`` replaces that check with the same rule
plus exactly those documented exceptions: a 400 whose error code is ``empty_input`` or ``input_too_long``,
or a 413 ``too_many_tokens``. Any other 4xx for schema-valid data fails, as before.
"""

from __future__ import annotations

from typing import Any

import schemathesis

ALLOWED = {
    200: None,
    401: None,
    404: None,
    429: None,
    400: {"empty_input", "input_too_long"},
    413: {"too_many_tokens"},
}


@schemathesis.check
def positive_data_acceptance_after_tokenization(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status not in ALLOWED:
        raise AssertionError(f"schema-valid request answered {status}: {response.text[:300]}")
    codes = ALLOWED[status]
    if codes is not None:
        code = (response.json().get("error") or {}).get("code")
        if code not in codes:
            raise AssertionError(f"schema-valid request answered {status} {code!r}: {response.text[:300]}")
    return None
