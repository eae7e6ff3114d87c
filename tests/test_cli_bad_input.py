"""Bad input to the smaller commands (probe endpoint, probe kernels, tiny-model, report, demo): one `error:` line on
stderr, exit 2, nothing written. `run`, `gate` and `rescore` have their own files (test_run_bad_input.py,
test_gate_cli.py, test_rescore.py)."""

from __future__ import annotations

import pytest
from runhelp import cli, tree_snapshot
from servers import free_port
from test_report import MODAL, make_run


def _one_error_line(r, fragment: str) -> None:
    assert r.code == 2, (r.code, r.err)
    assert r.err.count("\n") == 1 and r.err.startswith("error:") and "internal error" not in r.err, r.err
    assert fragment in r.err, r.err


# Each was an internal error (exit 70), or, for the empty URL, a probe of https://api.openai.com/v1.
BASE_URLS = [
    ("http://127.0.0.1:99999/v1", "Port out of range"),
    ("http://127.0.0.1:abc/v1", "Port could not be cast"),
    ("http://[::1/v1", "Invalid IPv6 URL"),
    ("http:///v1", "names no host"),
    ("", "must start with http:// or https://, got ''"),
    ("http://xn--abc-.invalid-/v1", "A-label must not end with a hyphen"),  # IDNA, from inside httpx
]


@pytest.mark.parametrize("url,fragment", BASE_URLS, ids=[u or "empty" for u, _ in BASE_URLS])
def test_probe_endpoint_refuses_an_unusable_base_url(url, fragment, capsys) -> None:
    _one_error_line(cli(capsys, "probe", "endpoint", "--base-url", url, "-m", "x"), fragment)


def test_probe_endpoint_names_the_bad_option(capsys) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    # one message named both options, whichever was wrong
    _one_error_line(cli(capsys, "probe", "endpoint", "--base-url", url, "--timeout", "-1"), "--timeout must be > 0")
    r = cli(capsys, "probe", "endpoint", "--base-url", url, "--retries", "-1")
    _one_error_line(r, "--retries must be >= 0, got -1")
    assert "--timeout" not in r.err


@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_seeds_past_torchs_range_are_refused(seed, capsys, tmp_path) -> None:
    # past 2**64 - 1 torch.manual_seed raised ValueError: an internal error, after the command had started
    r = cli(capsys, "tiny-model", tmp_path / "m", "--seed", seed)
    _one_error_line(r, "Invalid value for '--seed'")
    assert not (tmp_path / "m").exists()
    _one_error_line(cli(capsys, "probe", "kernels", "--quick", "--seed", seed), "Invalid value for '--seed'")


def test_tiny_model_onto_a_file(capsys, tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    _one_error_line(cli(capsys, "tiny-model", tmp_path / "f"), "f exists and is not a directory")  # "f: Not a dir…"
    assert (tmp_path / "f").read_text() == "x"


def test_report_refuses_two_outputs_in_one_file(capsys, tmp_path) -> None:
    run = make_run(tmp_path / "run", {"c1": (1, [(MODAL, 3)])})
    before = tree_snapshot(tmp_path)
    # the Markdown silently replaced the HTML report (exit 0)
    r = cli(capsys, "report", run, "--html", tmp_path / "r", "--md", tmp_path / "r")
    _one_error_line(r, "--html and --md name the same file")
    assert tree_snapshot(tmp_path) == before


def test_demo_refuses_a_run_directory_and_a_too_long_completion(capsys, tmp_path) -> None:
    run = make_run(tmp_path / "run", {"c1": (1, [(MODAL, 3)])})
    before = tree_snapshot(tmp_path)
    # the demo wrote its model/, runs/ and reports into the run directory
    _one_error_line(cli(capsys, "demo", "--out", run), "is a run directory")
    # failed only after building, serving and auditing the model, in two lines
    _one_error_line(cli(capsys, "demo", "--out", tmp_path / "demo", "--max-tokens", "4096"), "leaves no room")
    assert tree_snapshot(tmp_path) == before


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, tmp_path) -> None:
    # --debug re-raised the error: Python printed the traceback and exited 1 instead of 2
    r = cli(capsys, "--debug", "analyze", tmp_path / "missing")
    assert r.code == 2 and "Traceback (most recent call last)" in r.err and "RunDirError" in r.err
    assert r.err.rstrip().splitlines()[-1].startswith("error:") and "no such run directory" in r.err
