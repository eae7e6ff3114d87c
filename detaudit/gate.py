"""The release gate: thresholds over a run's summary (and a baseline's), turned into a verdict and an exit code.

Exit codes are public (README "Exit codes"): 0 every rule passed, 1 a rule failed, 2 usage or input error
(raised before judging), 3 too many endpoint errors to judge. "Cannot judge" outranks "failed": a rule
evaluated on an arm whose requests mostly failed says nothing about the model.

The gate reads only summaries (detaudit.summary/1) and manifests; it never touches Parquet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from detaudit.analysis.summary import summarize_run
from detaudit.analysis.summary_schema import ArmSummary, PromptSummary, RunSummary
from detaudit.analysis.units import position_noun
from detaudit.errors import EXIT_ENDPOINT, EXIT_GATE_FAILED, EXIT_OK, UsageError
from detaudit.rundir.io import load_manifest
from detaudit.rundir.schema import RunManifest

# Spec keys for `detaudit run --gate KEY=VALUE` -> (GateThresholds field, parser).
_SPEC_KEYS: dict[str, tuple[str, type]] = {
    "max-unique": ("max_unique", int),
    "min-modal-share": ("min_modal_share", float),
    "min-first-divergence": ("min_first_divergence", int),
    "max-error-rate": ("max_error_rate", float),
    "max-unique-increase": ("max_unique_increase", int),
    "require-same-modal": ("require_same_modal", bool),
    "require-cache-invariant": ("require_cache_invariant", bool),
    "baseline": ("baseline", Path),
}


@dataclass(frozen=True)
class GateThresholds:
    """The rules asked for; None (or False) means the rule is not applied."""

    max_unique: int | None = None
    min_modal_share: float | None = None
    min_first_divergence: int | None = None
    max_error_rate: float | None = None
    require_same_modal: bool = False
    max_unique_increase: int | None = None
    baseline: Path | None = None
    require_cache_invariant: bool = False

    def __post_init__(self) -> None:
        if self.max_unique is not None and self.max_unique < 1:
            raise UsageError(f"--max-unique must be at least 1, got {self.max_unique}")
        for name in ("min_modal_share", "max_error_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
        for name in ("min_first_divergence", "max_unique_increase"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if (self.require_same_modal or self.max_unique_increase is not None) and self.baseline is None:
            raise UsageError("--require-same-modal and --max-unique-increase need --baseline RUN")
        # `is`, not `in`: a threshold of 0 is a rule (0 == False in Python).
        has_rule = any(
            getattr(self, f.name) is not None and getattr(self, f.name) is not False
            for f in fields(self)
            if f.name != "baseline"
        )
        if not has_rule:
            raise UsageError(
                "no gate rule given: pass at least one of --max-unique, --min-modal-share, "
                "--min-first-divergence, --max-error-rate, --require-same-modal, --max-unique-increase, "
                "--require-cache-invariant"
            )


def parse_gate_spec(items: Iterable[str]) -> GateThresholds:
    """`--gate max-unique=1,min-modal-share=0.99 --gate baseline=runs/rc0` as GateThresholds (for `detaudit run`)."""
    values: dict[str, Any] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            key, sep, raw = part.partition("=")
            key = key.strip().lstrip("-")
            if key not in _SPEC_KEYS:
                known = ", ".join(_SPEC_KEYS)
                raise UsageError(f"--gate: unknown rule {key!r} (known: {known})")
            name, kind = _SPEC_KEYS[key]
            if kind is bool:
                if sep and raw.strip().lower() not in ("true", "1", "yes"):
                    raise UsageError(f"--gate: {key} takes no value (or =true), got {raw!r}")
                values[name] = True
                continue
            if not sep or not raw.strip():
                raise UsageError(f"--gate: {key} needs a value, e.g. {key}=1")
            try:
                values[name] = kind(raw.strip())
            except ValueError:
                raise UsageError(f"--gate: {key}={raw!r} is not a valid {kind.__name__}") from None
    # In --gate's own words (GateThresholds speaks of `detaudit gate`'s options, which `run` does not have).
    if not set(values) - {"baseline"}:
        raise UsageError(
            "--gate names no rule: give at least one of " + ", ".join(k for k in _SPEC_KEYS if k != "baseline")
        )
    if (values.get("require_same_modal") or "max_unique_increase" in values) and "baseline" not in values:
        raise UsageError("--gate: require-same-modal and max-unique-increase need baseline=RUN")
    return GateThresholds(**values)


@dataclass
class Check:
    """One rule applied to one prompt/arm: a JUnit test case and one item of a rule's line."""

    where: str
    passed: bool
    observed: str


