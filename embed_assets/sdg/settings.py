"""The one settings schema of synthetic QA generation (every generator, every option), Dagster-free.

The Dagster run config of ``synthetic_qa`` is this model itself (``class SDGConfig(SDGSettings, dg.Config)``),
so no option is mirrored by hand: what the launchpad shows, validates and documents is this class. The LLM
*connection* (base URL, model, API key) is not here: it belongs to the ``llm`` resource and reaches the
generator as an :class:`embed_assets.sdg.llm.LLMEndpoint`.

Options prefixed ``llm:`` in their description only matter for ``generator="llm"``, ``inverse_cloze:`` only
for the offline generator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GeneratorName = Literal["inverse_cloze", "llm", "user_data"]
#: The kinds of offline pseudo-query (``offline_queries``; see :mod:`embed_assets.sdg.offline`).
OFFLINE_QUERY_KINDS = ("inverse_cloze", "keywords", "titles")

#: The LLM steps, in order, and the setting that caps each one's completion.
MAX_TOKENS_FIELDS: dict[str, str] = {
    "artifact_extraction": "max_tokens_extraction",
    "qa_generation": "max_tokens_qa",
    "quality_judge": "max_tokens_judge",
}


class SDGSettings(BaseModel):
    """Every option of the ``synthetic_qa`` stage (flat, so it is also the Dagster run config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ------------------------------------------------------------------ which generator
    generator: GeneratorName = Field(
        default="inverse_cloze",
        description="'inverse_cloze' (offline default, no LLM), 'llm' (OpenAI-compatible endpoint of the "
        "llm resource) or 'user_data' (bring your own pairs from user_data_path).",
    )
    user_data_path: str = Field(
        default="", description="For generator='user_data': Question,Answer CSV, pairs JSONL or triplets."
    )
    corpus_queries_per_pair: float = Field(
        default=0.0,
        ge=0,
        description="user_data: also train on offline pseudo-queries (offline_queries) of the corpus, up to this "
        "many per pair of yours (0: off), so passages your pairs do not cover train too. They only train: "
        "validation, test and every choice made on them use your pairs alone.",
    )

    # ------------------------------------------------------------------ inverse cloze (offline)
    queries_per_chunk: int = Field(default=2, ge=1, description="inverse_cloze: pseudo-queries per passage.")
    min_query_words: int = Field(default=6, ge=1, description="inverse_cloze: shortest usable sentence.")
    max_query_words: int = Field(default=16, ge=3, description="inverse_cloze: queries are cropped to this.")
    seed: int = Field(default=42, description="inverse_cloze: seed of the offline generator.")
    # list[str] with a validator: Dagster's config schema cannot express a list of Literal values.
    offline_queries: list[str] = Field(
        default=["inverse_cloze"],
        min_length=1,
        description="inverse_cloze: the mixture of offline queries: 'inverse_cloze' (cropped sentences), "
        "'keywords' (a passage's most salient terms against the corpus), 'titles' (section headings and BEIR "
        "titles -> the section's first passage); deduplicated per document.",
    )
    keyword_terms: int = Field(default=4, ge=2, le=16, description="inverse_cloze: terms per keyword query.")
    cloze_mask_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="inverse_cloze: share of cloze queries trained with their sentence cut out of the positive "
        "passage (Lee et al. 2019 pre-train with 0.9). Off by default: fine-tuning a pre-trained model on a few "
        "hundred pseudo-queries, 0.9 cost 1.0-1.4 nDCG@10 points on real test questions (benchmarks/RESULTS.md).",
    )

    # ------------------------------------------------------------------ LLM: what is generated
    num_pairs: int = Field(default=7, ge=1, description="llm: QA pairs asked per bundle.")
    max_artifacts_per_type: int = Field(
        default=2, ge=1, description="llm: artifacts kept per type (artifact extraction)."
    )
    bundle_size: int = Field(
        default=4,
        ge=1,
        description="llm: consecutive chunks of one document per prompt (3 requests each). A bundle whose "
        "prompt overflows the server's context is split in halves automatically.",
    )
    min_complexity: int = Field(
        default=2, ge=1, le=5, description="llm: pairs below this complexity (1-5) are dropped."
    )
    quality_threshold: float = Field(
        default=7.0, ge=0, le=10, description="llm: judge 'overall' score (1-10) needed to keep a pair."
    )
    dedup_threshold: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="llm: question cosine above this = duplicate (within a document); 1.0 disables dedup.",
    )
    dedup_model: str = Field(
        default="",
        description="llm: embedding model for dedup. Empty: the base model being adapted "
        "(the model resource), else the bundled all-MiniLM-L6-v2.",
    )

    # ------------------------------------------------------------------ LLM: models and sampling
    extraction_model: str = Field(
        default="", description="llm: model for artifact extraction (empty: the llm resource's model)."
    )
    qa_model: str = Field(
        default="", description="llm: model for QA generation (empty: the llm resource's model)."
    )
    judge_model: str = Field(
        default="", description="llm: model for the quality judge (empty: the llm resource's model)."
    )
    temperature: float = Field(default=0.6, ge=0, le=2, description="llm: sampling temperature.")
    top_p: float = Field(default=0.95, gt=0, le=1, description="llm: nucleus sampling.")
    max_tokens_extraction: int = Field(
        default=1536,
        ge=0,
        description="llm: completion budget (max_tokens) of artifact extraction; 0 = the server's default. "
        "Shrunk automatically when the server reports a context overflow.",
    )
    max_tokens_qa: int = Field(
        default=2048, ge=0, description="llm: completion budget of QA generation; 0 = the server's default."
    )
    max_tokens_judge: int = Field(
        default=1024,
        ge=0,
        description="llm: completion budget of the quality judge (and of repair requests of each step: "
        "they use their step's budget); 0 = the server's default.",
    )
    json_mode: bool = Field(
        default=False,
        description="llm: send response_format={'type': 'json_object'} (vLLM, Ollama, llama.cpp, OpenAI): "
        "the server constrains the answer to JSON; helps small local models. Off for endpoints that reject it.",
    )
    system_prompt_as_user: bool = Field(
        default=False,
        description="llm: put the system prompt at the top of the user message instead of a 'system' "
        "message, for chat templates that drop system messages (Gemma's, llama.cpp --chat_format gemma).",
    )
    system_suffix: str = Field(
        default="/no_think",
        description="llm: appended to the system prompt; '/no_think' turns off long reasoning on Nemotron "
        "and Qwen3 models ('' for models it confuses).",
    )
    repair_excerpt_chars: int = Field(
        default=1200,
        ge=200,
        description="llm: how much of an invalid answer the repair request quotes (start and end). The "
        "repair request is the error plus this excerpt and the schema, never the whole conversation again.",
    )

    # ------------------------------------------------------------------ LLM: transport
    stream: bool = Field(
        default=True,
        description="llm: stream answers (SSE), so a client timeout closes the connection and the server "
        "stops generating.",
    )
    timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="llm: longest a request may take (seconds); a stream silent this long also ends it.",
    )
    max_parallel_requests: int = Field(
        default=4,
        ge=1,
        description="llm: concurrent requests (match the server's parallel slots: llama.cpp --parallel, "
        "OLLAMA_NUM_PARALLEL, vLLM batch).",
    )
    max_retries: int = Field(
        default=5, ge=0, description="llm: retries on 429/5xx/timeouts (exponential backoff)."
    )
    backoff_base_s: float = Field(default=1.0, ge=0, description="llm: first backoff wait (seconds).")
    backoff_max_s: float = Field(default=60.0, ge=0, description="llm: longest backoff wait (seconds).")
    check_model: bool = Field(
        default=True,
        description="llm: at start, GET /v1/models to check the configured models are served (fails "
        "naming the served ones) and send one 1-token request for a non-existent model to warn when the "
        "server ignores model names.",
    )

    # ------------------------------------------------------------------ cost estimate
    usd_per_1m_prompt_tokens: float = Field(
        default=0.0, ge=0, description="llm: price per million prompt tokens, for the cost estimate."
    )
    usd_per_1m_completion_tokens: float = Field(
        default=0.0, ge=0, description="llm: price per million completion tokens, for the cost estimate."
    )

    @field_validator("offline_queries")
    @classmethod
    def _known_query_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in OFFLINE_QUERY_KINDS]
        if unknown:
            raise ValueError(
                f"unknown offline query kind(s) {unknown}; choose from {list(OFFLINE_QUERY_KINDS)}"
            )
        return list(dict.fromkeys(kinds))

    @model_validator(mode="after")
    def _user_data_needs_path(self) -> SDGSettings:
        if self.generator == "user_data" and not self.user_data_path:
            raise ValueError("generator='user_data' needs user_data_path (CSV or JSONL of your pairs)")
        return self

    def max_tokens_for(self, step: str) -> int:
        """The completion budget of ``step`` (0: let the server decide).

        Args:
            step: One of the keys of :data:`MAX_TOKENS_FIELDS`.

        Returns:
            The configured ``max_tokens``.
        """
        return int(getattr(self, MAX_TOKENS_FIELDS[step]))

    def estimated_cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost of the given token counts at the configured prices (rounded to 4 decimals)."""
        return round(
            prompt_tokens * self.usd_per_1m_prompt_tokens / 1e6
            + completion_tokens * self.usd_per_1m_completion_tokens / 1e6,
            4,
        )
