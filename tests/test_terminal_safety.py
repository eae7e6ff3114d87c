"""Nothing an endpoint sends, or a run directory or prompt file holds, reaches the terminal raw: the model name, the
system_fingerprint, server error text and prompt ids pass detaudit.termsafe in run, analyze, compare, gate, probe
endpoint, report and the one-line error. Each command runs as a real process against a hostile scripted server."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from runhelp import cli_process

from detaudit.termsafe import json_text, quoted, safe

HOSTILE_MODEL = "evil\x1b]0;pwned\x07\u202emodel"  # an OSC sequence that renamed the terminal window
FINGERPRINTS = ["fp\x1b[2J", "fp\u2066b"]  # a screen clear; a bidi isolate
ERROR = "bad\rrequest \u202e\x1b[31mred\x9b"  # overprint the line, reverse it, colour it, 8-bit CSI
PROMPT_ID = "id\x1b[1A\u202e"  # from a prompt file: cursor up, bidi override
# Every control, C1 and bidi character; only the newline may reach the terminal.
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _clean(r) -> None:
    for name, text in (("stdout", r.out), ("stderr", r.err)):
        found = RAW.search(text)
        assert found is None, f"raw {found.group()!r} on {name}: {text!r}"


def test_hostile_endpoint_text_never_reaches_the_terminal_raw(scripted_server, tmp_path: Path) -> None:
    server = scripted_server(
        models=[HOSTILE_MODEL],
        system_fingerprint=FINGERPRINTS,
        faults={"first": ["500"] * 3, "kinds": ["500"], "prompts": ["hi"], "message": ERROR},
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "id": PROMPT_ID}) + "\n")
    run = tmp_path / "run"
    r = cli_process(
        "run",
        "--base-url",
        server.base_url,
        "--prompt-file",
        prompts,
        "-n",
        6,
        "-c",
        "1,2",
        "--retries",
        0,
        "--out",
        run,
    )
    assert r.code == 0, r.err
    _clean(r)
    shown_model = "evil\\x1b]0;pwned\\x07\\u202emodel"
    assert shown_model in r.out and "system_fingerprint fp\\x1b[2J" in r.out and "id\\x1b[1A\\u202e" in r.out

    analyzed = cli_process("analyze", run)
    _clean(analyzed)
    assert analyzed.code == 0 and shown_model in analyzed.out
    as_json = cli_process("analyze", run, "--json")
    _clean(as_json)
    assert json.loads(as_json.out)["model"] == HOSTILE_MODEL  # escaped on the terminal, exact for a script
    compared = cli_process("compare", run, run)
    _clean(compared)
    assert compared.code == 0 and shown_model in compared.out
    gated = cli_process("gate", run, "--max-error-rate", "0", "--max-unique", "1")
    _clean(gated)
    assert gated.code == 3 and "id\\x1b[1A\\u202e" in gated.out  # the rule lines name the prompt
    reported = cli_process("report", run)
    _clean(reported)
    assert reported.code == 0 and reported.out.startswith("## detaudit report")
    probed = cli_process("probe", "endpoint", "--base-url", server.base_url)
    _clean(probed)
    assert probed.code == 0 and shown_model in probed.out


def test_server_error_text_in_the_error_line_is_escaped(scripted_server, tmp_path: Path) -> None:
    server = scripted_server(faults={"rate": 1.0, "kinds": ["500"], "message": ERROR})
    r = cli_process("run", "--base-url", server.base_url, "-p", "hi", "--retries", 0, "--out", tmp_path / "run")
    _clean(r)
    # the client collapses the server's whitespace (\r included) to one line, then the rest is shown escaped
    assert r.code == 2 and "HTTP 500: bad request \\u202e\\x1b[31mred\\x9b" in r.err
    assert r.err.count("\n") == 1 and not (tmp_path / "run").exists()
    debug = cli_process(
        "--debug", "run", "--base-url", server.base_url, "-p", "hi", "--retries", 0, "--out", tmp_path / "run"
    )
    _clean(debug)
    assert "Traceback" in debug.err and debug.code == 2


@given(st.text(st.characters(codec=None, exclude_categories=())))
def test_safe_text_is_printable_and_printable_text_is_unchanged(text: str) -> None:
    shown = safe(text)
    assert shown.isprintable()
    assert (shown == text) == text.isprintable()
    assert safe(text, keep_newlines=True).replace("\n", "").isprintable()
    assert quoted(text).isprintable()  # completion text: the same rule, in quotes


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(codec=None, exclude_categories=())),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(st.characters(codec=None, exclude_categories=()), max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(_json_values)
def test_json_for_the_terminal_is_exact_and_printable(doc) -> None:
    text = json_text(doc)
    assert json.loads(text) == doc
    assert text.replace("\n", "").isprintable()
