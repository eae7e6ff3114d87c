"""Requests/s of `detaudit run` against a bare httpx asyncio loop, same loopback server, same concurrency.

The scripted server (tests/scripted_server.py) runs in its own process. The bare loop sends the very body detaudit
sends (logprobs, top_logprobs 2, return_token_ids) with the same number of requests in flight and only parses the
JSON, once with one httpx client (a plain loop) and once with connections split over clients of POOL_SIZE as
detaudit's client does (so the difference to detaudit is the recording alone). `detaudit run` also retries,
parses every token, counts distinct completions and flushes Parquet shards.
detaudit's figure is its arm's requests/s from the recorded timestamps (first send to last answer) — the probe,
process start and final summary are reported separately as wall time.

    python benchmarks/run_throughput.py --n 5000 --concurrency 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc

from detaudit.audit.client import POOL_SIZE
from detaudit.rundir.io import read_samples

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the scripted loopback server lives with the tests
from servers import spawn  # noqa: E402

TOKENS = [f" tok{i}" for i in range(64)]  # a 64-token completion
PROMPT = "Tell me about Richard Feynman"


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    return spawn({"completions": {"A": TOKENS}, "default": "A"}, tmp)


async def bare_loop(base_url: str, n: int, concurrency: int, pool_size: int | None = None) -> float:
    """n requests, `concurrency` in flight, JSON parsed and dropped. pool_size: split connections over several
    httpx clients of that size, as detaudit does (None: one client, as a plain loop would)."""
    body = {
        "model": "scripted-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "return_token_ids": True,
    }
    n_pools = 1 if pool_size is None else -(-concurrency // pool_size)
    per_pool = -(-(concurrency + 4) // n_pools)
    limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    clients = [httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) for _ in range(n_pools)]
    queue = list(range(n))

    async def worker(slot: int) -> None:
        client = clients[slot % n_pools]
        while queue:
            queue.pop()
            resp = await client.post("/chat/completions", json=body)
            json.loads(resp.content)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(i) for i in range(concurrency)])
        return n / (time.perf_counter() - t0)
    finally:
        for c in clients:
            await c.aclose()


def detaudit_run(base_url: str, n: int, concurrency: int, out: Path) -> tuple[float, float]:
    exe = str(Path(sys.executable).with_name("detaudit"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            exe,
            "run",
            "--base-url",
            base_url,
            "-p",
            PROMPT,
            "-n",
            str(n),
            "-c",
            str(concurrency),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"detaudit run failed: {proc.stderr[-500:]}")
    table = read_samples(out, columns=["started_at", "finished_at", "status"])
    assert table.num_rows == n and pc.all(pc.equal(table.column("status"), "ok")).as_py()
    span = (pc.max(table.column("finished_at")).value - pc.min(table.column("started_at")).value) / 1e6
    return n / span, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server, base_url = start_server(tmp)
        try:
            asyncio.run(bare_loop(base_url, 200, args.concurrency))  # warm up both sides
            bare, sharded, ours, walls = [], [], [], []
            for r in range(args.rounds):
                bare.append(asyncio.run(bare_loop(base_url, args.n, args.concurrency)))
                sharded.append(asyncio.run(bare_loop(base_url, args.n, args.concurrency, POOL_SIZE)))
                rps, wall = detaudit_run(base_url, args.n, args.concurrency, tmp / f"run{r}")
                ours.append(rps)
                walls.append(wall)
                print(
                    f"round {r}: bare {bare[-1]:.0f} req/s, bare with pools of {POOL_SIZE} {sharded[-1]:.0f} req/s, "
                    f"detaudit {rps:.0f} req/s (command wall {wall:.1f} s)",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait()
    b, p, d = statistics.median(bare), statistics.median(sharded), statistics.median(ours)
    print(
        json.dumps(
            {
                "n": args.n,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "bare_rps_median": round(b, 1),
                "bare_pooled_rps_median": round(p, 1),
                "detaudit_rps_median": round(d, 1),
                "ratio_vs_bare": round(d / b, 3),
                "ratio_vs_bare_pooled": round(d / p, 3),
                "detaudit_wall_s_median": round(statistics.median(walls), 2),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "httpx": httpx.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
