"""The summary's `rescore` section, rebuilt from RUN/rescore.parquet so every `detaudit analyze` keeps it."""

from __future__ import annotations

import statistics

import pyarrow as pa
from pydantic import ValidationError

from detaudit.analysis.summary_schema import ModelCheck, RescoreSummary, first_error
from detaudit.errors import RunDirError
from detaudit.rundir.io import rescore_info
from detaudit.rundir.schema import RESCORE_FILE


def summarize_rescore(table: pa.Table) -> RescoreSummary:
    """Sampler-vs-trainer logprob gap over a rescore table: per-token |Δ| max/mean, KL estimate, first difference."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    with_ref = [r for r in ok if r["abs_delta"] is not None]
    deltas = [d for r in with_ref for d in r["abs_delta"] if d is not None]
    firsts = [r["first_diff"] for r in with_ref if r["first_diff"] is not None]
    kls = [r["kl_estimate"] for r in with_ref]
    info = rescore_info(table)
    check = info.get("model_check")  # null for a rescore.parquet written before the check existed
    try:
        return RescoreSummary(
            model=info.get("model"),
            kernels=info.get("kernels"),
            dtype=info.get("dtype"),
            device=info.get("device"),
            model_check=None if check is None else ModelCheck.model_validate(check),
            rows=len(rows),
            rows_rescored=len(ok),
            rows_skipped=len(rows) - len(ok),
            rows_compared=len(with_ref),
            tokens_compared=len(deltas),
            tokens_equal=sum(d == 0 for d in deltas),
            rows_equal=sum(r["first_diff"] is None for r in with_ref),
            max_abs_delta=max(deltas, default=None),
            mean_abs_delta=statistics.fmean(deltas) if deltas else None,
            kl_mean=statistics.fmean(kls) if kls else None,
            kl_max=max(kls, default=None),
            first_diff_min=min(firsts, default=None),
            first_diff_median=statistics.median(firsts) if firsts else None,
        )
    except ValidationError as e:
        raise RunDirError(f"{RESCORE_FILE}: its rescore info is not what detaudit writes ({first_error(e)})") from None
