"""Run directories and reports are for sharing: every file detaudit writes takes the mode a plain open() would give
it under the user's umask (issue #21: atomic writes through mkstemp left them owner-only, 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from runhelp import cli


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("umask")
def test_run_directory_and_reports_follow_the_umask(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server()
    run = tmp_path / "run"
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 3, "-c", "1,2", "--out", run)
    assert r.code == 0, r.err
    reports = tmp_path / "reports"
    reports.mkdir()
    r = cli(capsys, "report", run, "--html", reports / "r.html", "--md", reports / "r.md", "--junit", reports / "j.xml")
    assert r.code == 0, r.err
    modes = _modes(run) | {f"reports/{k}": v for k, v in _modes(reports).items()}
    assert {"manifest.json", "samples.parquet", "summary.json", "reports/r.html", "reports/r.md"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes  # 0666 less 027: group-readable, never owner-only


def test_the_mode_follows_a_umask_set_after_import(tmp_path) -> None:
    from detaudit.rundir.io import atomic_write_bytes

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            atomic_write_bytes(tmp_path / "f", b"x")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
