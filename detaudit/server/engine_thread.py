"""The engine's own thread: `detaudit serve`'s requests share its packed steps, as they would in `detaudit local`.

HTTP handlers submit sequences and await per-step events; the thread admits submitted sequences between steps,
drops aborted ones at once (their KV blocks and batch seat go to the requests still waiting), and keeps a step that
raises to the requests that made it raise.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass

from detaudit.engine.llm import Engine, StepError
from detaudit.engine.sequence import Sequence
from detaudit.errors import UsageError
from detaudit.server.schemas import ApiError


@dataclass
class _Job:
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class AsyncEngine:
    """Owns the engine in one thread: admits submitted sequences between steps, reports progress per step."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[_Job] = []
        self._aborts: list[Sequence] = []
        self._flushes: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._jobs: dict[int, _Job] = {}
        self._sent: dict[int, int] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="detaudit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> asyncio.Queue:
        with self._lock:
            if len(self._incoming) + len(self.engine.scheduler.waiting) >= self.max_queue:
                raise ApiError(503, "the server is overloaded; retry later", type_="server_error", code="overloaded")
            job = _Job(seq, asyncio.get_running_loop(), asyncio.Queue())
            self._incoming.append(job)
        self._wake.set()
        return job.events

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (waiting, running, or not yet admitted); idempotent."""
        with self._lock:
            self._aborts.append(seq)
        self._wake.set()

    def flush_prefix_cache(self) -> asyncio.Future[None]:
        """Empty the engine's prefix cache between two steps, before any request submitted after this call is
        admitted; the future is done once it is empty."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._flushes.append((loop, done))
        self._wake.set()
        return done

    def load(self) -> dict[str, int]:
        """Sequences running and waiting (for /health): how an operator sees that aborted requests are gone."""
        with self._lock:
            incoming = len(self._incoming)
        return {"running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting) + incoming}

    def _emit(self, job: _Job, event: tuple) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                flushes, self._flushes = self._flushes, []
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
            if flushes:
                self.engine.flush_prefix_cache()
                for loop, done in flushes:
                    loop.call_soon_threadsafe(done.set_result, None)
            for job in incoming:
                try:
                    self.engine.add(job.seq)
                except UsageError as e:  # the handler checks first; the engine's own refusal stays this request's
                    self._emit(job, ("error", ApiError(400, str(e))))
                    continue
                except Exception as e:  # never let one request kill the engine thread
                    self._emit(job, ("error", ApiError(500, f"cannot admit: {e}", type_="server_error")))
                    continue
                self._jobs[job.seq.seq_id] = job
                self._sent[job.seq.seq_id] = 0
            for seq in aborts:
                if seq.seq_id in self._jobs:
                    self.engine.scheduler.abort(seq)
                    self._forget(seq)
            if not self.engine.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                finished = self.engine.step()
            except StepError as e:  # the engine found which requests raise: only they fail, the others go on
                print(f"detaudit serve: {e} ({len(e.failed)} request(s) failed)", file=sys.stderr, flush=True)
                for seq in e.failed:
                    if seq.seq_id in self._jobs:
                        self._emit(self._jobs[seq.seq_id], ("error", ApiError(500, str(e), type_="server_error")))
                        self._forget(seq)
                finished = e.finished
            except Exception as e:  # outside the forward: nothing says which request, so fail those in flight
                print(f"detaudit serve: engine step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for job in list(self._jobs.values()):
                    self.engine.scheduler.abort(job.seq)
                    self._emit(
                        job,
                        ("error", ApiError(500, f"engine step failed: {type(e).__name__}: {e}", type_="server_error")),
                    )
                    self._forget(job.seq)
                continue
            for seq_id, job in list(self._jobs.items()):
                n = len(job.seq.output_ids)
                if n > self._sent[seq_id]:
                    self._sent[seq_id] = n
                    self._emit(job, ("tokens", n))
            for seq in finished:
                if seq.seq_id in self._jobs:
                    self._emit(self._jobs[seq.seq_id], ("done", len(seq.output_ids)))
                    self._forget(seq)
        for job in self._jobs.values():
            self._emit(job, ("error", ApiError(503, "the server is shutting down", type_="server_error")))

    def _forget(self, seq: Sequence) -> None:
        self._jobs.pop(seq.seq_id, None)
        self._sent.pop(seq.seq_id, None)
