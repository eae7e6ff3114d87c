"""`detaudit compare A B`: did two runs (e.g. two releases of a model) ask the same thing, and answer it the same way?

Per prompt in both runs: are the modal completions (pooled over arms) equal, unique counts, earliest fork, and
where the two modal completions part. The modal completions are compared in the richest unit both runs
recorded (token ids, token bytes, token strings, else characters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detaudit.analysis.arms import GroupResult
from detaudit.analysis.background import difference, run_observations
from detaudit.analysis.decode import Decoder, shorten_tail
from detaudit.analysis.run_reader import RunDirReader
from detaudit.analysis.summary import analyze, load_run_manifest
from detaudit.analysis.units import SOURCES, Source
from detaudit.rundir.schema import PromptSpec, RunManifest

COMPARE_SCHEMA = "detaudit.compare/1"
# Request parameters that change what a server computes; timeouts, retries and rate caps do not.
_OUTPUT_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "top_logprobs", "extra_body")


def _prompt_text(p: PromptSpec) -> Any:
    return {"prompt": p.prompt, "messages": p.messages, "max_tokens": p.max_tokens}


def _prompt_differences(a: RunManifest, b: RunManifest) -> list[dict[str, str]]:
    pa_, pb = {p.prompt_id: p for p in a.prompts}, {p.prompt_id: p for p in b.prompts}
    out = []
    for pid in list(pa_) + [p for p in pb if p not in pa_]:
        if pid not in pb:
            out.append({"prompt_id": pid, "what": "only in A"})
        elif pid not in pa_:
            out.append({"prompt_id": pid, "what": "only in B"})
        elif _prompt_text(pa_[pid]) != _prompt_text(pb[pid]):
            out.append({"prompt_id": pid, "what": "prompt text, messages or max_tokens differ"})
    return out


def _lcp(x: list, y: list) -> int:
    n = min(len(x), len(y))
    return next((i for i in range(n) if x[i] != y[i]), n)


class _Side:
    """One run, analysed, with its decoder and per-prompt pooled results."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir
        self.manifest = load_run_manifest(run_dir)
        self.summary, self.seqs, self.dec, self.pooled = analyze(self.manifest, RunDirReader(run_dir))
        self.observations = run_observations(RunDirReader(run_dir), self.seqs, self.manifest)
        self.prompts = {p.prompt_id: p for p in self.summary.prompts}

    def header(self) -> dict[str, Any]:
        return {
            "run_id": self.manifest.run_id,
            "path": str(self.path),
            "model": self.manifest.target.model,
            "api": self.manifest.target.api,
            "unit": self.summary.unit,
            "compared_as": self.summary.unit_detail.compared_as,
            "samples": self.summary.samples.model_dump(),
        }


def _split(a: _Side, ua: int, b: _Side, ub: int, unit: Source) -> tuple[bool, dict[str, Any] | None, Source]:
    """Whether the two modal completions are equal and, if not, where they part (falls back to characters)."""
    xa, xb = a.dec.units(ua, unit), b.dec.units(ub, unit)
    if xa is None or xb is None:
        unit = "text"
        xa, xb = a.dec.units(ua, unit), b.dec.units(ub, unit)
    assert xa is not None and xb is not None  # characters are always available
    if xa == xb:
        return True, None, unit
    pos = _lcp(xa, xb)

    def tok(side: Decoder, u: int, units: list) -> str:
        if unit == "text":
            return units[pos] if pos < len(units) else ""
        return side.token(u, pos)

    prefix = shorten_tail("".join(xa[:pos])) if unit == "text" else a.dec.prefix(ua, pos)
    return False, {"position": pos, "prefix": prefix, "a": tok(a.dec, ua, xa), "b": tok(b.dec, ub, xb)}, unit


def compare_runs(run_a: Path | str, run_b: Path | str) -> dict[str, Any]:
    """The detaudit.compare/1 document for two run directories (docs/summary.md, "compare")."""
    a, b = _Side(Path(run_a)), _Side(Path(run_b))
    sa, sb = a.summary.unit_detail.compared_as, b.summary.unit_detail.compared_as
    common: Source = SOURCES[max(SOURCES.index(sa), SOURCES.index(sb))]
    pa_, pb = a.manifest.params.model_dump(), b.manifest.params.model_dump()
    param_diff = {k: [pa_[k], pb[k]] for k in _OUTPUT_PARAMS if pa_[k] != pb[k]}
    prompt_diff = _prompt_differences(a.manifest, b.manifest)
    units_used: set[str] = set()
    prompts = []
    for pid, pra in a.prompts.items():
        if pid not in b.prompts:
            continue
        prb = b.prompts[pid]
        ga: GroupResult | None = a.pooled.get(pid)
        gb: GroupResult | None = b.pooled.get(pid)
        equal, split = None, None
        if ga is not None and gb is not None:
            equal, split, used = _split(a, int(ga.uniq[0]), b, int(gb.uniq[0]), common)
            units_used.add(used)
        prompts.append(
            {
                "prompt_id": pid,
                "modal_equal": equal,
                "unique": {"a": pra.unique_all_arms, "b": prb.unique_all_arms},
                "modal_share": {
                    "a": int(ga.counts[0]) / ga.n_ok if ga else None,
                    "b": int(gb.counts[0]) / gb.n_ok if gb else None,
                },
                "earliest_fork": {"a": ga.first_fork if ga else None, "b": gb.first_fork if gb else None},
                "modal_split": split,
                "verdict": {"a": pra.verdict, "b": prb.verdict},
            }
        )
    return {
        "schema": COMPARE_SCHEMA,
        "a": a.header(),
        "b": b.header(),
        "compared_as": "text" if "text" in units_used else common,
        "same_model": a.manifest.target.model == b.manifest.target.model,
        "same_api": a.manifest.target.api == b.manifest.target.api,
        "same_prompts": not prompt_diff,
        "prompt_differences": prompt_diff,
        "same_params": not param_diff,
        "param_differences": param_diff,
        "all_modal_equal": all(p["modal_equal"] for p in prompts) if prompts else None,
        "prompts": prompts,
        "background_temperature": difference(a.observations, b.observations),
    }
