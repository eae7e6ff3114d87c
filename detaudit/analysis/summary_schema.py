"""The run summary's schema (detaudit.summary/1): the typed document the analysis produces and summary.json holds.

Field order is the order of the JSON keys, and each field's description is its row in docs/summary.md (generated;
tests/test_summary_doc.py keeps the two in step). Keys keep their names and meanings within detaudit.summary/1;
a change to what summary.json holds bumps SUMMARY_SCHEMA and is documented there. Two keys are left out rather
than written as null: a modal completion's `context`, and `rescore` when the run was never rescored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer
from pydantic.dataclasses import dataclass

from detaudit.analysis.background_schema import BackgroundSummary
from detaudit.analysis.units import Source, Unit
from detaudit.errors import RunDirError
from detaudit.rundir.io import describe
from detaudit.rundir.schema import SUMMARY_FILE, CaptureLevel, RunStatus

SUMMARY_SCHEMA: Final = "detaudit.summary/1"
Verdict = Literal[
    "deterministic",
    "load-dependent",
    "load-independent",
    "inconclusive",
    "numerically-load-dependent",
    "cache-dependent",
    "numerically-cache-dependent",
]
CacheState = Literal["cold", "warm"]
CacheEvidenceState = Literal["cold", "warm", "mixed", "unverified"]

_PROMPTS_JUDGED = "prompts judged (at least 2 ok samples)"
_ALL_IDENTICAL = "judged prompts whose completions are all identical"
_SHARE = "`all_identical / prompts`; null when no prompt was judged"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # Optional sections left out of the document when absent (null), so older summaries stay byte for byte.
    _omit_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self._omit_when_none:
            if getattr(self, name) is None:
                del data[name]
        return data


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Limits:
    """How much of a long tail the summary lists; the totals are always given beside the lists."""

    completions: int = Field(default=20, description="at most this many `completions` per arm")
    forks: int = Field(default=50, description="at most this many `forks` per arm")
    branches: int = Field(default=10, description="at most this many `branches` per fork")


class UnitFallback(_Doc):
    source: Source = Field(description='a record abandoned: `"token_ids"`, `"token_bytes"` or `"tokens"`')
    rows: int = Field(
        description="compared rows on which it disagreed with the text (joined token strings or bytes ≠ text) or "
        "with `usage.completion_tokens` (entries ≠ tokens)"
    )


class UnitDetail(_Doc):
    compared_as: Source = Field(
        description='`"token_ids"`, `"token_bytes"`, `"tokens"` or `"text"`: the record compared'
    )
    capture: CaptureLevel = Field(description="the manifest's capture level (what the target offered)")
    positions: Literal["tokens", "characters (Unicode code points)"] = Field(
        description='`"tokens"` or `"characters (Unicode code points)"`: what positions count'
    )
    fallbacks: list[UnitFallback] = Field(
        default_factory=list,
        description="richer records tried first and abandoned because they disagreed on some row (richest "
        "first); `[]` when none was",
    )


class SampleCounts(_Doc):
    expected: int = Field(description="samples asked for: prompts × arms × repeats")
    rows: int = Field(description="rows recorded")
    ok: int = Field(description="ok rows compared (truncated answers are counted in `truncated` instead)")
    errors: int = Field(description="error rows")
    truncated: int = Field(
        default=0, description="ok rows whose answer ended without a stated reason: never compared (rules below)"
    )


class PromptUnique(_Doc):
    prompt_id: str = Field(description="as in the manifest")
    unique: int = Field(description="distinct completions, all arms of the prompt pooled")
    by_arm: dict[str, int] = Field(description="arm name → distinct completions in that arm")


class ArmAgreement(_Doc):
    arm: str = Field(description="the load arm")
    concurrency: int | None = Field(description="its concurrency")
    prompts: int = Field(description=_PROMPTS_JUDGED)
    all_identical: int = Field(description=_ALL_IDENTICAL)
    share: float | None = Field(description=_SHARE)


class FingerprintAgreement(_Doc):
    system_fingerprint: str | None = Field(description="the value (null: not reported)")
    prompts: int = Field(description=_PROMPTS_JUDGED)
    all_identical: int = Field(description=_ALL_IDENTICAL)
    share: float | None = Field(description=_SHARE)


class Agreement(_Doc):
    prompts: int = Field(description=_PROMPTS_JUDGED + ", all arms pooled per prompt")
    all_identical: int = Field(description=_ALL_IDENTICAL)
    share: float | None = Field(description=_SHARE)
    by_arm: list[ArmAgreement] = Field(description="the same for each arm on its own")
    by_system_fingerprint: list[FingerprintAgreement] | None = Field(
        description="the same per `system_fingerprint` value, only when more than one value occurs; else null"
    )


class Branch(_Doc):
    token: str = Field(description='the decoded unit (`""` = the completion ended here)')
    token_id: int | None = Field(description="the token id when ids were compared, else null")
    count: int = Field(description="samples on this branch")


class ForkParent(_Doc):
    fork: int = Field(description="index (in `forks`) of the deepest listed fork above this one")
    branch: int = Field(description="index (in that fork's `branches`) of the branch this fork lies on")


class Fork(_Doc):
    position: int = Field(description="depth of the fork: units before it")
    prefix_count: int = Field(description="samples that share the prefix (pass through the fork)")
    prefix: str = Field(description="the shared prefix as text, shortened at the front")
    branches: list[Branch] = Field(
        description='most frequent first (ties in token order, "ended here" first), at most `limits.branches`'
    )
    branches_total: int = Field(description="number of branches before the cut")
    margin: float | None = Field(
        description="top-1 minus top-2 logprob at the fork position, taken from a sample on the most frequent "
        "branch that continues there; null when top-k logprobs were not recorded (always null for text units). "
        "Small margins (near-ties) are the usual trigger of load-dependent forks"
    )
    parent: ForkParent | None = Field(
        description="where this fork hangs in the tree; null for a root or when the ancestor or branch is not listed"
    )


class Context(_Doc):
    start: int = Field(description="position of the first unit shown (6 units before the first divergence)")
    tokens: list[str] = Field(description="this completion's units from `start` to 6 after its first divergence")
    modal: list[str] = Field(description="the modal completion's units over the same positions")


class Completion(_Doc):
    count: int = Field(description="samples with this completion")
    share: float = Field(description="share of the arm's ok samples")
    first_divergence: int | None = Field(
        description="leading units shared with the modal completion; null for the modal one"
    )
    length: int = Field(description="length in units")
    text: str = Field(
        description="the completion text as the target returned it (joined tokens when no text was recorded); "
        "past 8,192 characters only its first 6,144 and last 2,048, the cut marked `…[N characters cut]…`"
    )
    text_chars: int = Field(description="the full length of that text in characters")
    context: Context | None = Field(
        default=None,
        description="all but the modal completion (absent there): the units around its first divergence, decoded "
        "as branch tokens are",
    )

    _omit_when_none: ClassVar[tuple[str, ...]] = ("context",)


class FirstDivergence(_Doc):
    min: int | None = Field(description="shallowest first divergence")
    median: int | float | None = Field(description="median first divergence (may be x.5)")
    histogram: dict[str, int] = Field(description="position (as a string) → samples")
    samples: int = Field(description="samples that differ from the modal one")


class ArmStats(_Doc):
    modal_share: float | None = Field(description="modal count / ok samples")
    modal_share_wilson95: list[float] | None = Field(
        description="95% Wilson score interval `[low, high]` on the modal share"
    )
    divergence_rate_upper95: float | None = Field(
        description="only when all N ok samples agree: one-sided 95% Clopper–Pearson upper bound on the "
        "per-request divergence probability, `1 − 0.05^(1/N)`; else null"
    )
    miss_probability: dict[str, float] | None = Field(
        description="for rates p = 0.001, 0.01, 0.05 (keys as strings): the chance that N samples show no "
        "divergence at all although each diverges with probability p, `(1 − p)^N`; null without ok samples"
    )
    samples_needed95: dict[str, int] = Field(
        description="for the same p: the N that catches such a divergence with 95% probability, `⌈ln 0.05 / ln(1 − p)⌉`"
    )


class FingerprintSplit(_Doc):
    system_fingerprint: str | None = Field(description="the value (null: not reported)")
    n: int = Field(description="ok samples carrying it")
    unique: int = Field(description="distinct completions among them")
    modal_share: float = Field(description="their most frequent completion's share")


class NumericSpread(_Doc):
    rows: int = Field(description="compared rows of the arm's modal completion that carry logprobs")
    vectors: int = Field(
        description="distinct logprob vectors among them (equal float32 values; rows compared by a 64-bit hash)"
    )
    vectors_compared: int = Field(
        description="vectors read to measure the spread below: one per distinct vector, at most 64"
    )
    max_abs_delta: float | None = Field(
        description="largest |Δ logprob| at one position between two of those vectors; null with one vector"
    )
    max_position: int | None = Field(description="the position of `max_abs_delta`")
    first_position: int | None = Field(
        description="the first position where the vectors differ: where divergence below the tokens starts"
    )


class CacheEvidence(_Doc):
    asked: CacheState = Field(description="the prefix-cache state the arm asked for: `cold` or `warm`")
    evidence: CacheEvidenceState = Field(
        description="what its answers' `cached_tokens` show: `cold` (every compared row reported 0), `warm` (every "
        "compared row reported more than 0), `mixed` (anything else with some row reporting), `unverified` (no row "
        "reported cached_tokens)"
    )
    rows: int = Field(description="compared rows")
    reporting: int = Field(description="of those, rows that reported cached_tokens")
    hits: int = Field(description="rows that reported more than 0 cached tokens")
    cached_tokens_min: int | None = Field(description="fewest cached tokens reported; null when none was")
    cached_tokens_max: int | None = Field(description="most cached tokens reported; null when none was")


class PromptCache(_Doc):
    cold_arms: list[str] = Field(description="the prompt's cold cache arms")
    warm_arms: list[str] = Field(description="its warm cache arms")
    evidence: Literal["verified", "unverified", "contradicted"] = Field(
        description="`verified`: every cache arm's evidence is the state it asked for; `unverified`: some arm's is "
        "`unverified` (the endpoint reports no cached_tokens); `contradicted`: otherwise (a warm arm that missed, "
        "a cold arm that hit, a mixed arm)"
    )
    cold_method: Literal["cache_salt", "reset", "nonce"] | None = Field(
        description="how cold arms were made cold: a `cache_salt` per request, a `reset` of the prefix cache before "
        "each request, or a `nonce` line before the prompt (the model then read a different prompt); null without "
        "a cold arm"
    )
    same_completion: bool | None = Field(
        description="whether the most frequent completion of the cold arms (pooled) is that of the warm arms; null "
        "without both, or without an ok sample in either"
    )
    cold_vectors: int | None = Field(
        description="when `same_completion`: distinct logprob vectors of that completion in the cold arms; else null"
    )
    warm_vectors: int | None = Field(description="the same in the warm arms")
    shared_vectors: int | None = Field(
        description="vectors found in both (0: every cold vector differs from every warm one); null without logprobs"
    )


class ArmSummary(_Doc):
    arm: str = Field(description="the load arm's name")
    concurrency: int | None = Field(description="its concurrency")
    expected: int | None = Field(description="repeats the manifest asked for (null for an arm found only in the rows)")
    n: int = Field(description="rows present")
    ok: int = Field(description="ok rows compared (truncated answers are counted in `truncated` instead)")
    errors: int = Field(description="error rows")
    truncated: int = Field(
        default=0,
        description="ok rows whose answer ended without a stated reason (no `finish_reason`, `length` short of "
        "max_tokens, `abort`, ...): never compared, in no count below",
    )
    unique: int = Field(description="distinct completions among the compared rows")
    completions: list[Completion] = Field(
        description="the most frequent distinct completions (up to `limits.completions`), most frequent first, "
        "ties in lexicographic order"
    )
    first_divergence: FirstDivergence = Field(
        description="over the samples that differ from the modal one; all null / `{}` / 0 when every sample is modal"
    )
    forks: list[Fork] = Field(
        description="forks sorted by `position`, then `prefix_count` descending; when there are more than "
        "`limits.forks`, those most samples pass through are kept"
    )
    forks_total: int = Field(description="forks before the cut")
    earliest_fork: int | None = Field(description="position of the shallowest fork, or null")
    stats: ArmStats = Field(description="what N samples can say, below")
    system_fingerprints: list[FingerprintSplit] | None = Field(
        description="per `system_fingerprint` value when the arm's ok samples carry more than one; else null"
    )
    numeric: NumericSpread | None = Field(
        default=None,
        description="logprob vectors of the modal completion (divergence below the tokens); null without logprobs",
    )
    cache: CacheEvidence | None = Field(
        default=None,
        description="a cache arm's prefix-cache evidence (`detaudit run --cache`); absent for a load arm",
    )

    _omit_when_none: ClassVar[tuple[str, ...]] = ("cache",)


class PromptSummary(_Doc):
    prompt_id: str = Field(description="as in the manifest")
    prompt: str | None = Field(description="the prompt text (the last chat message's text for chat prompts)")
    unique_all_arms: int | None = Field(
        description="distinct completions over all arms of this prompt (the analysis always states it; null in a "
        "document that does not, where the gate skips its across-arms check)"
    )
    arms: list[ArmSummary] = Field(description="one entry per load arm, in manifest order")
    verdict: Verdict = Field(
        description="`deterministic`, `load-dependent`, `numerically-load-dependent`, `load-independent`, "
        "`cache-dependent`, `numerically-cache-dependent` or `inconclusive` (rules below)"
    )
    verdict_reason: str = Field(description="the rule that decided it, in words")
    cache: PromptCache | None = Field(
        default=None,
        description="cold against warm, when the run has cache arms (absent otherwise), below",
    )

    _omit_when_none: ClassVar[tuple[str, ...]] = ("cache",)


class EarliestFork(_Doc):
    prompt_id: str = Field(description="the prompt")
    arm: str = Field(description="the arm")
    position: int = Field(description="the fork's position")
    prefix: str = Field(description="its shared prefix")
    branches: list[Branch] = Field(description="its branches, as in `forks[].branches`")


class ModelCheck(_Doc):
    model: str = Field(description="the `--model` given to rescore")
    run_model: str | None = Field(description="the model the run's manifest names")
    run_kind: str = Field(description="the run's target kind")
    status: Literal["same", "different", "unverified"] = Field(
        description="`same`, `different` or `unverified` (nothing to compare with, e.g. an endpoint's served name)"
    )
    reason: str = Field(description="why, in words")


class ArmSampling(_Doc):
    arm: str = Field(description="the load arm")
    concurrency: int | None = Field(description="its concurrency")
    rows: int = Field(description="compared rows checked (the arm's first 256 in the run)")
    positions: int = Field(description="positions checked: a logprob for the chosen token and a top-k list")
    below_top1: int = Field(
        description="positions whose chosen token's logprob is below the top-1 logprob by more than `tolerance`"
    )
    share: float | None = Field(description="`below_top1 / positions`; null when no position was checked")
    grown_lists: int = Field(
        description="positions whose top-k list holds more entries than `top_logprobs` asked for (the chosen "
        "token appended)"
    )


class SamplingCheck(_Doc):
    greedy: bool = Field(description="false when some checked position's chosen token is below the top-1")
    tolerance: float = Field(description="logprob difference still taken for a float tie")
    arms: list[ArmSampling] = Field(description="per arm, in manifest order")


class RescoreSummary(_Doc):
    model: str | None = Field(description="the rescoring model (`--model`)")
    kernels: str | None = Field(description="its kernels")
    dtype: str | None = Field(description="its dtype")
    device: str | None = Field(description="its device")
    model_check: ModelCheck | None = Field(
        description="whether `--model` is the model that sampled the run; null for a rescore made before the check "
        "existed"
    )
    rows: int = Field(description="rows in rescore.parquet")
    rows_rescored: int = Field(description="rows rescored")
    rows_skipped: int = Field(description="rows that could not be rescored")
    rows_compared: int = Field(description="rescored rows with reported logprobs to compare with")
    tokens_compared: int = Field(description="tokens compared")
    tokens_equal: int = Field(description="tokens whose reported and rescored logprobs are equal")
    rows_equal: int = Field(description="compared rows equal at every token")
    max_abs_delta: float | None = Field(description="largest per-token |reported − rescored|")
    mean_abs_delta: float | None = Field(description="mean per-token |reported − rescored|")
    kl_mean: float | None = Field(
        description="mean per-row KL estimate (k1: the sum over tokens of reported − rescored logprob)"
    )
    kl_max: float | None = Field(description="largest per-row KL estimate")
    first_diff_min: int | None = Field(description="earliest first differing token over the rows")
    first_diff_median: int | float | None = Field(description="median first differing token")


class RunSummary(_Doc):
    """summary.json: unique completions, first divergence, forks, statistics and verdicts of one run."""

    schema_: Literal["detaudit.summary/1"] = Field(
        default=SUMMARY_SCHEMA, alias="schema", description=f"`{SUMMARY_SCHEMA}`"
    )
    run_id: str = Field(description="from the manifest")
    run_status: RunStatus = Field(description="from the manifest: started / complete / interrupted / failed / error")
    model: str | None = Field(description="the target's model, from the manifest")
    system_fingerprints: list[str] = Field(
        description="every `system_fingerprint` value the run's ok samples carried, sorted (`[]` when none was "
        "reported)"
    )
    unit: Unit = Field(description='`"token"` or `"text"` (see "How completions are compared")')
    unit_detail: UnitDetail = Field(description="how completions were compared")
    samples: SampleCounts = Field(description="counts over the whole run")
    unique_per_prompt: list[PromptUnique] = Field(description="distinct completions per prompt")
    agreement: Agreement = Field(description="TARr-style agreement across prompts, below")
    earliest_fork: EarliestFork | None = Field(description="the shallowest fork over all prompts and arms, or null")
    limits: Limits = Field(description="how many entries the lists below hold at most (totals are given beside them)")
    prompts: list[PromptSummary] = Field(description="one entry per prompt, in manifest order")
    sampling: SamplingCheck | None = Field(
        default=None,
        description="whether temperature 0 was greedy: chosen tokens against the reported top-1 (when top-k "
        "logprobs were recorded; else null), below",
    )
    notes: list[str] = Field(
        default_factory=list,
        description="what the reader must know to trust the numbers: truncated answers, a record abandoned for "
        "disagreeing, non-greedy sampling, logprobs that vary among identical completions",
    )
    rescore: RescoreSummary | None = Field(
        default=None,
        description="only when `detaudit rescore` ran (absent otherwise): the sampler-vs-trainer logprob gap "
        "from RUN/rescore.parquet (docs/engine.md), below",
    )
    background: BackgroundSummary | None = Field(
        default=None,
        description="the background temperature T_bg (per run, arm, prompt × arm) and a cause for every fork, "
        "below (#18; null in a summary written before it)",
    )

    _omit_when_none: ClassVar[tuple[str, ...]] = ("rescore",)

    def document(self) -> dict[str, Any]:
        """The JSON document (summary.json, `--json`): keys in field order, `schema` by its name."""
        return self.model_dump(by_alias=True)


def first_error(e: ValidationError) -> str:
    """The first problem pydantic found, with the key it is at (dotted, list indices as numbers)."""
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"at {where}: {first['msg']}" if where else first["msg"]


def load_summary(run_dir: Path) -> RunSummary:
    """RUN/summary.json, validated: anything else is refused with the first bad key named."""
    path = Path(run_dir) / SUMMARY_FILE
    rebuild = f"rebuild it with `detaudit analyze {run_dir}`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: no summary; {rebuild}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: unreadable summary ({describe(e)}); {rebuild}") from None
    try:
        return RunSummary.model_validate(data)
    except ValidationError as e:
        raise RunDirError(f"{path}: not a {SUMMARY_SCHEMA} summary, {first_error(e)}; {rebuild}") from None
