"""`detaudit report` over several runs matches prompts by content, not by the ids each run assigns (p0, p1, ...), and
warns where the runs do not share their prompts (issue #23, item 7); an empty completion is a visible mark, never a
blank cell (item 8)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from detaudit.reports.pipeline import load_runs
from detaudit.reports.view_model import build_report
from runhelp import FEYNMAN, QUEENS, cli

CODE = "def main("
SHARED = "Say hello"
BODY = ["\n", "    ", "print", "(", '"hi"', ")"]
HELLO = ["Hello", "!"]


class _Sections(HTMLParser):
    """The HTML report's prompt sections: heading, prompt text, and each cell's run label."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[dict] = []
        self._in: str | None = None
        self._inside = False  # within a prompt section (other sections, e.g. the runs at the end, are not read)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self._inside = "prompt" in (a.get("class") or "")
            if self._inside:
                self.sections.append({"heading": "", "text": "", "runs": []})
        elif self._inside and tag == "h2":
            self._in = "heading"
        elif self._inside and tag == "pre" and a.get("class") == "prompt-text":
            self._in = "text"
        elif self._inside and tag == "article":
            self.sections[-1]["runs"].append(a["data-run"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "pre"):
            self._in = None
        elif tag == "section":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._in:
            self.sections[-1][self._in] += data


def _two_runs(scripted_server, capsys, tmp_path):
    """Run "a" asks FEYNMAN (p0) and SHARED (p1); run "b" asks CODE (p0: the same id, another prompt) and SHARED
    (p1). CODE's answer is empty 3 times in 4."""
    server = scripted_server(
        completions={"Q": QUEENS, "C": BODY, "E": [], "H": HELLO},
        schedules={FEYNMAN: "Q", CODE: [("E", 3), ("C", 1)], SHARED: "H"},
    )
    runs = []
    for name, prompts in (("a", [FEYNMAN, SHARED]), ("b", [CODE, SHARED])):
        out = tmp_path / name
        args = [a for p in prompts for a in ("-p", p)]
        r = cli(capsys, "run", "--base-url", server.base_url, *args, "-n", 4, "--out", out)
        assert r.code == 0, r.err
        runs.append(out)
    return runs


def test_report_matches_prompts_by_content_not_id(scripted_server, capsys, tmp_path) -> None:
    a, b = _two_runs(scripted_server, capsys, tmp_path)
    report = build_report(load_runs([a, b]))
    sections = {s.prompt: s for s in report.prompts}
    assert list(sections) == [FEYNMAN, SHARED, CODE]  # each prompt once, in first-seen order
    assert [(s.prompt_id, s.asked) for s in sections.values()] == [
        ("p0 (a)", [("a", "p0")]),
        ("p1", [("a", "p1"), ("b", "p1")]),
        ("p0 (b)", [("b", "p0")]),
    ]
    assert {c.run.label for c in sections[FEYNMAN].cells} == {"a"}
    assert [r.text for c in sections[FEYNMAN].cells for r in c.completions] == ["".join(QUEENS)]
    assert {c.run.label for c in sections[CODE].cells} == {"b"}
    assert [c.run.label for c in sections[SHARED].cells] == ["a", "b"]
    assert report.warnings == [
        "prompt id p0 names 2 different prompts in these runs: prompts are matched by their content, not their id",
        "the runs do not share all their prompts: 2 of 3 not asked by every run",
        f"prompt p0 (a) ({FEYNMAN!r}) was asked only by a",
        f"prompt p0 (b) ({CODE!r}) was asked only by b",
    ]

    md, page = tmp_path / "r.md", tmp_path / "r.html"
    r = cli(capsys, "report", a, b, "--md", md, "--html", page)
    assert r.code == 0, r.err
    warned = [line for line in r.err.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: {w}" for w in report.warnings]
    text = md.read_text()
    assert text.count("> **warning:**") == 4 and "prompt id p0 names 2 different prompts" in text
    # the headline table: each run's row under its own prompt
    rows = re.findall(r"^\| (a|b) \| [^|]+ \| ([^|]+) \|", text, flags=re.M)
    assert rows == [("a", "p0 (a)"), ("a", "p1"), ("b", "p1"), ("b", "p0 (b)")]
    parser = _Sections()
    parser.feed(page.read_text())
    got = [(" ".join(s["heading"].split()), s["text"], s["runs"]) for s in parser.sections]
    assert got == [
        ("Prompt p0 (a)", FEYNMAN, ["a"]),
        ("Prompt p1", SHARED, ["a", "b"]),
        ("Prompt p0 (b)", CODE, ["b"]),
    ]
    assert page.read_text().count("<b>warning:</b>") == 4


def test_one_run_and_shared_prompts_give_no_warning(scripted_server, capsys, tmp_path) -> None:
    a, b = _two_runs(scripted_server, capsys, tmp_path)
    assert build_report(load_runs([a])).warnings == []
    r = cli(capsys, "report", b, b)  # the same prompts in both: nothing to warn about, ids as they are
    assert r.code == 0 and "warning" not in r.err and "> **warning:**" not in r.out
    assert [s.prompt_id for s in build_report(load_runs([b, b])).prompts] == ["p0", "p1"]


def test_an_empty_modal_completion_is_marked_not_blank(scripted_server, capsys, tmp_path) -> None:
    _, b = _two_runs(scripted_server, capsys, tmp_path)
    (code,) = [s for s in build_report(load_runs([b])).prompts if s.prompt == CODE]
    (cell,) = code.cells
    assert [(r.rank, r.count, r.empty) for r in cell.completions] == [(1, 3, True), (2, 1, False)]
    md = cli(capsys, "report", b).out
    assert "| 1 | 3 | 75.0% | modal | *(empty completion)* |" in md
    page = tmp_path / "r.html"
    assert cli(capsys, "report", b, "--html", page).code == 0
    assert '<td class="text"><span class="muted empty">(empty completion)</span></td>' in page.read_text()


def test_compare_marks_an_empty_modal_completion(scripted_server, capsys, tmp_path) -> None:
    """In the terminal the modals part at 0 where one is empty: shown as where it ended, never as a blank."""
    empty = scripted_server(completions={"E": []}, default="E")
    full = scripted_server(completions={"H": HELLO}, default="H")
    for name, server in (("empty", empty), ("full", full)):
        r = cli(capsys, "run", "--base-url", server.base_url, "-p", SHARED, "-n", 2, "--out", tmp_path / name)
        assert r.code == 0, r.err
    r = cli(capsys, "compare", tmp_path / "empty", tmp_path / "full")
    assert r.code == 0, r.err
    (row,) = [line for line in r.out.splitlines() if line.startswith("p0")]
    assert "⟂ (ended)" in row and "'Hello'" in row
