"""`detaudit compare A B`: setup differences, modal equality and where two runs' modal completions part."""

from __future__ import annotations

import json

from runhelp import cli
from test_analysis import ids_rows, make_run, token_rows

from detaudit.analysis.compare import compare_runs


def test_a_run_against_itself(tmp_path):
    run = make_run(tmp_path / "a", ids_rows([[1, 2, 3]] * 4 + [[1, 2, 4]]))
    result = compare_runs(run, run)
    assert result["same_prompts"] and result["same_params"] and result["same_model"]
    assert result["all_modal_equal"] is True and result["compared_as"] == "token_ids"
    (p,) = result["prompts"]
    assert p["modal_equal"] and p["modal_split"] is None and p["unique"] == {"a": 2, "b": 2}
    assert p["earliest_fork"] == {"a": 2, "b": 2} and p["modal_share"] == {"a": 0.8, "b": 0.8}


def test_modal_completions_part_at_the_first_differing_token(tmp_path):
    a = make_run(tmp_path / "a", token_rows([["The", " cat", " sat", "."]] * 3 + [["The", " dog"]]), capture="tokens")
    b = make_run(tmp_path / "b", token_rows([["The", " cat", " lay", "."]] * 5), capture="tokens")
    result = compare_runs(a, b)
    assert result["all_modal_equal"] is False and result["compared_as"] == "token_bytes"
    (p,) = result["prompts"]
    assert p["modal_split"] == {"position": 2, "prefix": "The cat", "a": " sat", "b": " lay"}
    assert p["unique"] == {"a": 2, "b": 1} and p["earliest_fork"] == {"a": 1, "b": None}
    assert p["verdict"] == {"a": "load-independent", "b": "deterministic"}


def test_modal_that_is_a_prefix_parts_where_it_ends(tmp_path):
    a = make_run(tmp_path / "a", ids_rows([[1, 2]] * 2))
    b = make_run(tmp_path / "b", ids_rows([[1, 2, 3]] * 2))
    (p,) = compare_runs(a, b)["prompts"]
    assert (p["modal_split"]["position"], p["modal_split"]["a"], p["modal_split"]["b"]) == (2, "", "<id:3>")


def test_different_captures_fall_back_to_the_common_unit(tmp_path):
    """Ids on one side, text only on the other: the modal completions are compared as characters."""
    a = make_run(tmp_path / "a", [{"token_ids": [1, 2], "text": "hello world"}] * 3)
    b = make_run(tmp_path / "b", [{"text": "hello there"}] * 3, capture="text")
    result = compare_runs(a, b)
    assert result["compared_as"] == "text"
    assert result["prompts"][0]["modal_split"] == {"position": 6, "prefix": "hello ", "a": "w", "b": "t"}


def test_setup_differences_are_reported(tmp_path):
    a = make_run(tmp_path / "a", ids_rows([[1]] * 2), prompts=("p0",))
    b = make_run(tmp_path / "b", [{**r, "prompt_id": "p1"} for r in ids_rows([[1]] * 2)], prompts=("p1",))
    manifest = b / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"max_tokens": 16', '"max_tokens": 32'))
    result = compare_runs(a, b)
    assert result["same_prompts"] is False and result["same_params"] is False
    assert result["param_differences"] == {"max_tokens": [16, 32]}
    assert result["prompt_differences"] == [
        {"prompt_id": "p0", "what": "only in A"},
        {"prompt_id": "p1", "what": "only in B"},
    ]
    assert result["prompts"] == [] and result["all_modal_equal"] is None


def test_compare_cli(tmp_path, capsys):
    a = make_run(tmp_path / "a", ids_rows([[1, 2, 3]] * 3))
    b = make_run(tmp_path / "b", ids_rows([[1, 5, 3]] * 3))
    r = cli(capsys, "compare", a, b, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["prompts"][0]["modal_split"]["position"] == 1
    r = cli(capsys, "compare", a, b)
    assert r.code == 0 and "no" in r.out and "<id:2>" in r.out
    r = cli(capsys, "compare", a, tmp_path / "missing")
    assert r.code == 2 and "no such run directory" in r.err
