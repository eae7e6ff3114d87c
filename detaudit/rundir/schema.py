"""The run directory's schema: the only place that defines what a run directory holds.

A run directory is detaudit's record of one audit, remote or local alike:

    RUN/
      manifest.json      RunManifest: what was asked, of whom, with what capture, and how it ended
      samples.parquet    one row per request (SAMPLES_SCHEMA), written when the run ends
      shards/            part-NNNNN.parquet files flushed while the run is going; folded into
                         samples.parquet at the end (a reader takes both, so a killed run stays readable)
      summary.json       the analysis (detaudit.summary/1), rewritten by `detaudit analyze`
      rescore.parquet    optional: `detaudit rescore`'s teacher-forced logprobs (RESCORE_SCHEMA), one row per
                         rescored sample, keyed by sample_index
      server.log         optional: the managed engine's output (`detaudit local --engine vllm|sglang|command`)

Nothing else belongs there: `--force` removes exactly these entries (and the temporaries of their atomic writes)
and refuses a directory holding anything else. A reader trusts a run directory only after checking it: sample
indices in [0, expected) (one row each after the read-side dedupe), statuses 'ok'/'error', prompt_id and arm as
the index formula of RunManifest.sample_index says.

Schema changes are append-only: new columns are nullable, and every bump of SCHEMA_VERSION comes with a
named migration in io.py and a fixture of the old version in tests/fixtures/.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MANIFEST_SCHEMA = f"detaudit.run/{SCHEMA_VERSION}"
SAMPLES_FILE = "samples.parquet"
SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"part-(\d+)\.parquet")  # a shard in shards/, numbered in write order
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
RESCORE_FILE = "rescore.parquet"
SERVER_LOG = "server.log"
# Every file detaudit writes at the top of a run directory (shards/ holds only part-NNNNN.parquet files).
RUN_DIR_FILES = (MANIFEST_FILE, SAMPLES_FILE, SUMMARY_FILE, RESCORE_FILE, SERVER_LOG)
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # an answer larger than this is an error row (too_large)

# Column name -> (arrow type, description). Order is the file's column order.
SAMPLE_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (pa.string(), "Run identifier, the same on every row of a run."),
    "sample_index": (pa.int64(), "Unique per run: ((prompt_pos * n_arms) + arm_pos) * repeats + repeat."),
    "prompt_id": (pa.string(), "Which prompt of the run this request sent."),
    "arm": (pa.string(), "Load arm name, e.g. 'c1' or 'c64' (remote) or a local scenario arm."),
    "concurrency": (pa.int32(), "Requests in flight allowed in this arm (local: the engine's max batch)."),
    "repeat": (pa.int32(), "0-based repeat number of this prompt within its arm."),
    "status": (pa.string(), "'ok' or 'error'. Error rows are never counted as completions."),
    "error": (pa.string(), "Why the request failed after its retries (null when ok)."),
    "attempts": (pa.int32(), "HTTP attempts made, retries included."),
    "text": (pa.string(), "The completion text (null on error)."),
    "token_ids": (pa.list_(pa.int32()), "Generated token ids, when the target returns them."),
    "tokens": (pa.list_(pa.string()), "Generated token strings, when logprobs came back."),
    "token_bytes": (pa.list_(pa.binary()), "UTF-8 bytes of each token, when the target returns them."),
    "logprobs": (pa.list_(pa.float32()), "Logprob of each generated token."),
    "top_tokens": (pa.list_(pa.list_(pa.string())), "Top-k alternative token strings per position."),
    "top_token_ids": (pa.list_(pa.list_(pa.int32())), "Top-k alternative token ids per position, when known."),
    "top_logprobs": (pa.list_(pa.list_(pa.float32())), "Top-k alternative logprobs per position."),
    "finish_reason": (pa.string(), "As reported by the target ('stop', 'length', ...)."),
    "model": (pa.string(), "Model name the target reported for this response."),
    "system_fingerprint": (pa.string(), "The target's system_fingerprint, when present."),
    "prompt_tokens": (pa.int32(), "usage.prompt_tokens, when reported."),
    "completion_tokens": (pa.int32(), "usage.completion_tokens, when reported."),
    "latency_s": (pa.float64(), "Seconds from the first attempt's send to the final response."),
    "started_at": (pa.timestamp("us", tz="UTC"), "When the first attempt was sent."),
    "finished_at": (pa.timestamp("us", tz="UTC"), "When the final response (or failure) arrived."),
    # Appended after the first release: files written before them lack these columns and read back as null.
    "error_reason": (
        pa.string(),
        "Machine-readable class of the failure: 'http:503', 'timeout', 'deadline', 'connect', 'malformed:<field>', "
        "'no_content', 'refusal', 'tool_calls', 'empty_stream', 'choice_index', 'too_large', ... (null when ok).",
    ),
    "raw_answer": (pa.string(), "The start of what the server sent on the last failed attempt, scrubbed (error rows)."),
    "cached_tokens": (
        pa.int32(),
        "Prompt tokens the target served from its prefix cache (usage.prompt_tokens_details.cached_tokens; the "
        "local engine's own count); null when the target reported nothing.",
    ),
}
# Columns a samples file written by an earlier detaudit may lack (read back as all-null).
LATER_SAMPLE_COLUMNS = frozenset({"error_reason", "raw_answer", "cached_tokens"})

SAMPLES_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=True, metadata={"doc": doc}) for name, (typ, doc) in SAMPLE_COLUMNS.items()],
    metadata={"detaudit.schema_version": str(SCHEMA_VERSION)},
)

# rescore.parquet (additive, optional): what a trainer-side prefill computes for the tokens a run recorded.
# Its Parquet metadata (io.RESCORE_INFO_KEY) names the rescoring model, kernels, dtype, device and, since
# `model_check` was added, whether that model is the one that sampled the run (docs/engine.md).
RESCORE_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "sample_index": (pa.int64(), "The samples.parquet row this rescore belongs to."),
    "status": (pa.string(), "'ok', or 'skipped' when the row could not be rescored."),
    "reason": (pa.string(), "Why the row was skipped (null when ok)."),
    "rescored_logprobs": (pa.list_(pa.float32()), "Teacher-forced logprob of each recorded token."),
    "abs_delta": (pa.list_(pa.float32()), "|reported - rescored| per token (null where none was reported)."),
    "max_abs_delta": (pa.float64(), "Largest |delta| of the row."),
    "mean_abs_delta": (pa.float64(), "Mean |delta| of the row."),
    "kl_estimate": (pa.float64(), "Sum over tokens of reported - rescored logprob (k1 estimate of KL per sequence)."),
    "first_diff": (pa.int32(), "First token position whose logprobs differ at all (null when every one is equal)."),
}
RESCORE_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=True, metadata={"doc": doc}) for name, (typ, doc) in RESCORE_COLUMNS.items()],
    metadata={"detaudit.schema_version": str(SCHEMA_VERSION)},
)

Status = Literal["ok", "error"]
RunStatus = Literal["started", "complete", "interrupted", "failed", "error"]
CaptureLevel = Literal["token_ids", "tokens", "text"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptSpec(_Model):
    """One prompt of the run, exactly as sent."""

    prompt_id: str
    prompt: str | None = Field(
        default=None, description="Plain prompt (completions API, or one user message for chat)."
    )
    messages: list[dict[str, Any]] | None = Field(default=None, description="Chat messages, when given as such.")
    max_tokens: int | None = Field(default=None, description="Per-prompt max_tokens overriding the run's.")
    rationale: str | None = Field(default=None, description="Why this prompt is in its suite (suites only).")

    def content_key(self) -> str:
        """What the prompt says, as a short hash: two runs that asked the same thing get the same key whatever ids
        they gave it (ids are assigned per run: p0, p1, ...). A plain prompt counts as one user message, which is
        what the chat API sends."""
        messages = self.messages or [{"role": "user", "content": self.prompt}]
        blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class ArmSpec(_Model):
    """One load arm: all prompts x repeats at one concurrency (and, for cache arms, one prefix-cache state)."""

    name: str
    concurrency: int
    cache: Literal["cold", "warm"] | None = Field(
        default=None, description="Prefix-cache state this arm asks for: 'cold' or 'warm'; null for a load arm."
    )


class TargetSpec(_Model):
    """Who was audited. Never holds credentials: base_url is redacted and headers keep only their names."""

    kind: Literal["endpoint", "local"]
    base_url: str | None = None
    api: Literal["chat", "completions"] = "chat"
    model: str | None = None
    header_names: list[str] = Field(default_factory=list, description="Names of extra headers sent; values never.")
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="Local/managed engine facts: kernels, dtype, device, GPU, torch/triton versions, scenario, seed.",
    )


class RequestParams(_Model):
    """The sampling and request parameters sent with every request."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    top_logprobs: int | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(default=60.0, description="Deadline of one attempt: connect and the whole answer.")
    retries: int = 3
    rate: float | None = Field(default=None, description="Requests/s cap, if any.")
    max_response_bytes: int = Field(
        default=DEFAULT_MAX_RESPONSE_BYTES, description="Largest answer accepted, in bytes."
    )


