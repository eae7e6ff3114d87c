"""Progress for every step that takes longer than a second: rich bars and spinners on a terminal, plain lines when
the output is not one (a CI log, a pipe), where rich would draw nothing until the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn

from detaudit.termsafe import safe

# A plain progress line for a task at most this often (besides its first and its last).
PLAIN_EVERY_S = 5.0


@dataclass
class _Task:
    description: str
    total: float | None
    done: float
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    printed: float = 0.0
    finished: bool = False


class PlainProgress:
    """The part of rich.progress.Progress that detaudit's runners use (add_task, update, remove_task, start, stop,
    with), as plain lines: one when a task starts, then at most every `every_s` seconds, and one when it ends."""

    def __init__(
        self,
        console: Console,
        every_s: float = PLAIN_EVERY_S,
        formats: Mapping[str, Callable[[Any], str]] | None = None,
    ) -> None:
        self.console, self.every_s = console, every_s
        self.formats = dict(formats or {})  # field -> how a line shows it (as the bar's column would)
        self._tasks: dict[int, _Task] = {}
        self._next_id = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Nothing to draw: lines are printed as tasks move."""

    def stop(self) -> None:
        """The last line of every task that has not printed its end (an interrupted arm says how far it got)."""
        for task in self._tasks.values():
            if not task.finished and task.total is not None:
                self._print(task)
        self._tasks.clear()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> TaskID:
        task_id, self._next_id = self._next_id, self._next_id + 1
        task = _Task(description, total, completed, fields)
        self._tasks[task_id] = task
        self._print(task)
        return TaskID(task_id)

    def update(
        self,
        task_id: TaskID,
        *,
        advance: float = 0,
        completed: float | None = None,
        total: float | None = None,
        **fields: Any,
    ) -> None:
        task = self._tasks[task_id]
        task.done = completed if completed is not None else task.done + advance
        task.total = total if total is not None else task.total
        task.fields.update(fields)
        ended = task.total is not None and task.done >= task.total
        if (ended and not task.finished) or time.monotonic() - task.printed >= self.every_s:
            task.finished = ended
            self._print(task)

    def remove_task(self, task_id: TaskID) -> None:
        task = self._tasks.pop(task_id)
        if task.total is None:  # a spinner's task (loading a model): say how long it took
            self.console.print(
                f"{safe(task.description)} done in {time.monotonic() - task.started:.0f} s",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )

    def _print(self, task: _Task) -> None:
        task.printed = time.monotonic()
        if task.total is None:
            line = task.description
        else:
            share = f" ({int(100 * task.done / task.total)}%)" if task.total else ""  # 999/1000 is not 100%
            extra = "".join(f", {k} {self.formats.get(k, str)(v)}" for k, v in task.fields.items())
            took = task.printed - task.started
            line = f"{task.description}: {task.done:.0f}/{task.total:.0f}{share}{extra}, {took:.0f} s"
        self.console.print(safe(line), highlight=False, markup=False, soft_wrap=True)


def bars(
    console: Console,
    *columns: ProgressColumn | str,
    transient: bool = False,
    formats: Mapping[str, Callable[[Any], str]] | None = None,
) -> Progress | PlainProgress:
    """rich bars with these columns on a terminal, plain lines otherwise (`formats`: how a line shows a field)."""
    if not console.is_terminal:
        return PlainProgress(console, formats=formats)
    return Progress(*columns, console=console, transient=transient, refresh_per_second=4)


@contextmanager
def arm_progress(
    console: Console, loading: str, label: Callable[[str], str] = str
) -> Iterator[Callable[[str, int, int], None]]:
    """The local engine's progress callback (arm, done, total): `loading` until the first arm starts (the model is
    loading), then one bar per arm named `label(arm)`."""
    with bars(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {"": bar.add_task(loading, total=None)}

        def progress(arm: str, done: int, total: int) -> None:
            if "" in tasks:
                bar.remove_task(tasks.pop(""))
            if arm not in tasks:
                tasks[arm] = bar.add_task(label(arm), total=total)
            bar.update(tasks[arm], completed=done)

        yield progress


@contextmanager
def loading(console: Console, message: str) -> Iterator[None]:
    """A step with no count to show (loading a model): a spinner on a terminal, a line before and after otherwise."""
    if console.is_terminal:
        with console.status(message):
            yield
        return
    t0 = time.monotonic()
    console.print(safe(message), highlight=False, markup=False, soft_wrap=True)
    yield
    console.print(
        f"{safe(message)} done in {time.monotonic() - t0:.0f} s", highlight=False, markup=False, soft_wrap=True
    )
