"""The LLM answers as pydantic models: the JSON schema in the prompts, typed answers, readable errors.

Validation is strict (a ``"3"`` is not an integer, ``true`` is not a number) and every error names where it
is, e.g. ``pairs[2].segment_ids[0]: Input should be a valid integer (got string '1')``, so it can be sent back
to the model in the repair request and shown as a drop reason. Unknown fields are ignored.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

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

QueryType = Literal["multi_hop", "structural", "contextual"]
ReasoningType = Literal[
    "factual", "relational", "inferential", "temporal", "procedural", "causal", "comparative", "analytical"
]
QUERY_TYPES: tuple[str, ...] = QueryType.__args__
REASONING_TYPES: tuple[str, ...] = ReasoningType.__args__
JUDGE_CRITERIA: tuple[str, ...] = ("relevance", "accuracy", "context_support", "clarity", "overall")

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Score = Annotated[float, Field(ge=1, le=10)]


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Artifact(_Answer):
    text: NonEmpty
    description: str
    importance: Literal["high", "medium", "low"]


class ExtractionAnswer(_Answer):
    """Step 1: up to ``max_artifacts_per_type`` artifacts per category."""

    key_concepts: list[Artifact]
    relationships: list[Artifact]
    themes: list[Artifact]
    entities: list[Artifact]
    processes: list[Artifact]
    insights: list[Artifact]
    technical_terms: list[Artifact]
    contextual_factors: list[Artifact]


class QAPair(_Answer):
    question: NonEmpty
    answer: NonEmpty
    query_type: QueryType
    reasoning_type: ReasoningType
    complexity: int = Field(ge=1, le=5)
    segment_ids: list[int] = Field(min_length=1)


class QAAnswer(_Answer):
    """Step 2: the question-answer pairs."""

    pairs: list[QAPair] = Field(min_length=1)


class Evaluation(_Answer):
    pair_id: int = Field(ge=1)
    relevance: Score
    accuracy: Score
    context_support: Score
    clarity: Score
    overall: Score


class JudgeAnswer(_Answer):
    """Step 3: one evaluation per pair."""

    evaluations: list[Evaluation]


#: Step name -> model of its answer.
SCHEMAS: dict[str, type[_Answer]] = {
    "artifact_extraction": ExtractionAnswer,
    "qa_generation": QAAnswer,
    "quality_judge": JudgeAnswer,
}


class AnswerError(ValueError):
    """An LLM answer that is not parseable JSON or does not match its schema."""


@cache
def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema without titles and docstrings (noise in a prompt); shared parts stay ``$defs``."""

    def clean(node: Any) -> Any:
        if isinstance(node, list):
            return [clean(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in ("title", "description"):
                continue
            # under these keys the dict keys are names (a field may be called "description"), not keywords
            named = key in ("properties", "$defs")
            out[key] = {k: clean(v) for k, v in value.items()} if named else clean(value)
        return out

    return clean(model.model_json_schema())


def schema_text(model: type[BaseModel]) -> str:
    """Compact JSON rendering of a model's schema for prompts."""
    return json.dumps(json_schema(model), separators=(",", ":"))


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(the answer)"


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def describe_errors(error: ValidationError, limit: int = 8) -> list[str]:
    """One line per violation: ``location: message (got <type> <value>)``, at most ``limit`` lines."""
    lines = []
    for e in error.errors(include_url=False)[:limit]:
        line = f"{_location(tuple(e['loc']))}: {e['msg']}"
        if e["type"] != "missing":
            value = e.get("input")
            shown = repr(value) if not isinstance(value, (dict, list)) else ""
            shown = shown if len(shown) <= 40 else shown[:39] + "…"
            line += f" (got {_type_name(value)}{' ' + shown if shown else ''})"
        lines.append(line)
    extra = error.error_count() - limit
    if extra > 0:
        lines.append(f"... and {extra} more")
    return lines


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


def validate_answer(value: Any, model: type[_Answer]) -> _Answer:
    """Validate a decoded value against a step's model.

    Args:
        value: The decoded JSON value (or a cached ``model_dump``).
        model: One of :data:`SCHEMAS`' values.

    Returns:
        The typed answer.

    Raises:
        AnswerError: The value does not match (the message lists the violations with their locations).
    """
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise AnswerError("the JSON does not match the schema: " + "; ".join(describe_errors(e, 5))) from None


def parse_answer(text: str, model: type[_Answer]) -> _Answer:
    """Decode and validate one answer.

    Args:
        text: The assistant message content.
        model: The model the answer must satisfy.

    Returns:
        The typed answer.

    Raises:
        AnswerError: Not JSON, or not matching ``model``.
    """
    return validate_answer(extract_json(text), model)