@dataclass
class RuleResult:
    """One rule over the whole run. `judged` is False when errors leave nothing to judge it on."""

    rule: str
    threshold: str
    checks: list[Check] = field(default_factory=list)
    judged: bool = True

    @property
    def passed(self) -> bool:
        return self.judged and all(c.passed for c in self.checks)

    def line(self) -> str:
        """The one line printed for this rule."""
        head = f"{self.rule} {self.threshold}"
        failed = "; ".join(f"{c.where} {c.observed}" for c in self.checks if not c.passed)
        if not self.judged:
            return f"CANNOT JUDGE {head}: {failed}"
        if failed:
            return f"FAIL {head}: {failed}"
        checks = len(self.checks)
        return f"PASS {head} ({checks} check{'' if checks == 1 else 's'})"


@dataclass
class GateResult:
    """All rules over one run; `exit_code` is what `detaudit gate` exits with."""

    run: str
    baseline: str | None
    rules: list[RuleResult]

    @property
    def judged(self) -> bool:
        return all(r.judged for r in self.rules)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    @property
    def exit_code(self) -> int:
        if not self.judged:
            return EXIT_ENDPOINT
        return EXIT_OK if self.passed else EXIT_GATE_FAILED

    @property
    def verdict(self) -> str:
        return {EXIT_OK: "passed", EXIT_GATE_FAILED: "failed", EXIT_ENDPOINT: "cannot judge"}[self.exit_code]

    def lines(self) -> list[str]:
        return [r.line() for r in self.rules]


def arm_name(arm: ArmSummary) -> str:
    """The arm's display name: its run-directory name, else (an unnamed arm) c<concurrency>."""
    return arm.arm or f"c{arm.concurrency}"


def _modal_text(arm: ArmSummary) -> str | None:
    """What two modal completions are compared by: their text, the one form every capture level has."""
    return arm.completions[0].text if arm.completions else None


def _baseline_arm(base_prompt: PromptSummary, concurrency: int | None) -> ArmSummary | None:
    """The baseline arm a release arm is compared with: same concurrency, else the baseline's most serial arm."""
    for arm in base_prompt.arms:
        if arm.concurrency == concurrency:
            return arm
    return min(base_prompt.arms, key=lambda a: a.concurrency or 0, default=None)


