"""Reports from real run directories (Parquet written by detaudit.rundir, summarized by detaudit.analysis):
HTML (self-contained, escaped, fork tree + token view), Markdown, JUnit, the summary fields they need, the CLI."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from detaudit.reports.html import render_html
from detaudit.reports.junit import report_junit
from detaudit.reports.markdown import render_markdown
from detaudit.reports.pipeline import load_runs, write_reports
from detaudit.reports.view_model import build_report

from detaudit.analysis.summary import summarize_run
from detaudit.cli.app import main
from detaudit.rundir.io import load_manifest, write_manifest
from detaudit.rundir.recorder import ShardWriter, finalize_samples
from detaudit.rundir.schema import ArmSpec, PromptSpec, RequestParams, RunManifest, TargetSpec

EVIL = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
MODAL = ["Richard", " Feynman", " was", " born", " in", " Queens", ",", " New", " York", "."]
# Three variants: a fork at 5 (" New" vs " Queens"), below it a fork at 7 on the " New" branch, and one that
# stops early (ended here at 5). The " Brooklyn" variant carries hostile markup as a token.
NEW_YORK = MODAL[:5] + [" New", " York", ",", " USA"]
NEW_EVIL = MODAL[:5] + [" New", " York", EVIL]
SHORT = MODAL[:5]


def make_run(
    run_dir: Path,
    arms: dict[str, tuple[int, list[tuple[list[str], int]]]],
    *,
    kind: str = "endpoint",
    kernels: str | None = None,
    engine: dict | None = None,
    errors: dict[str, int] | None = None,
    prompt: str = "Tell me about Richard Feynman",
    prompt_id: str = "feynman",
    status: str = "complete",
    fingerprint: Callable[[str, int], str | None] = lambda arm, repeat: "fp_a",
) -> Path:
    """A complete run directory: arms = {name: (concurrency, [(tokens, count), ...])}, token ids from a vocab."""
    vocab: dict[str, int] = {}
    errors = errors or {}
    repeats = max(sum(c for _, c in comps) + errors.get(name, 0) for name, (_, comps) in arms.items())
    manifest = RunManifest(
        run_id=run_dir.name,
        tool_version="test",
        status=status,
        created_at=datetime(2026, 11, 22, tzinfo=timezone.utc),
        target=TargetSpec(
            kind=kind,
            base_url="http://127.0.0.1:9/v1" if kind == "endpoint" else None,
            model="tiny",
            engine=engine if engine is not None else ({"kernels": kernels} if kernels else {}),
        ),
        params=RequestParams(max_tokens=16, top_logprobs=2),
        prompts=[PromptSpec(prompt_id=prompt_id, prompt=prompt)],
        arms=[ArmSpec(name=name, concurrency=conc) for name, (conc, _) in arms.items()],
        repeats=repeats,
        capture="token_ids",
    )
    write_manifest(run_dir, manifest)
    rows = []
    for arm_pos, (name, (conc, comps)) in enumerate(arms.items()):
        repeat = 0
        for tokens, count in comps:
            for _ in range(count):
                rows.append(
                    {
                        "run_id": run_dir.name,
                        "sample_index": manifest.sample_index(0, arm_pos, repeat),
                        "prompt_id": prompt_id,
                        "arm": name,
                        "concurrency": conc,
                        "repeat": repeat,
                        "status": "ok",
                        "text": "".join(tokens),
                        "token_ids": [vocab.setdefault(t, len(vocab)) for t in tokens],
                        "tokens": tokens,
                        "logprobs": [-0.01] * len(tokens),
                        "top_logprobs": [[-0.01, -0.5]] * len(tokens),
                        "finish_reason": "stop",
                        "system_fingerprint": fingerprint(name, repeat),
                    }
                )
                repeat += 1
        for _ in range(errors.get(name, 0)):
            rows.append(
                {
                    "sample_index": manifest.sample_index(0, arm_pos, repeat),
                    "prompt_id": prompt_id,
                    "arm": name,
                    "concurrency": conc,
                    "repeat": repeat,
                    "status": "error",
                    "error": "HTTP 503",
                }
            )
            repeat += 1
    ShardWriter(run_dir).write(rows)
    finalize_samples(run_dir)
    return run_dir


def endpoint_run(tmp_path: Path) -> Path:
    return make_run(
        tmp_path / "endpoint",
        {"c1": (1, [(MODAL, 40)]), "c16": (16, [(MODAL, 33), (NEW_YORK, 4), (NEW_EVIL, 2), (SHORT, 1)])},
    )


def invariant_run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "local-bi", {"c16": (16, [(MODAL, 40)])}, kind="local", kernels="batch-invariant")


# ---------------------------------------------------------------- the summary fields the report needs


def test_summary_forks_name_their_parent_fork_and_branch(tmp_path):
    arm = summarize_run(endpoint_run(tmp_path)).prompts[0].arms[1]
    forks = [
        (f.position, [(b.token, b.count) for b in f.branches], f.parent and f.parent.model_dump()) for f in arm.forks
    ]
    assert forks == [
        (5, [(" Queens", 33), (" New", 6), ("", 1)], None),
        (7, [(",", 4), (EVIL, 2)], {"fork": 0, "branch": 1}),
    ]


def test_summary_completions_carry_context_around_their_fork(tmp_path):
    comps = summarize_run(endpoint_run(tmp_path)).prompts[0].arms[1].completions
    assert "context" not in comps[0].model_dump()
    by_count = {c.count: c for c in comps}
    assert by_count[2].first_divergence == 5
    assert by_count[2].context.model_dump() == {"start": 0, "tokens": NEW_EVIL[:11], "modal": MODAL[:11]}
    assert by_count[1].context.model_dump() == {"start": 0, "tokens": SHORT, "modal": MODAL[:11]}


# ---------------------------------------------------------------- model and renderers


def test_report_model_nests_forks_and_aligns_variants(tmp_path):
    report = build_report(load_runs([endpoint_run(tmp_path), invariant_run(tmp_path)]))
    assert [r.label for r in report.runs] == ["endpoint", "local-bi"]
    assert report.runs[1].engine == "batch-invariant kernels"
    assert report.runs[1].engine_facts == [("kernels", "batch-invariant")]
    cells = report.prompts[0].cells
    assert [(c.run.label, c.arm, c.unique) for c in cells] == [
        ("endpoint", "c1", 1),
        ("endpoint", "c16", 4),
        ("local-bi", "c16", 1),
    ]
    root = cells[1].forks
    assert [(f.position, [b.token for b in f.branches]) for f in root] == [(5, [" Queens", " New", ""])]
    child = root[0].branches[1].children
    assert [(f.position, f.prefix_count, f.margin) for f in child] == [(7, 6, pytest.approx(0.49))]
    views = {v.count: v for v in cells[1].token_views}
    short = views[1]
    assert short.positions[0] == 0 and short.position == 5
    assert [t.text for t in short.modal if t.diverges] == [" Queens"]
    assert [(t.end, t.diverges) for t in short.variant[5:7]] == [(True, True), (False, False)]
    assert short.variant[6].blank
    assert report.prompts[0].verdicts == [("endpoint", "load-dependent"), ("local-bi", "deterministic")]


def test_fingerprints_in_run_metadata_and_where_they_vary(tmp_path):
    run = make_run(
        tmp_path / "fp",
        {"c1": (1, [(MODAL, 4)]), "c8": (8, [(MODAL, 3), (SHORT, 3)])},
        fingerprint=lambda arm, repeat: "fp_b" if arm == "c8" and repeat >= 3 else "fp_a",
    )
    report = build_report(load_runs([run]))
    assert ("system_fingerprint", "fp_a, fp_b") in report.runs[0].meta
    assert [c.fingerprints for c in report.prompts[0].cells] == [{}, {"fp_a": 3, "fp_b": 3}]
    assert "system_fingerprint varies: <code>fp_a</code> ×3, <code>fp_b</code> ×3" in render_html(report)


def test_html_is_self_contained_and_escapes_model_text(tmp_path):
    page = render_html(build_report(load_runs([endpoint_run(tmp_path), invariant_run(tmp_path)])))
    assert page.count("<script") == 1  # only the report's own script
    assert "<img" not in page
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page)
    assert not re.search(r"@import|url\((?!#)", page)  # only in-page references (SVG clip paths)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert page.count("<svg") == 1  # the histogram of the one diverging arm, rendered inline by matplotlib
    assert 'class="forks"' in page and 'class="tv-table"' in page


def test_markdown_is_compact_and_inert(tmp_path):
    md = render_markdown(build_report(load_runs([endpoint_run(tmp_path), invariant_run(tmp_path)])))
    lines = md.splitlines()
    assert lines[0] == "## detaudit report"
    assert (
        "| endpoint | endpoint http://127.0.0.1:9/v1 (chat) | c16 (16 requests in flight) | 40/40 | **4** | 82.5% | "
        "token 5 (median 5) | load-dependent |" in lines
    )
    assert (
        "| local-bi | local engine, batch-invariant kernels | c16 (16 requests in flight) | 40/40 | **1** | 100.0% | "
        "— | deterministic |" in lines
    )
    assert (
        "- **endpoint · c16**: token 5: “·Queens” ×33 / “·New” ×6 / (end) ×1, margin 0.49 [load]; token 7: “,” ×4 / "
        "“&lt;script&gt;document.ti…ent.title='pwned'\"&gt;” ×2, margin 0.49 [load]" in lines
    )
    assert "<script" not in md and "<img" not in md
    assert "<details><summary>endpoint · feynman · c16: 4 distinct completions</summary>" in lines


def test_junit_fails_the_diverging_arm_only(tmp_path):
    root = ET.fromstring(report_junit(build_report(load_runs([endpoint_run(tmp_path), invariant_run(tmp_path)]))))
    cases = [
        (suite.get("name"), case.get("name"), case.find("failure") is not None)
        for suite in root.iter("testsuite")
        for case in suite.iter("testcase")
    ]
    assert cases == [
        ("detaudit endpoint", "feynman@c1 identical completions", False),
        ("detaudit endpoint", "feynman@c16 identical completions", True),
        ("detaudit local-bi", "feynman@c16 identical completions", False),
    ]
    failure = next(root.iter("failure"))
    assert failure.get("message") == "4 unique completions in 40; first divergence at token 5"


def test_control_characters_from_a_model_do_not_reach_junit_or_markdown(tmp_path):
    bell = MODAL[:5] + [" \x07\x1b[31mred"]
    report = build_report(load_runs([make_run(tmp_path / "ctrl", {"c4": (4, [(MODAL, 3), (bell, 1)])})]))
    xml = report_junit(report)
    ET.fromstring(xml)  # parses: the characters XML 1.0 forbids are gone
    md = render_markdown(report)
    assert "\x07" not in md and "\x1b" not in md and "\ufffd\ufffd\\[31mred" in md


def test_markdown_defuses_mentions_and_both_reports_show_bidi_controls(tmp_path):
    # "@octocat" in a PR comment notifies that user; U+202E reverses what follows it for the reader
    hostile = MODAL[:5] + [" @octocat \u202eevil", " ops@example.org"]
    run = make_run(tmp_path / "bidi", {"c4\u2067": (4, [(MODAL, 3), (hostile, 1)])})
    report = build_report(load_runs([run]))
    md = render_markdown(report)
    assert "@octocat" not in md and "@\u200doctocat ⟨U+202E⟩evil ops@example.org" in md  # an address is none
    assert "\u202e" not in md and "\u2067" not in md and "c4⟨U+2067⟩" in md  # the arm name, from the run dir
    page = render_html(report)
    assert "\u202e" not in page and "\u2067" not in page
    assert '<span class="ws">⟨U+202E⟩</span>evil' in page  # inside a token (the `vis` filter)
    assert "c4⟨U+2067⟩" in page  # any other string (autoescaped expressions)


# ---------------------------------------------------------------- CLI


def test_report_cli_writes_all_three_files(tmp_path, capsys):
    runs = [str(endpoint_run(tmp_path)), str(invariant_run(tmp_path))]
    out = tmp_path / "out"
    out.mkdir()
    main(["report", *runs, "--html", str(out / "r.html"), "--md", str(out / "r.md"), "--junit", str(out / "j.xml")])
    assert sorted(p.name for p in out.iterdir()) == ["j.xml", "r.html", "r.md"]
    captured = capsys.readouterr()
    assert captured.err.count("wrote ") == 3 and captured.out == ""  # status on stderr: stdout may be a report


def test_report_to_stdout_carries_only_the_report(tmp_path, capfd):
    main(["report", str(endpoint_run(tmp_path)), "--md", "/dev/stdout"])
    captured = capfd.readouterr()
    assert captured.out.startswith("## detaudit report\n") and "wrote " not in captured.out


def test_report_cli_prints_markdown_without_outputs(tmp_path, capsys):
    main(["report", str(endpoint_run(tmp_path))])
    assert capsys.readouterr().out.startswith("## detaudit report\n")


def test_report_cli_refuses_what_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2
    assert "not a detaudit run directory" in capsys.readouterr().err


def test_write_reports_refuses_a_missing_output_directory(tmp_path):
    from detaudit.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        write_reports([endpoint_run(tmp_path)], html=tmp_path / "nope" / "r.html")
    assert load_manifest(tmp_path / "endpoint").status == "complete"


def test_report_outputs_never_replace_run_files_or_directories(tmp_path, capsys):
    """--md/--html/--junit naming a run's own file or a directory: one line, exit 2, the run left whole."""
    from runhelp import cli

    run = endpoint_run(tmp_path)
    manifest = (run / "manifest.json").read_bytes()
    for flag, target in [("--md", run / "manifest.json"), ("--html", run / "summary.json"), ("--junit", run)]:
        r = cli(capsys, "report", run, flag, target)
        assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert (run / "manifest.json").read_bytes() == manifest
    r = cli(capsys, "report", run, "--md", run / "report.md")  # a report next to the run's files is fine
    assert r.code == 0 and (run / "report.md").exists()


