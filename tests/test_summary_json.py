"""summary.json stays byte for byte what it was (detaudit.summary/1) for a set of corpora covering every key, and
reads back into the same typed summary; a summary.json that is not one is refused with the bad key named.

The files under tests/fixtures/summary/ were written by the analysis before it produced typed models; any change
to them is a change of the summary's format: bump SUMMARY_SCHEMA and say so in docs/summary.md first.
Regenerate (only then) with: python tests/test_summary_json.py
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_analysis import ids_rows, make_run, token_rows
from test_report import EVIL, MODAL, NEW_EVIL, NEW_YORK, SHORT
from test_report import make_run as make_report_run

from detaudit.analysis.summary import Limits, summarize_run
from detaudit.analysis.summary_schema import load_summary
from detaudit.errors import RunDirError
from detaudit.rundir.io import write_rescore, write_summary
from detaudit.rundir.schema import SUMMARY_FILE

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "summary"


def feynman_bytes(path: Path) -> Path:
    """Token strings and bytes, two arms, a fork deep in the completion, system_fingerprint varying in one arm."""
    shared = [f" t{i}" for i in range(14)]
    queens, new = shared + [" Queens", ",", " New", " York"], shared + [" New", " York", " City"]
    c1 = token_rows([queens] * 6, arm="c1", system_fingerprint="fp_a")
    c8 = token_rows([queens] * 5, arm="c8", system_fingerprint="fp_a")
    c8 += token_rows([queens] * 2 + [new] * 2, arm="c8", system_fingerprint="fp_b")
    return make_run(path, c1 + c8, arms=(("c1", 1), ("c8", 8)), capture="tokens")


def ids_nested(path: Path) -> Path:
    """Token ids with top-k logprobs: nested forks, margins, parents, and lists cut by small limits."""
    top = [[-0.1, -4.0], [-0.5, -0.55], [-0.2, -2.0], [-0.3, -0.3125]]
    seqs = [[1, 1, 7, 3]] * 6 + [[1, 1, 8]] * 5 + [[1, 2, 9, 4]] * 2 + [[2]] + [[1, 3]] + [[]]
    rows = [{**r, "top_logprobs": top[: len(r["token_ids"])]} for r in ids_rows(seqs)]
    return make_run(path, rows)


def text_prompts(path: Path) -> Path:
    """Text only, three prompts (one all errors), an arm found only in the rows, non-ASCII text, a null text."""
    rows = [{"text": "naïve world", "prompt_id": "a"}] * 3 + [{"text": "naïve there", "prompt_id": "a"}]
    rows += [{"text": None, "prompt_id": "a"}, {"text": "日本語", "prompt_id": "b"}, {"text": "日本", "prompt_id": "b"}]
    rows += [{"status": "error", "error": "HTTP 503", "prompt_id": "c"}] * 2
    return make_run(path, rows, prompts=("a", "b", "c"), capture="text")


def errors_only(path: Path) -> Path:
    return make_run(path, [{"status": "error", "error": "timeout"}] * 3)


def long_text(path: Path) -> Path:
    """Completions past the display limit (the text is clipped, text_chars says how long it was)."""
    rows = [{"token_ids": [1, 2], "text": "x" * 9000}] * 2 + [{"token_ids": [1, 3], "text": "y" * 8193}]
    return make_run(path, rows)


def report_run(path: Path) -> Path:
    """The report tests' endpoint run: hostile markup as a token, errors, fingerprints varying across arms."""
    return make_report_run(
        path,
        {"c1": (1, [(MODAL, 6)]), "c16": (16, [(MODAL, 5), (NEW_YORK, 2), (NEW_EVIL, 1), (SHORT, 1)])},
        errors={"c16": 1},
        prompt=f"Tell me about {EVIL}",
        fingerprint=lambda arm, repeat: "fp_a" if arm == "c1" or repeat % 2 else None,
    )


