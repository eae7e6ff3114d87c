"""Load test: `detaudit run` with 10,000 requests at concurrency 1,024 against the scripted loopback server.

Samples the detaudit process's RSS and open file descriptors every 50 ms (from /proc), checks that every sample
index is recorded exactly once and reports peak RSS, peak fds and
requests/s (first send to last answer, from the recorded timestamps). The server runs in its own process and
holds each request `--latency` seconds, so the requests really are in flight together.

    python benchmarks/load_test.py --n 10000 --concurrency 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.compute as pc

from detaudit.rundir.io import load_manifest, read_samples

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the scripted loopback server lives with the tests
from servers import spawn  # noqa: E402


def start_server(tmp: Path, latency: float) -> tuple[subprocess.Popen, str]:
    tokens = [f" t{i}" for i in range(32)]
    return spawn({"completions": {"A": tokens}, "default": "A", "latency_s": latency}, tmp)


class Sampler(threading.Thread):
    """Polls /proc/<pid> for VmRSS and the number of open descriptors until the process ends."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss_kb = 0
        self.peak_fds = 0
        self.rss_kb: list[int] = []

    def run(self) -> None:
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                return
            rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_fds = max(self.peak_fds, fds)
            self.rss_kb.append(rss)
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=1024)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server holds each request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server, base_url = start_server(tmp, args.latency)
        out = tmp / "run"
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("detaudit")),
                    "run",
                    "--base-url",
                    base_url,
                    "-p",
                    "load",
                    "-n",
                    str(args.n),
                    "-c",
                    str(args.concurrency),
                    "--out",
                    str(out),
                    "--json",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            sampler = Sampler(proc.pid)
            sampler.start()
            stdout, stderr = proc.communicate()
            wall = time.perf_counter() - t0
            sampler.join(timeout=5)
        finally:
            server.terminate()
            server.wait()
        if proc.returncode != 0:
            raise SystemExit(f"detaudit run failed ({proc.returncode}): {stderr[-800:]}")
        table = read_samples(out, columns=["sample_index", "status", "started_at", "finished_at"])
        idx = table.column("sample_index").to_pylist()
        ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py()
        span = (pc.max(table.column("finished_at")).value - pc.min(table.column("started_at")).value) / 1e6
        summary = json.loads(stdout)
        result = {
            "n": args.n,
            "concurrency": args.concurrency,
            "server_latency_s": args.latency,
            "rows": len(idx),
            "distinct_sample_indices": len(set(idx)),
            "ok": ok,
            "lost": args.n - len(set(idx)),
            "duplicated": len(idx) - len(set(idx)),
            "summary_ok": summary["samples"]["ok"],
            "manifest_status": load_manifest(out).status,
            "requests_per_s": round(args.n / span, 1),
            "command_wall_s": round(wall, 1),
            "peak_rss_mib": round(sampler.peak_rss_kb / 1024, 1),
            "peak_open_fds": sampler.peak_fds,
            # RSS at a quarter, half and three quarters of the run: flat means memory does not grow with N
            "rss_mib_at_25_50_75pct": [
                round(sampler.rss_kb[int(len(sampler.rss_kb) * q)] / 1024, 1) for q in (0.25, 0.5, 0.75)
            ]
            if sampler.rss_kb
            else None,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