def evaluate_gate(
    summary: RunSummary,
    thresholds: GateThresholds,
    baseline: RunSummary | None = None,
    *,
    run_label: str = "run",
    baseline_label: str | None = None,
) -> GateResult:
    """Apply every requested rule to every prompt/arm of `summary`. Pure: summaries in, result out."""
    t = thresholds
    if (t.require_same_modal or t.max_unique_increase is not None) and baseline is None:
        raise UsageError("--require-same-modal and --max-unique-increase need a baseline summary")
    if baseline is not None and t.max_unique_increase is not None and baseline.unit != summary.unit:
        # A text run counts distinct texts, a token run distinct token sequences: one text can be two token
        # sequences, so the counts (and every position) of the two are not on the same scale.
        raise UsageError(
            f"baseline {baseline_label or ''} compares completions as {baseline.unit_detail.compared_as} "
            f"(positions in {position_noun(baseline.unit, plural=True)}), the run as "
            f"{summary.unit_detail.compared_as} ({position_noun(summary.unit, plural=True)}): their unique counts "
            "and positions are not comparable; drop --max-unique-increase or record both runs with the same capture"
        )
    base_prompts = {p.prompt_id: p for p in baseline.prompts} if baseline is not None else {}
    noun = position_noun(summary.unit)
    # Not a threshold but a precondition: an arm without one ok sample leaves every rule nothing to judge.
    judgeable = RuleResult("successful-samples", "≥ 1 in every arm")
    # Nor can an arm whose answers were mostly cut short (truncated, docs/summary.md): its verdict is inconclusive,
    # and what few answers are left to compare say nothing about the model.
    complete = RuleResult("complete-answers", "more than half of every arm's answers not truncated")
    error_rule = RuleResult("max-error-rate", f"≤ {t.max_error_rate:g}") if t.max_error_rate is not None else None
    rules: dict[str, RuleResult] = {}
    if t.max_unique is not None:
        rules["max-unique"] = RuleResult("max-unique", f"≤ {t.max_unique}")
    if t.min_modal_share is not None:
        rules["min-modal-share"] = RuleResult("min-modal-share", f"≥ {t.min_modal_share:g}")
    if t.min_first_divergence is not None:
        # The run's own unit: a text run's positions are characters, and the threshold is read as characters.
        rules["min-first-divergence"] = RuleResult(
            "min-first-divergence", f"≥ {t.min_first_divergence} {position_noun(summary.unit, plural=True)}"
        )
    if t.require_same_modal:
        rules["require-same-modal"] = RuleResult("require-same-modal", f"as {baseline_label or 'baseline'}")
    if t.max_unique_increase is not None:
        rules["max-unique-increase"] = RuleResult(
            "max-unique-increase", f"≤ +{t.max_unique_increase} over {baseline_label or 'baseline'}"
        )

    for prompt in summary.prompts:
        pid = prompt.prompt_id
        base_prompt = base_prompts.get(pid)
        if baseline is not None and base_prompt is None:
            raise UsageError(f"baseline {baseline_label or ''} has no prompt {pid!r}; gate a run of the same prompts")
        arms_ok = [a for a in prompt.arms if a.ok > 0]
        if t.max_unique is not None and len(arms_ok) > 1 and prompt.unique_all_arms is not None:
            # Arms that each agree with themselves but not with each other are load-dependent too.
            pooled = prompt.unique_all_arms
            rules["max-unique"].checks.append(
                Check(f"{pid}@all-arms", pooled <= t.max_unique, f"{pooled} unique across arms")
            )
        for arm in prompt.arms:
            where = f"{pid}@{arm_name(arm)}"
            n, ok, errors = arm.n, arm.ok, arm.errors
            rate = errors / n if n else 1.0
            judgeable.checks.append(Check(where, ok > 0, f"has {ok} ok of {n}"))
            if arm.truncated:
                answered = ok + arm.truncated
                complete.checks.append(
                    Check(where, 2 * arm.truncated <= answered, f"has {arm.truncated} truncated of {answered}")
                )
            if error_rule is not None and t.max_error_rate is not None:
                error_rule.checks.append(Check(where, rate <= t.max_error_rate, f"{errors}/{n} errors ({rate:.1%})"))
            if ok == 0:
                continue
            unique = arm.unique
            if t.max_unique is not None:
                rules["max-unique"].checks.append(Check(where, unique <= t.max_unique, f"{unique} unique in {ok}"))
            if t.min_modal_share is not None:
                share = arm.completions[0].share
                rules["min-modal-share"].checks.append(
                    Check(where, share >= t.min_modal_share, f"modal share {share:.4g}")
                )
            if t.min_first_divergence is not None:
                first = arm.first_divergence.min
                passed = first is None or first >= t.min_first_divergence
                observed = "no divergence" if first is None else f"first divergence at {noun} {first}"
                rules["min-first-divergence"].checks.append(Check(where, passed, observed))
            if base_prompt is None:
                continue
            base_arm = _baseline_arm(base_prompt, arm.concurrency)
            if base_arm is None or base_arm.ok == 0:
                judgeable.checks.append(Check(f"baseline {pid}", False, "has no successful samples"))
                continue
            bwhere = f"{where} vs baseline@{arm_name(base_arm)}"
            if t.require_same_modal:
                same = _modal_text(arm) == _modal_text(base_arm)
                rules["require-same-modal"].checks.append(
                    Check(bwhere, same, "same modal completion" if same else "modal completion differs")
                )
            if t.max_unique_increase is not None:
                increase = unique - base_arm.unique
                rules["max-unique-increase"].checks.append(
                    Check(bwhere, increase <= t.max_unique_increase, f"{base_arm.unique} → {unique} unique")
                )

    if t.require_cache_invariant:
        rules["require-cache-invariant"] = cache_rule(summary)
    ordered = [r for r in (error_rule, *rules.values()) if r is not None]
    for precondition in (complete, judgeable):  # judgeable first when both fail
        if not precondition.passed:
            ordered.insert(0, precondition)
            precondition.judged = False
    if error_rule is not None and not error_rule.passed:
        # Too many failed requests: the other rules were computed on what is left and cannot be trusted.
        error_rule.judged = False
    return GateResult(run=run_label, baseline=baseline_label, rules=ordered)