def test_report_file_the_os_refuses_is_one_line_naming_it(tmp_path, capsys):
    """An OSError on a path the user named (here: a name too long, refused even for root) is exit 2, one line."""
    from runhelp import cli

    target = tmp_path / ("x" * 300 + ".html")
    r = cli(capsys, "report", endpoint_run(tmp_path), "--html", target)
    assert r.code == 2 and r.err.count("\n") == 1 and "File name too long" in r.err, r.err
    assert ".tmp" not in r.err and "Traceback" not in r.err


def test_multi_prompt_figures_in_markdown_and_html(scripted_server, capsys, tmp_path):
    """Share of prompts fully identical and the earliest fork across prompts reach both reports."""
    from runhelp import FEYNMAN, NYC, QUEENS, cli

    server = scripted_server(
        completions={"Q": QUEENS, "N": NYC}, schedules={FEYNMAN: [("Q", 9), ("N", 1)], "steady": "Q"}
    )
    out = tmp_path / "two"
    assert (
        cli(capsys, "run", "--base-url", server.base_url, "-p", FEYNMAN, "-p", "steady", "-n", 10, "--out", out).code
        == 0
    )
    md, html_path = tmp_path / "r.md", tmp_path / "r.html"
    assert cli(capsys, "report", str(out), "--md", str(md), "--html", str(html_path)).code == 0
    text = md.read_text()
    assert "50.0% of prompts fully identical (1/2)" in text
    assert "earliest fork at token 5 (p0 · c1)" in text
    page = html_path.read_text()
    assert "(1/2)" in page and "token 5 (p0 · c1)" in page


