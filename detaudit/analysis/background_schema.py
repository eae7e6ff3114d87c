"""summary.json's `background` section (#18): the background temperature and a cause for every fork.

Its own module so the section's models stay apart from the rest of the summary's (summary_schema holds one field
for it). Descriptions are the rows of docs/summary.md (generated, tests/test_summary_doc.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Temperature(_Doc):
    kind: Literal["estimate", "upper-bound", "needs-logprobs"] = Field(
        description='`"estimate"` (something flipped: T_bg with a two-sided 95% profile-likelihood interval), '
        '`"upper-bound"` (nothing flipped: T_bg = 0 and the exact one-sided 95% upper bound) or `"needs-logprobs"` '
        "(no position with two or more top-k candidates: T_bg needs top-k logprobs)"
    )
    samples: int = Field(
        description="samples scored: every compared one, or a prompt × arm's first ones up to 2^24 top-k values"
    )
    estimate: float | None = Field(description="T_bg by maximum likelihood; 0 for an upper bound; null: needs logprobs")
    lower: float | None = Field(description="lower end of the 95% interval (0 for an upper bound)")
    upper: float | None = Field(
        description="upper end of the 95% interval (the upper bound); null when the trials bound nothing or no "
        "logprobs were recorded"
    )
    trials: int = Field(description="scored trials: a sample at a trie node of two or more top-k candidates")
    flips: int = Field(description="trials that chose a candidate below the node's best")
    positions: int = Field(description="trie nodes scored")
    outside_top_k: int = Field(description="chosen tokens not among the node's candidates (not scored)")
    unscored_ends: int = Field(description="samples that ended where others of their prefix went on (not scored)")
    invalid_logprobs: int = Field(description="NaN, +inf or null values in the top-k records (those records ignored)")

    def text(self) -> str:
        """In words, as the terminal, the report and the gate say it."""
        if self.kind == "needs-logprobs":
            return "needs top-k logprobs"
        outside = f"; {self.outside_top_k} choices outside the top-k not scored" if self.outside_top_k else ""
        if self.kind == "upper-bound":
            bound = "unbounded" if self.upper is None else f"≤ {self.upper:.3g}"
            return f"{bound} (no flip in {self.trials} trials, 95% upper bound{outside})"
        upper = "∞" if self.upper is None else f"{self.upper:.3g}"
        flips = f"{self.flips} flips in {self.trials} trials{outside}"
        return f"{self.estimate:.3g} (95% {self.lower:.3g}–{upper}; {flips})"


class ArmTemperature(_Doc):
    arm: str = Field(description="the arm")
    concurrency: int | None = Field(description="its concurrency")
    cache: Literal["cold", "warm"] | None = Field(description="its prefix-cache state (manifest), null for a load arm")
    temperature: Temperature = Field(description="T_bg of its samples, all prompts pooled (likelihoods multiplied)")


class PromptArmTemperature(_Doc):
    prompt_id: str = Field(description="the prompt")
    arm: str = Field(description="the arm")
    temperature: Temperature = Field(description="T_bg of this prompt's samples in this arm")


class ForkEvidence(_Doc):
    label: str = Field(description="the cause it supports")
    detail: str = Field(description="the evidence in words")
    p_value: float | None = Field(description="the test's p-value (null for near-tie and unexplained)")
    effect: float | None = Field(
        description="the effect: the margin (near-tie), the loaded rate (load), Cramér's V (fingerprint, cache), "
        "the KS distance (time)"
    )


class CauseBranch(_Doc):
    token: str = Field(description='the branch\'s unit at the fork ("" where its samples ended)')
    count: int = Field(description="samples on it; branch numbers in `evidence` are indices into this list")


class ForkCauseEntry(_Doc):
    prompt_id: str = Field(description="the prompt")
    position: int = Field(description="depth of the fork in the prompt's trie, all arms pooled")
    prefix: str = Field(description="the shared prefix as text, shortened at the front (as `forks[].prefix`)")
    prefix_count: int = Field(description="samples that reach the fork")
    departures: int = Field(description="samples that reach it and do not take its modal branch")
    margin: float | None = Field(description="top-1 minus top-2 logprob at the fork on its modal branch")
    branches: list[CauseBranch] = Field(description="its branches in branch-number order (at most `limits.branches`)")
    labels: list[str] = Field(description="`near-tie`, `load`, `fingerprint`, `cache`, `time`, else `unexplained`")
    evidence: list[ForkEvidence] = Field(description="one entry per label")


class PromptCauses(_Doc):
    prompt_id: str = Field(description="the prompt")
    forks_total: int = Field(description="forks of its trie, all arms pooled")
    forks_labelled: int = Field(
        description="forks labelled: all of them, or the 1000 with the most departures (the shares count these)"
    )
    departures: int = Field(description="its divergence: departures summed over its labelled forks")
    shares: dict[str, float] | None = Field(
        description="cause → share of its departures at forks carrying that label; null when nothing diverged"
    )


class BackgroundSummary(_Doc):
    """summary.json's `background` (docs/background_temperature.md has the method)."""

    temperature: Temperature = Field(description="T_bg of the whole run: every prompt and arm pooled")
    arms: list[ArmTemperature] = Field(description="T_bg per arm, in manifest order")
    prompt_arms: list[PromptArmTemperature] = Field(description="T_bg per prompt × arm")
    near_tie_dtype: str = Field(
        description="the logits' dtype the near-tie threshold assumes: the local engine's, else `bfloat16`"
    )
    near_tie_threshold: float = Field(description="margins at or below this are `near-tie` (2·32·2^−p)")
    shares: dict[str, float] | None = Field(
        description="per cause, its share of the run's departures (prompts weigh by how much they diverged); labels "
        "overlap, so the shares may add up to more than 1; null when nothing diverged"
    )
    prompts: list[PromptCauses] = Field(description="per prompt: its forks and shares")
    forks: list[ForkCauseEntry] = Field(
        description="labelled forks, most departures first, at most `limits.forks` per prompt (the shares count all)"
    )

    def arm(self, name: str) -> ArmTemperature | None:
        return next((a for a in self.arms if a.arm == name), None)

    def prompt_arm(self, prompt_id: str, arm: str) -> Temperature | None:
        return next((t.temperature for t in self.prompt_arms if (t.prompt_id, t.arm) == (prompt_id, arm)), None)

    def fork(self, prompt_id: str, position: int, prefix: str) -> ForkCauseEntry | None:
        """The labelled fork at this node of the prompt's trie (an arm's fork is a node of the pooled trie)."""
        key = (prompt_id, position, prefix)
        return next((f for f in self.forks if (f.prompt_id, f.position, f.prefix) == key), None)