def rescored(path: Path) -> Path:
    """A run with a rescore.parquet: the summary's rescore section, model check included."""
    make_run(path, ids_rows([[1, 2]] * 2 + [[1, 3]] * 2))
    rows = [
        {"sample_index": 0, "status": "ok", "abs_delta": [0.0, 0.25], "first_diff": 1, "kl_estimate": 0.25},
        {"sample_index": 1, "status": "ok", "abs_delta": [0.0, 0.0], "first_diff": None, "kl_estimate": 0.0},
        {"sample_index": 2, "status": "ok", "abs_delta": [0.5], "first_diff": 0, "kl_estimate": 0.5},
        {"sample_index": 3, "status": "skipped", "reason": "too long"},
    ]
    check = {"model": "m", "run_model": "m", "run_kind": "endpoint", "status": "same", "reason": "same name"}
    info = {"model": "m", "kernels": "stock", "dtype": "float32", "device": "cpu", "model_check": check}
    write_rescore(path, rows, info)
    return path


CORPORA: dict[str, tuple[Callable[[Path], Path], Limits]] = {
    "feynman_bytes": (feynman_bytes, Limits()),
    "ids_nested": (ids_nested, Limits(completions=4, forks=3, branches=2)),
    "text_prompts": (text_prompts, Limits()),
    "errors_only": (errors_only, Limits()),
    "long_text": (long_text, Limits()),
    "report_run": (report_run, Limits()),
    "rescored": (rescored, Limits()),
}


def written_summary(name: str, tmp_path: Path) -> bytes:
    """summary.json as `detaudit analyze` writes it for corpus `name`."""
    build, limits = CORPORA[name]
    run = build(tmp_path / name)
    write_summary(run, summarize_run(run, limits))
    return (run / SUMMARY_FILE).read_bytes()


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_summary_json_is_unchanged(name, tmp_path):
    assert written_summary(name, tmp_path) == (FIXTURES / f"{name}.json").read_bytes()


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_summary_json_reads_back_as_the_same_summary(name, tmp_path):
    build, limits = CORPORA[name]
    run = build(tmp_path / name)
    summary = summarize_run(run, limits)
    write_summary(run, summary)
    assert load_summary(run) == summary


def _edited(tmp_path: Path, edit) -> Path:
    """A run whose summary.json was edited by hand."""
    run = report_run(tmp_path / "run")
    write_summary(run, summarize_run(run))
    doc = json.loads((run / SUMMARY_FILE).read_text())
    edit(doc)
    (run / SUMMARY_FILE).write_text(json.dumps(doc))
    return run


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["prompts"][0]["arms"][1].update(ok="many"),
            r"at prompts\.0\.arms\.1\.ok: Input should be a valid integer",
        ),
        (
            lambda d: d["prompts"][0]["arms"][0]["completions"][0].pop("text_chars"),
            r"completions\.0\.text_chars: Field required",
        ),
        (lambda d: d.update(schema="detaudit.summary/2"), r"at schema: Input should be 'detaudit.summary/1'"),
        (lambda d: d["agreement"].update(shares=1.0), r"at agreement\.shares: Extra inputs are not permitted"),
        (lambda d: d["prompts"][0].update(verdict="fine"), r"at prompts\.0\.verdict: Input should be 'deterministic'"),
    ],
)
def test_a_summary_json_that_is_not_one_is_refused_naming_the_key(tmp_path, edit, message):
    with pytest.raises(RunDirError, match=message + ".*rebuild it with `detaudit analyze"):
        load_summary(_edited(tmp_path, edit))


def test_a_missing_or_unreadable_summary_json_is_a_run_dir_error(tmp_path):
    run = errors_only(tmp_path / "run")
    with pytest.raises(RunDirError, match="no summary"):
        load_summary(run)
    (run / SUMMARY_FILE).write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable summary"):
        load_summary(run)


if __name__ == "__main__":
    import tempfile

    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in CORPORA:
            (FIXTURES / f"{corpus}.json").write_bytes(written_summary(corpus, Path(tmp)))
