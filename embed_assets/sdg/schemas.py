"""JSON schemas of the LLM answers and a small, dependency-free validator for them.

The validator covers the subset of JSON Schema the SDG answers need (``type``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``minItems``, ``maxItems``, ``enum``, ``minimum``, ``maximum``,
``minLength``). Every error names the JSON path of the offending value, e.g.
``$.pairs[2].segment_ids: expected array, got string``, so it can be sent back to the model verbatim in the
repair request.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Artifact categories extracted in step 1 (DESIGN §2).
ARTIFACT_TYPES: tuple[str, ...] = (
    "key_concepts",
    "relationships",
    "themes",
    "entities",
    "processes",
    "insights",
    "technical_terms",
    "contextual_factors",
)

QUERY_TYPES: tuple[str, ...] = ("multi_hop", "structural", "contextual")

REASONING_TYPES: tuple[str, ...] = (
    "factual",
    "relational",
    "inferential",
    "temporal",
    "procedural",
    "causal",
    "comparative",
    "analytical",
)

JUDGE_CRITERIA: tuple[str, ...] = ("relevance", "accuracy", "context_support", "clarity", "overall")

_ARTIFACT: dict[str, Any] = {
    "type": "object",
    "required": ["text", "description", "importance"],
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "importance": {"type": "string", "enum": ["high", "medium", "low"]},
    },
}

EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": list(ARTIFACT_TYPES),
    "properties": {name: {"type": "array", "items": _ARTIFACT} for name in ARTIFACT_TYPES},
}

QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["pairs"],
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "question",
                    "answer",
                    "query_type",
                    "reasoning_type",
                    "complexity",
                    "segment_ids",
                ],
                "properties": {
                    "question": {"type": "string", "minLength": 1},
                    "answer": {"type": "string", "minLength": 1},
                    "query_type": {"type": "string", "enum": list(QUERY_TYPES)},
                    "reasoning_type": {"type": "string", "enum": list(REASONING_TYPES)},
                    "complexity": {"type": "integer", "minimum": 1, "maximum": 5},
                    "segment_ids": {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                },
            },
        }
    },
}

_SCORE: dict[str, Any] = {"type": "number", "minimum": 1, "maximum": 10}

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["evaluations"],
    "properties": {
        "evaluations": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pair_id", *JUDGE_CRITERIA],
                "properties": {
                    "pair_id": {"type": "integer", "minimum": 1},
                    **{c: _SCORE for c in JUDGE_CRITERIA},
                },
            },
        }
    },
}

#: Step name -> schema of its answer.
SCHEMAS: dict[str, dict[str, Any]] = {
    "artifact_extraction": EXTRACTION_SCHEMA,
    "qa_generation": QA_SCHEMA,
    "quality_judge": JUDGE_SCHEMA,
}

_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


class AnswerError(ValueError):
    """An LLM answer that is not parseable JSON or does not match its schema."""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _has_type(value: Any, expected: str) -> bool:
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return _type_name(value) == expected


def validate(value: Any, schema: dict[str, Any], path: str = "$", limit: int = 20) -> list[str]:
    """Validate ``value`` against a JSON-schema subset.

    Args:
        value: The decoded JSON value.
        schema: The schema (see the module docstring for the supported keywords).
        path: JSON path of ``value``, used in the error messages.
        limit: Stop after this many errors.

    Returns:
        Error messages (empty when the value is valid).
    """
    errors: list[str] = []
    _validate(value, schema, path, errors, limit)
    return errors[:limit]


def _validate(value: Any, schema: dict[str, Any], path: str, errors: list[str], limit: int) -> None:
    if len(errors) >= limit:
        return
    expected = schema.get("type")
    if expected is not None and not _has_type(value, expected):
        errors.append(f"{path}: expected {expected}, got {_type_name(value)}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and len(value.strip()) < schema.get("minLength", 0):
        errors.append(f"{path}: must not be empty")
    if _has_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, list):
        _validate_array(value, schema, path, errors, limit)
    if isinstance(value, dict):
        _validate_object(value, schema, path, errors, limit)


def _validate_array(
    value: list[Any], schema: dict[str, Any], path: str, errors: list[str], limit: int
) -> None:
    if len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: needs at least {schema['minItems']} item(s), got {len(value)}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: allows at most {schema['maxItems']} item(s), got {len(value)}")
    if "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]", errors, limit)


def _validate_object(
    value: dict[str, Any], schema: dict[str, Any], path: str, errors: list[str], limit: int
) -> None:
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{path}: missing required field '{name}'")
    for name, sub in props.items():
        if name in value:
            _validate(value[name], sub, f"{path}.{name}", errors, limit)
    if schema.get("additionalProperties") is False:
        for name in value:
            if name not in props:
                errors.append(f"{path}: unexpected field '{name}'")


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: str) -> Any:
    """Decode the JSON object in a chat answer.

    Tolerates what OpenAI-compatible servers commonly wrap around it: ``<think>`` blocks of reasoning models,
    Markdown code fences and prose before or after the object.

    Args:
        text: The assistant message content.

    Returns:
        The decoded value.

    Raises:
        AnswerError: No JSON object could be decoded.
    """
    cleaned = _THINK.sub("", text or "").strip()
    fenced = _FENCE.search(cleaned)
    if fenced:
        cleaned = fenced.group(1).strip()
    start, end = cleaned.find("{"), cleaned.rfind("}")
    if start < 0:
        raise AnswerError("the answer contains no JSON object")
    candidate = cleaned[start : end + 1] if end > start else cleaned[start:]
    try:
        return json.loads(candidate)
    except json.JSONDecodeError as e:
        hint = " (the answer looks truncated)" if end <= start else ""
        raise AnswerError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from e


def parse_answer(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    """Decode and validate one answer.

    Args:
        text: The assistant message content.
        schema: The schema the answer must satisfy.

    Returns:
        The decoded object.

    Raises:
        AnswerError: Not JSON, or not matching ``schema`` (the message lists the violations).
    """
    value = extract_json(text)
    errors = validate(value, schema)
    if errors:
        raise AnswerError("the JSON does not match the schema: " + "; ".join(errors))
    return value


def schema_text(schema: dict[str, Any]) -> str:
    """Compact JSON rendering of a schema for prompts."""
    return json.dumps(schema, separators=(",", ":"))
