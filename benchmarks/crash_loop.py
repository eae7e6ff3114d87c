"""Crash safety: kill -9 `detaudit run` at 20 moments, `--resume` after each, and count what was lost or doubled.

Kill moments cycle through three kinds: a random delay after start; the instant a shard's temporary file appears
(a kill during a shard write); and the instant the final samples.parquet's temporary file appears (a kill during
the fold at the end). After every kill each Parquet file on disk must be readable; at the end the run must hold
exactly N sample indices, none lost, none twice.

One answer in a hundred is poisoned: a token that is a lone surrogate (JSON "\ud800"), which no UTF-8 column can
hold. The answer parser may turn it into an error row; if it lets it through, the writer records that row as an
`unwritable` error row and stops the run (exit 3, status failed). Either way nothing may be lost: a run that
stopped is resumed like a killed one, until one ends complete.

    python benchmarks/crash_loop.py --kills 20 --n 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from detaudit.rundir.io import load_manifest, read_samples

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the scripted loopback server lives with the tests
from servers import spawn  # noqa: E402

DETAUDIT = str(Path(sys.executable).with_name("detaudit"))


POISON = [{"token": " t0"}, {"token": "\ud800", "bytes": [0xED, 0xA0, 0x80]}, {"token": " end"}]
MAX_FINAL_RESUMES = 20  # each resume may meet the poison again (1 % of the answers it sends)


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    tokens = [f" t{i}" for i in range(48)]
    return spawn(
        {
            "completions": {"A": tokens, "B": tokens[:20] + [" fork"], "P": POISON},
            "schedules": {"crash": [["A", 98], ["B", 1], ["P", 1]]},
            "latency_s": 0.005,
        },
        tmp,
    )


def _tmp_files(out: Path, where: str) -> list[Path]:
    d = out / "shards" if where == "shard" else out
    return list(d.glob(".part-*.tmp")) if where == "shard" else list(d.glob(".samples.parquet.*.tmp"))


def kill_at(proc: subprocess.Popen, out: Path, mode: str, rng: random.Random, limit: float = 30.0) -> str:
    """Wait for the moment `mode` names, then SIGKILL. Returns what the moment turned out to be."""
    deadline = time.monotonic() + limit
    while not (out / "manifest.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return "finished before the kill"
        time.sleep(0.002)
    if mode == "random":
        time.sleep(rng.uniform(0.05, 2.0))
        seen = "random"
    else:
        seen = "random (no write seen in time)"
        while time.monotonic() < deadline and proc.poll() is None:
            if _tmp_files(out, mode):
                seen = f"during {mode} write"
                break
            time.sleep(0.0005)
    if proc.poll() is not None:
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if mode != "random" and seen.startswith("during") and not _tmp_files(out, mode):
        seen += " (write had just completed)"
    return seen


def check_readable(out: Path) -> int:
    """Read every Parquet file of the run; returns the number of raw rows on disk (copies included)."""
    files = [out / "samples.parquet"] if (out / "samples.parquet").exists() else []
    files += sorted((out / "shards").glob("part-*.parquet")) if (out / "shards").is_dir() else []
    return sum(pq.read_table(f).num_rows for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--n", type=int, default=1000, help="requests per arm (two arms: concurrency 1 and 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    modes = ["random", "shard", "samples"]
    events = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server, base_url = start_server(tmp)
        out = tmp / "run"
        cmd = [
            DETAUDIT,
            "run",
            "--base-url",
            base_url,
            "-p",
            "crash",
            "-n",
            str(args.n),
            "-c",
            "1,16",
            "--out",
            str(out),
        ]
        resume = [DETAUDIT, "run", "--resume", "--out", str(out)]
        try:
            started = time.perf_counter()
            first = True
            kills = 0
            while kills < args.kills:
                if not first and load_manifest(out).status == "complete":
                    # the run got to the end between kills: start a fresh one so every kill hits a live run
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                    first = True
                proc = subprocess.Popen(cmd if first else resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                first = False
                mode = modes[kills % len(modes)]
                moment = kill_at(proc, out, mode, rng)
                if moment == "finished before the kill":  # complete, or failed by the poison (exit 3)
                    events.append(
                        {
                            "mode": mode,
                            "moment": moment,
                            "exit": proc.returncode,
                            "status": load_manifest(out).status if (out / "manifest.json").exists() else None,
                        }
                    )
                    continue
                kills += 1
                raw = check_readable(out)
                have = read_samples(out).num_rows
                events.append(
                    {
                        "kill": kills,
                        "mode": mode,
                        "moment": moment,
                        "rows_recorded": have,
                        "raw_rows_on_disk": raw,
                        "status": load_manifest(out).status,
                    }
                )
                print(json.dumps(events[-1]), flush=True)
            final_codes = []
            while len(final_codes) < MAX_FINAL_RESUMES and (not final_codes or final_codes[-1] != 0):
                final = subprocess.run(resume, capture_output=True, text=True)
                final_codes.append(final.returncode)
                status = load_manifest(out).status
                if final.returncode not in (0, 3) or (final.returncode == 3) != (status == "failed"):
                    raise SystemExit(f"--resume exit {final.returncode} with status {status}: {final.stderr[-800:]}")
            elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait()
        if final_codes[-1] != 0:
            raise SystemExit(f"no --resume completed the run in {MAX_FINAL_RESUMES}: {final.stderr[-800:]}")
        table = read_samples(out)
        idx = Counter(table.column("sample_index").to_pylist())
        expected = 2 * args.n
        raw_rows = check_readable(out)
        result = {
            "kills": args.kills,
            "expected_samples": expected,
            "final_rows": table.num_rows,
            "lost": len(set(range(expected)) - set(idx)),
            "duplicated": sum(c - 1 for c in idx.values()),
            "raw_rows_on_disk": raw_rows,
            "temp_files_left": len(list(out.rglob("*.tmp"))),
            "ok": sum(s == "ok" for s in table.column("status").to_pylist()),
            "error_reasons": dict(Counter(r for r in table.column("error_reason").to_pylist() if r is not None)),
            "status": load_manifest(out).status,
            "sessions_failed_by_the_poison": sum(e.get("status") == "failed" for e in events) + final_codes.count(3),
            "final_resumes": len(final_codes),
            "kills_during_shard_write": sum(e.get("moment", "").startswith("during shard") for e in events),
            "kills_during_final_fold": sum(e.get("moment", "").startswith("during samples") for e in events),
            "runs_that_finished_before_their_kill": sum(e["moment"] == "finished before the kill" for e in events),
            "elapsed_s": round(elapsed, 1),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
        print(json.dumps(result, indent=2))
        if result["lost"] or result["duplicated"] or result["final_rows"] != expected:
            raise SystemExit("FAILED: samples lost or duplicated")


if __name__ == "__main__":
    main()
