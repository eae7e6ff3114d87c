"""Every step longer than a second shows progress (issue #21 item 5): on a terminal rich bars, elsewhere (CI logs,
pipes: rich draws nothing there until the end) plain lines: one when a step starts, at most every few seconds, and
one when it ends. The tests' captured output is not a terminal, so it carries the plain lines."""

from __future__ import annotations

import pytest
from rich.console import Console
from runhelp import cli

from detaudit.cli.progress import PlainProgress


def test_run_prints_plain_progress_lines_per_arm(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server()
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 5, "-c", "1,2", "--out", tmp_path / "r")
    assert r.code == 0, r.err
    lines = r.err.splitlines()
    assert "arm c1: 0/5 (0%), errors 0, distinct 0, 0 s" in lines
    assert any(line.startswith("arm c1: 5/5 (100%), errors 0, distinct 1, ") for line in lines), r.err
    assert any(line.startswith("arm c2: 5/5 (100%), errors 0, distinct 1, ") for line in lines), r.err
    assert "━" not in r.err  # no bar drawn into a log


@pytest.mark.usefixtures("one_torch_thread")
def test_local_prints_loading_and_arm_lines(tiny_model_dir, capsys, tmp_path) -> None:
    args = ["local", "--model", tiny_model_dir, "-p", "def f(", "-n", 2, "--max-tokens", 3, "--max-batch", 4]
    r = cli(capsys, *args, "--out", tmp_path / "l")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    loading = f"loading {tiny_model_dir} (stock kernels)"
    assert loading in lines and any(line.startswith(f"{loading} done in ") for line in lines), r.out
    # the default scenarios: the serial control arm, then the loaded one
    for arm in ("serial", "mixed"):
        assert any(line.startswith(f"{arm} (stock): 2/2 (100%), ") for line in lines), r.out


def test_plain_lines_are_throttled_and_the_last_one_is_always_shown(capsys) -> None:
    progress = PlainProgress(Console(), every_s=3600)
    task = progress.add_task("arm c1", total=1000, errors=0)
    for _ in range(999):
        progress.update(task, advance=1, errors=0)
    progress.stop()  # interrupted at 999: the line says how far it got
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", errors")[0] for line in lines] == ["arm c1: 0/1000 (0%)", "arm c1: 999/1000 (99%)"]