# ---------------------------------------------------------------- the finding, and text cut around the fork


def test_each_prompt_leads_with_one_finding_sentence(tmp_path):
    report = build_report(load_runs([endpoint_run(tmp_path), invariant_run(tmp_path)]))
    md = render_markdown(report)
    assert md.splitlines()[2] == (
        "- **feynman**: **load-dependent**: the endpoint gave **1 distinct completion** of 40 ok (one request at a "
        "time) and **4** of 40 ok (16 requests in flight); the first fork is at token 5, after “Richard Feynman was "
        "born in”, between “·Queens” ×33 and “·New” ×6 (and 1 more). The local rerun with batch-invariant kernels "
        "gave **1 distinct completion** of 40 ok (16 requests in flight); that answer is the same as the endpoint's "
        "answer when sent one request at a time."
    )
    page = render_html(report)
    assert page.index('id="findings"') < page.index('class="prompt"') < page.index('id="runs"')


def test_a_rerun_whose_one_answer_is_not_the_serial_answer_says_so(tmp_path):
    other = MODAL[:8] + [" Jersey", "."]
    rerun = make_run(tmp_path / "bi", {"single": (16, [(other, 40)])}, kind="local", kernels="batch-invariant")
    md = render_markdown(build_report(load_runs([endpoint_run(tmp_path), rerun])))
    assert (
        "The local rerun with batch-invariant kernels gave **1 distinct completion** of 40 ok (copies of the prompt "
        "arriving over time, up to 16 per batch); that answer **differs** from the endpoint's answer when sent one "
        "request at a time, from character 40 on: “Jersey.” vs “York.”" in md
    )


def test_completions_are_cut_around_their_fork_and_whitespace_tokens_show(tmp_path):
    head = [f" w{i}" for i in range(80)]  # 320 characters before the fork
    a, b = [*head, "  ", "A", *head], [*head, "\n", "B", *head]
    report = build_report(load_runs([make_run(tmp_path / "long", {"c4": (4, [(a, 3), (b, 1)])})]))
    rows = report.prompts[0].cells[0].completions
    fork = len("".join(head))
    for row, text in zip(rows, ("".join(a), "".join(b)), strict=True):
        assert row.before == "…" + text[fork - 60 : fork] and row.after == text[fork : fork + 100] + "…"
    md = render_markdown(report)
    assert "token 80: “··” ×3 / “↵” ×1" in md  # not a run of bare spaces
    assert f"| 2 | 1 | 25.0% | 80 | …{''.join(head)[-60:]}▸↵B" in md
