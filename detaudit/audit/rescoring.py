"""`detaudit rescore`: recompute, by teacher-forced prefill on the local engine, the logprob of every token a run
recorded, and measure how far the sampler's reported logprobs are from what a trainer would compute.

With the same model and batch-invariant kernels on both sides the gap is exactly 0 (true on-policy RL); with
stock kernels the sampler's decode-time numbers and the trainer's prefill numbers part ways.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detaudit.engine.llm import Engine
from detaudit.errors import UsageError
from detaudit.rundir.io import load_manifest, read_samples, write_rescore
from detaudit.rundir.schema import RunManifest


def _prompt_ids(engine: Engine, manifest: RunManifest) -> dict[str, list[int]]:
    ids = {}
    for p in manifest.prompts:
        if manifest.target.api == "completions":
            ids[p.prompt_id] = engine.encode_text(p.prompt or "")
        else:
            ids[p.prompt_id] = engine.encode_chat(p.messages or [{"role": "user", "content": p.prompt or ""}])
    return ids


def _vocab_by_bytes(engine: Engine) -> dict[bytes, int]:
    """Token bytes -> id, for runs whose endpoint returned token strings or bytes but no ids."""
    rev: dict[bytes, int] = {}
    for i in range(len(engine.tokenizer)):
        rev.setdefault(engine.token_bytes(i), i)
    return rev


def _token_ids(row: dict[str, Any], rev: dict[bytes, int] | None) -> list[int] | None:
    if row["token_ids"] is not None:
        return list(row["token_ids"])
    pieces = row["token_bytes"] or ([t.encode() for t in row["tokens"]] if row["tokens"] is not None else None)
    if pieces is None or rev is None or any(p is None or p not in rev for p in pieces):
        return None
    return [rev[p] for p in pieces]


def compare(reported: list[float | None] | None, rescored: list[float]) -> dict[str, Any]:
    """Per-row figures: |delta| per token, max, mean, KL estimate, first position where the two differ."""
    rescored32 = np.asarray(rescored, dtype=np.float32)
    if reported is None:
        unknown = ("abs_delta", "max_abs_delta", "mean_abs_delta", "kl_estimate", "first_diff")
        return {"rescored_logprobs": rescored32.tolist(), **dict.fromkeys(unknown)}
    rep = np.asarray([math.nan if v is None else v for v in reported], dtype=np.float32)
    delta = np.abs(rep - rescored32)
    known = ~np.isnan(delta)
    differs = np.flatnonzero(known & (rep != rescored32))
    return {
        "rescored_logprobs": rescored32.tolist(),
        "abs_delta": [None if not k else float(d) for d, k in zip(delta, known, strict=True)],
        "max_abs_delta": float(delta[known].max()) if known.any() else None,
        "mean_abs_delta": float(delta[known].mean()) if known.any() else None,
        "kl_estimate": float((rep[known].astype(np.float64) - rescored32[known]).sum()) if known.any() else None,
        "first_diff": int(differs[0]) if len(differs) else None,
    }


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_model(manifest: RunManifest, model: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """Is `model` (with `info`, the rescoring engine's facts) the model that sampled the run?

    The gap rescore measures is sampler vs trainer only when both ran the same model, so a mismatch is recorded.
    `status` is 'same' (the name the run recorded, or the same directory), 'different' (another directory or
    architecture) or 'unverified' (nothing to compare with: e.g. an endpoint's served name). The manifest holds
    names, a path and the architecture, not a hash of the weights, so 'same' is not a proof of equal weights.
    """
    target = manifest.target
    recorded = [str(n) for n in (target.model, target.engine.get("model_path")) if n]
    out = {"model": model, "run_model": target.model, "run_kind": target.kind}

    def verdict(status: str, reason: str) -> dict[str, Any]:
        return {**out, "status": status, "reason": reason}

    run_arch, arch = target.engine.get("architecture"), info.get("architecture")
    if run_arch and arch and run_arch != arch:
        return verdict("different", f"the run was sampled by a {run_arch} model, --model is a {arch} model")
    if model in recorded:
        return verdict("same", "--model is the model name the run recorded")
    given = Path(str(info.get("model_path") or model)).expanduser()
    dirs = [Path(n).expanduser() for n in recorded if Path(n).expanduser().is_dir()]
    if given.is_dir() and dirs:
        if any(_same_dir(given, d) for d in dirs):
            return verdict("same", "--model is the directory the run recorded")
        return verdict("different", f"the run recorded the model {str(dirs[0])!r}, another directory")
    if not recorded:
        return verdict("unverified", "the run's manifest names no model")
    if target.kind == "endpoint":
        served = f"the run sampled the served model {target.model!r} from an endpoint"
        return verdict("unverified", f"{served}; a served name cannot be matched to --model")
    return verdict("unverified", f"the run recorded the model {recorded[-1]!r}, which is not a directory here")


def rescore_run(run_dir: Path, engine: Engine, check: Mapping[str, Any] | None = None) -> None:
    """Rescore every ok row of the run into RUN/rescore.parquet (the summary's rescore section is built from it).

    `check` is check_model's verdict on the rescoring model (computed here when not given); it is recorded with
    the rescore, so the section says whether the gap is between one model's sampler and trainer or two models.
    """
    manifest = load_manifest(run_dir)
    columns = ["sample_index", "prompt_id", "status", "token_ids", "tokens", "token_bytes", "logprobs"]
    table = read_samples(run_dir, columns).to_pylist()
    prompts = _prompt_ids(engine, manifest)
    needs_rev = any(r["status"] == "ok" and r["token_ids"] is None for r in table)
    rev = _vocab_by_bytes(engine) if needs_rev else None
    rows: list[dict[str, Any]] = []
    todo: dict[tuple[str, tuple[int, ...]], list[dict[str, Any]]] = {}
    for r in table:
        if r["status"] != "ok":
            continue
        ids = _token_ids(r, rev)
        if ids is None or r["prompt_id"] not in prompts:
            why = "unknown prompt" if r["prompt_id"] not in prompts else "no token ids, and tokens not in the vocab"
            rows.append({"sample_index": r["sample_index"], "status": "skipped", "reason": why})
            continue
        if not ids:
            rows.append({"sample_index": r["sample_index"], "status": "skipped", "reason": "empty completion"})
            continue
        todo.setdefault((r["prompt_id"], tuple(ids)), []).append(r)
    if not todo:
        raise UsageError(f"{run_dir}: no row can be rescored (no ok rows with token ids or vocabulary tokens)")
    keys = list(todo)
    too_long = [(p, c) for p, c in keys if len(prompts[p]) + len(c) > engine.max_model_len]
    if too_long:  # else the engine's message speaks of "prompt + max_tokens (0)"
        p, longest = max(too_long, key=lambda k: len(prompts[k[0]]) + len(k[1]))
        raise UsageError(
            f"{run_dir}: {sum(len(todo[k]) for k in too_long)} sample(s) do not fit --max-model-len "
            f"{engine.max_model_len}: the longest, of prompt {p}, is {len(prompts[p])} prompt + "
            f"{len(longest)} completion tokens"
        )
    # Each distinct completion is prefilled once, as a trainer would; the engine packs them into batches.
    scored = engine.score([(prompts[p], list(c)) for p, c in keys])
    for key, rescored in zip(keys, scored, strict=True):
        for r in todo[key]:
            rows.append({"sample_index": r["sample_index"], "status": "ok", **compare(r["logprobs"], rescored)})
    rows.sort(key=lambda x: x["sample_index"])
    info = engine.info()
    check = dict(check) if check is not None else check_model(manifest, engine.cfg.model, info)
    facts = {k: info[k] for k in ("kernels", "dtype", "device")}
    write_rescore(run_dir, rows, {"model": engine.cfg.model, **facts, "model_check": check})
