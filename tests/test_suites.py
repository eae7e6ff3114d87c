"""Probe suites: the bundled ones load and are well-formed; malformed files fail with file and line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detaudit.probes.suites import bundled_names, bundled_suites, load_suite, load_suite_file

from detaudit.cli.app import main
from detaudit.errors import UsageError


def test_every_bundled_suite_loads_with_rationale_and_max_tokens() -> None:
    suites = {s.name: s for s in bundled_suites()}
    assert set(bundled_names()) >= {"feynman", "standard", "smoke"}
    for s in suites.values():
        assert s.bundled and s.description
        for p in s.prompts:
            assert p.rationale and len(p.rationale) > 20, p.prompt_id
            assert p.max_tokens and p.max_tokens >= 1, p.prompt_id
            assert (p.prompt is None) != (p.messages is None), p.prompt_id
    assert len(suites["smoke"].prompts) == 3
    assert 25 <= len(suites["standard"].prompts) <= 50
    assert [p.prompt for p in suites["feynman"].prompts] == ["Tell me about Richard Feynman"]


def test_standard_covers_the_divergence_prone_kinds() -> None:
    prompts = load_suite("standard").prompts
    ids = [p.prompt_id for p in prompts]
    for prefix in ("control-", "list-", "arith-", "count-", "code-", "json-", "prefix-", "multi-"):
        assert any(i.startswith(prefix) for i in ids), prefix
    # The shared-prefix entries really share one long system prompt (YAML alias), so a prefix cache can hit.
    systems = [p.messages[0]["content"] for p in prompts if p.messages and p.messages[0]["role"] == "system"]
    assert len(systems) >= 3 and len(set(systems)) == 1 and len(systems[0]) > 2000
    # Multilingual entries use non-Latin scripts (multi-byte UTF-8).
    texts = [p.prompt or "" for p in prompts if p.prompt_id.startswith("multi-")]
    assert sum(any(ord(c) > 0x3000 for c in t) for t in texts) >= 2


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """\
name: mine
description: my suite
prompts:
  - id: a
    rationale: first
    prompt: Hello
    max_tokens: 4
  - id: b
    messages:
      - {role: user, content: Hi}
"""


def test_own_yaml_and_jsonl_suites_load(tmp_path: Path) -> None:
    s = load_suite(str(_write(tmp_path, GOOD)))
    assert s.name == "mine" and not s.bundled
    assert [(p.prompt_id, p.max_tokens) for p in s.prompts] == [("a", 4), ("b", None)]
    assert s.prompts[1].messages == [{"role": "user", "content": "Hi"}]
    lines = [{"id": "x", "prompt": "one", "max_tokens": 3}, {"id": "y", "messages": [{"role": "user", "content": "2"}]}]
    j = _write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n\n", "own.jsonl")
    s = load_suite_file(j)
    assert s.name == "own" and [p.prompt_id for p in s.prompts] == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("    max_tokens: 4\n", "    max_tokens: 4\n    temprature: 0\n"),
            ":8: unknown entry key 'temprature'",
        ),
        (GOOD.replace("prompt: Hello", "prompt: '  '"), ":6: entry 'a' has an empty prompt"),
        (GOOD.replace("id: b", "id: a"), ":8: duplicate id 'a' (first used on line 4)"),
        (GOOD.replace("max_tokens: 4", "max_tokens: 0"), ":7: entry 'a' has bad max_tokens 0"),
        (GOOD.replace("max_tokens: 4", "max_tokens: ten"), ":7: entry 'a' has bad max_tokens 'ten'"),
        (GOOD.replace("max_tokens: 4", "max_tokens: true"), ":7: entry 'a' has bad max_tokens True"),
        (GOOD.replace("max_tokens: 4", "max_tokens: 4\n    prompt: again"), ":8: entry key 'prompt' given twice"),
        (GOOD.replace("    prompt: Hello\n", ""), ":4: entry 'a' needs exactly one of 'prompt' or 'messages'"),
        (GOOD.replace("{role: user, content: Hi}", "{role: robot, content: Hi}"), "message 0 has role 'robot'"),
        (GOOD.replace("id: b", "id: 'b c'"), ":8: bad id 'b c'"),
        (GOOD.replace("name: mine", "nmae: mine"), ":1: unknown suite key 'nmae'"),
        (GOOD.replace("    prompt: Hello\n", "    prompt: [Hello\n"), ": invalid YAML"),
        ("name: x\nprompts: []\n", "the suite has no prompts"),
        ("", "the file is empty"),
        ("- just a string\n", ":1: each entry must be a mapping"),
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as exc:
        load_suite(str(path))
    assert str(path) in str(exc.value)
    assert expected in str(exc.value)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], ":2: duplicate id 'a' (first used on line 1)"),
        (['{"id": "a", "prompt": "x", "extra": 1}'], ":1: unknown entry key 'extra'"),
        (['{"id": "a", "prompt": "x"}', "{not json"], ":2: invalid JSON"),
        (['{"id": "a", "prompt": "x", "max_tokens": 1.5}'], ":1: entry 'a' has bad max_tokens 1.5"),
        (['{"id": "a", "prompt": "x", "prompt": "y"}'], ":1: key 'prompt' given twice"),
        (['["a"]'], ":1: each line must be one JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = _write(tmp_path, "\n".join(lines) + "\n", "s.jsonl")
    with pytest.raises(UsageError) as exc:
        load_suite(str(path))
    assert str(path) in str(exc.value) and expected in str(exc.value)


def test_unknown_suite_lists_the_bundled_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown suite 'nope': bundled suites are feynman, smoke, standard"):
        load_suite("nope")
    with pytest.raises(UsageError, match="suite files end in"):
        load_suite(str(_write(tmp_path, GOOD, "s.txt")))
    # a missing file was "unknown suite ...: or give the path of a .yaml file", though a path was given
    with pytest.raises(UsageError, match="suite file .*missing.yaml does not exist"):
        load_suite(str(tmp_path / "missing.yaml"))


def test_cli_lists_suites_and_rejects_a_malformed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["suites"])
    out = capsys.readouterr().out
    for name in ("feynman", "smoke", "standard"):
        assert name in out
    bad = _write(tmp_path, GOOD.replace("id: b", "id: a"))
    with pytest.raises(SystemExit) as exc:
        main(["suites", str(bad)])
    assert exc.value.code == 2
    assert "duplicate id 'a'" in capsys.readouterr().err


def test_docs_explain_every_bundled_prompt() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "suites.md").read_text(encoding="utf-8")
    for s in bundled_suites():
        assert f"### `{s.name}`" in doc
        for p in s.prompts:
            assert f"| `{p.prompt_id}` |" in doc, f"docs/suites.md does not explain {s.name}/{p.prompt_id}"


def test_hostile_suite_files_are_one_clear_error(tmp_path: Path) -> None:
    """Nesting past the parsers' recursion, a FIFO (would block the open) and a device (endless) are refused."""
    import os

    deep_jsonl = tmp_path / "deep.jsonl"
    deep_jsonl.write_text('{"id": "a", "prompt": "x", "rationale": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("prompts:\n  - id: a\n    prompt: " + "[" * 100_000 + "]" * 100_000 + "\n")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    cases = {deep_jsonl: "nested too deeply", deep_yaml: "nested too deeply", fifo: "not a regular file"}
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            load_suite_file(path)
    with pytest.raises(UsageError, match="not a file"):
        load_suite("/dev/zero")