CACHE_VERDICTS = ("cache-dependent", "numerically-cache-dependent")
_CACHE_WORDS = {"unverified": "unverified (no cached_tokens reported)", "contradicted": "contradicted by cached_tokens"}


def cache_rule(summary: RunSummary) -> RuleResult:
    """--require-cache-invariant: every prompt answers the same cold and warm, to the logprob. Cannot judge a run
    without both cache arms, nor one whose cached_tokens do not prove the cache states (unverified, contradicted)."""
    rule = RuleResult("require-cache-invariant", "cold = warm")
    prompts = [p for p in summary.prompts if p.cache is not None]
    if not prompts:
        rule.checks.append(Check("run", False, "has no cache arms (record it with `detaudit run --cache cold,warm`)"))
        rule.judged = False
        return rule
    for p in prompts:
        cache = p.cache
        assert cache is not None
        if cache.same_completion is None:
            rule.checks.append(Check(p.prompt_id, False, "has no ok samples in both a cold and a warm arm"))
            rule.judged = False
        elif cache.evidence != "verified":
            rule.checks.append(Check(p.prompt_id, False, f"cache state {_CACHE_WORDS[cache.evidence]}"))
            rule.judged = False
        else:
            passed = p.verdict not in CACHE_VERDICTS
            rule.checks.append(Check(p.prompt_id, passed, "cold = warm" if passed else p.verdict))
    return rule


def _check_comparable(run: RunManifest, base: RunManifest, baseline_label: str) -> None:
    """A baseline is only meaningful for the same prompts under the same generation length."""
    base_prompts = {p.prompt_id: p for p in base.prompts}
    for p in run.prompts:
        b = base_prompts.get(p.prompt_id)
        if b is None:
            raise UsageError(f"baseline {baseline_label} has no prompt {p.prompt_id!r}; gate a run of the same prompts")
        if (p.prompt, p.messages) != (b.prompt, b.messages):
            raise UsageError(f"prompt {p.prompt_id!r} differs between the run and baseline {baseline_label}")
        if (p.max_tokens or run.params.max_tokens) != (b.max_tokens or base.params.max_tokens):
            raise UsageError(f"prompt {p.prompt_id!r}: max_tokens differs from baseline {baseline_label}")


def judge(run_dir: Path, manifest: RunManifest, summary: RunSummary, thresholds: GateThresholds) -> GateResult:
    """Judge a summarized run, loading and checking the baseline when the thresholds name one."""
    baseline_summary = None
    baseline_label = None
    if thresholds.baseline is not None:
        baseline_label = str(thresholds.baseline)
        base_manifest = _complete_manifest(Path(thresholds.baseline))
        _check_comparable(manifest, base_manifest, baseline_label)
        baseline_summary = summarize_run(Path(thresholds.baseline))
    return evaluate_gate(summary, thresholds, baseline_summary, run_label=str(run_dir), baseline_label=baseline_label)


def run_gate(run_dir: Path, thresholds: GateThresholds) -> tuple[GateResult, RunManifest, RunSummary]:
    """Load the run (and baseline), summarise and judge. Returns the result plus the run's manifest and summary."""
    manifest = _complete_manifest(Path(run_dir))
    summary = summarize_run(Path(run_dir))
    return judge(Path(run_dir), manifest, summary, thresholds), manifest, summary


def _complete_manifest(run_dir: Path) -> RunManifest:
    manifest = load_manifest(run_dir)
    if manifest.status in ("started", "interrupted"):
        raise UsageError(
            f"{run_dir}: run is {manifest.status}, not complete; finish it with `detaudit run --resume` first"
        )
    return manifest
