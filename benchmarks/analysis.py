"""Benchmark of the divergence analysis: time and peak memory of summarize_run on a large synthetic run.

    python benchmarks/analysis.py                       # 100k samples x 1k tokens, ids-only and full capture
    python benchmarks/analysis.py --samples 20000 --length 500 --captures ids

Each corpus is shaped like the published Feynman result: one modal completion for ~92% of samples and 79 rarer
variants that fork from it at random depths (all-different: every sample its own completion). Every measurement
runs in a fresh child process (so the peak RSS is the analysis's own) and reports wall and CPU time (user + sys,
resource.getrusage: less sensitive than wall time to other work on a shared machine), peak RSS above two
baselines, Arrow's peak allocation, and the size of samples.parquet. The corpus is written through
detaudit.rundir.io like a real run.

Baselines: "cold" is the interpreter with detaudit, pyarrow.dataset and the allocator loaded; "warm" is the same
process after it has analysed a 50-sample run, so the code pages, thread pools and allocator arenas that any
analysis touches once are in it, and what is left is the memory that grows with the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

CAPTURES = ("ids", "full", "all-different")


def generate(out: Path, samples: int, length: int, capture: str, seed: int = 0) -> Path:
    """Write a finished run directory of `samples` rows of `length` tokens (see module docstring for the shape)."""
    from detaudit.rundir.io import atomic_write_table, rows_to_table, write_manifest
    from detaudit.rundir.schema import SAMPLES_FILE, ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 150_000, size=length)
    if capture == "all-different":
        # the worst case: every sample its own completion, forking at a random depth from a common stem
        forks = rng.integers(0, length, size=samples)
        ids = np.tile(base, (samples, 1))
        tails = np.arange(length)[None, :] >= forks[:, None]
        ids[tails] = rng.integers(0, 150_000, size=int(tails.sum()))
        offsets = pa.array(np.arange(samples + 1, dtype=np.int32) * length)
        unique_table = rows_to_table([{"status": "ok"}] * samples)
        column = pa.ListArray.from_arrays(offsets, pa.array(ids.ravel().astype(np.int32)))
        unique_table = unique_table.set_column(
            unique_table.schema.get_field_index("token_ids"), unique_table.schema.field("token_ids"), column
        )
        assign = np.arange(samples)
    else:
        n_unique = 80
        uniq = [base]
        for _ in range(n_unique - 1):
            fork = int(rng.integers(length // 10, length))
            uniq.append(np.concatenate([base[:fork], rng.integers(0, 150_000, size=length - fork)]))
        weights = np.full(n_unique, 0.08 / (n_unique - 1))
        weights[0] = 0.92
        assign = rng.choice(n_unique, size=samples, p=weights)
        rows = []
        for seq in uniq:
            ids = seq.astype(int).tolist()
            row = {"status": "ok", "token_ids": ids, "text": " ".join(f"w{t}" for t in ids[:200])}
            if capture == "full":
                toks = [f" w{t}" for t in ids]
                lps = rng.uniform(-2, 0, size=length).astype(np.float32)
                row.update(
                    tokens=toks,
                    token_bytes=[t.encode() for t in toks],
                    logprobs=lps.tolist(),
                    top_logprobs=[[float(lp), float(lp) - 1.5] for lp in lps],
                    finish_reason="length",
                    system_fingerprint="fp_bench",
                )
            rows.append(row)
        unique_table = rows_to_table(rows)
    table = unique_table.take(pa.array(assign))
    n = table.num_rows
    for name, values in (
        ("run_id", pa.array(["bench"] * n)),
        ("sample_index", pa.array(np.arange(n), pa.int64())),
        ("prompt_id", pa.array(["p0"] * n)),
        ("arm", pa.array(["c64"] * n)),
        ("concurrency", pa.array(np.full(n, 64), pa.int32())),
        ("repeat", pa.array(np.arange(n), pa.int32())),
    ):
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), values)
    manifest = RunManifest(
        run_id="bench",
        tool_version="bench",
        status="complete",
        created_at=datetime.now(timezone.utc),
        target=TargetSpec(kind="endpoint", base_url="http://127.0.0.1:1/v1", model="bench"),
        params=RequestParams(max_tokens=length),
        prompts=[PromptSpec(prompt_id="p0", prompt="Tell me about Richard Feynman")],
        arms=[ArmSpec(name="c64", concurrency=64)],
        repeats=samples,
        capture="token_ids",
    )
    write_manifest(out, manifest)
    atomic_write_table(out / SAMPLES_FILE, table)
    return out


def _rss_mib() -> float:
    """Peak resident memory of this process. Linux's VmHWM starts afresh at exec; ru_maxrss would carry over
    the (much larger) peak of the parent that generated the corpus."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _arrow_peak_mib() -> float:
    """Peak of Arrow's allocations: the default pool's, plus jemalloc's, which the analysis switches to."""
    pools = [pa.default_memory_pool()]
    try:
        pools.append(pa.jemalloc_memory_pool())
    except NotImplementedError:
        pass
    return sum(p.max_memory() for p in {p.backend_name: p for p in pools}.values()) / 2**20


def measure(run_dir: Path, warm_dir: Path) -> dict:
    """Run summarize_run once in this (fresh) process; time, peak RSS above the cold and the warm baseline."""
    import pyarrow.dataset  # noqa: F401  # code, not data: pq.read_table loads it; count it in the baseline

    from detaudit.analysis.summary import summarize_run

    pa.default_memory_pool()  # load the allocator before taking the baseline
    cold = _rss_mib()
    summarize_run(warm_dir)
    warm = _rss_mib()
    t0, c0 = time.perf_counter(), _cpu_s()
    summary = summarize_run(run_dir)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = _rss_mib()
    arm = summary.prompts[0].arms[0]
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_above_cold_mib": round(peak - cold, 1),
        "peak_rss_above_warm_mib": round(peak - warm, 1),
        "arrow_peak_mib": round(_arrow_peak_mib(), 1),
        "parquet_mib": round((run_dir / "samples.parquet").stat().st_size / 2**20, 1),
        "unique": arm.unique,
        "forks_total": arm.forks_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--captures", default="ids,full", help=f"comma list of {', '.join(CAPTURES)}")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per corpus (the best time is reported)")
    ap.add_argument("--measure", type=Path, nargs=2, help=argparse.SUPPRESS)  # child mode: RUN WARM_RUN
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import pyarrow

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" pyarrow {pyarrow.__version__}, numpy {np.__version__}, {datetime.now(timezone.utc):%Y-%m-%d}"
    )
    print(
        "| corpus | samples x tokens | parquet MiB | best wall s | its CPU s | peak RSS MiB above cold / warm "
        "| Arrow peak MiB | unique | forks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for capture in args.captures.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = generate(Path(tmp) / "run", args.samples, args.length, capture)
            warm_dir = generate(Path(tmp) / "warm", 50, 20, "ids")
            results = []
            for _ in range(args.repeat):
                proc = subprocess.run(
                    [sys.executable, __file__, "--measure", str(run_dir), str(warm_dir)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            best = min(results, key=lambda r: r["wall_s"])
            cold = max(r["peak_rss_above_cold_mib"] for r in results)
            warm = max(r["peak_rss_above_warm_mib"] for r in results)
            print(
                f"| {capture} | {args.samples} x {args.length} | {best['parquet_mib']} | {best['wall_s']} | "
                f"{best['cpu_s']} | {cold} / {warm} | {best['arrow_peak_mib']} | {best['unique']} | "
                f"{best['forks_total']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