class RunManifest(_Model):
    """manifest.json. Field order is part of the file format; bump SCHEMA_VERSION to change it."""

    schema_: str = Field(default=MANIFEST_SCHEMA, alias="schema")
    run_id: str
    tool_version: str
    status: RunStatus = "started"
    created_at: datetime
    finished_at: datetime | None = None
    target: TargetSpec
    params: RequestParams
    prompts: list[PromptSpec] = Field(min_length=1)
    arms: list[ArmSpec] = Field(min_length=1)
    repeats: int = Field(ge=1, description="N: independent requests per prompt per arm.")
    capture: CaptureLevel = Field(default="text", description="Richest per-token data the target gave.")
    probe: dict[str, Any] = Field(default_factory=dict, description="Capability probe result.")
    environment: dict[str, Any] = Field(default_factory=dict, description="Python, platform, host CPU count.")
    suite: str | None = None
    notes: list[str] = Field(default_factory=list, description="Things the reader of the run should know.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _names_unique(self) -> RunManifest:
        """Rows name their prompt and arm: two prompts or arms of one name would make them ambiguous."""
        for what, names in (("prompt id", [p.prompt_id for p in self.prompts]), ("arm", [a.name for a in self.arms])):
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise ValueError(f"{what} {twice!r} appears twice")
        return self

    @property
    def expected_samples(self) -> int:
        return len(self.prompts) * len(self.arms) * self.repeats

    def sample_index(self, prompt_pos: int, arm_pos: int, repeat: int) -> int:
        return (prompt_pos * len(self.arms) + arm_pos) * self.repeats + repeat


def describe_schema() -> list[dict[str, str]]:
    """Rows for `detaudit schema` and docs/schema.md."""
    return [{"column": n, "type": str(t), "doc": d} for n, (t, d) in SAMPLE_COLUMNS.items()]
