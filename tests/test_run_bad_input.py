"""Bad input to `detaudit run`: one clear line on stderr, exit 2, nothing written, existing run directories intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runhelp import QUEENS, cli, cli_process, tree_snapshot
from servers import free_port

# (case id, extra CLI args, files to create {name: bytes}, expected fragment of the message)
ARG_CASES = [
    ("n-zero", ["-p", "hi", "-n", "0"], {}, "-n/--repeats must be >= 1"),
    ("n-negative", ["-p", "hi", "-n", "-5"], {}, "-n/--repeats must be >= 1"),
    ("n-not-int", ["-p", "hi", "-n", "ten"], {}, "Invalid value for '-n' / '--repeats'"),
    ("concurrency-negative", ["-p", "hi", "-c", "-1"], {}, "--concurrency must be >= 1"),
    ("concurrency-zero-in-list", ["-p", "hi", "-c", "1,0"], {}, "--concurrency must be >= 1"),
    ("concurrency-word", ["-p", "hi", "-c", "1,many"], {}, "'many' is not an integer"),
    ("concurrency-twice", ["-p", "hi", "-c", "4,4"], {}, "lists a value twice"),
    ("empty-prompt", ["-p", "  "], {}, "--prompt #1 is empty"),
    ("no-prompt", [], {}, "no prompt given"),
    ("bad-api", ["-p", "hi", "--api", "responses"], {}, "--api must be chat or completions"),
    ("max-tokens-zero", ["-p", "hi", "--max-tokens", "0"], {}, "--max-tokens must be >= 1"),
    ("temperature-negative", ["-p", "hi", "--temperature", "-1"], {}, "--temperature must be >= 0"),
    ("top-p-range", ["-p", "hi", "--top-p", "1.5"], {}, "--top-p must be in (0, 1]"),
    ("top-logprobs-range", ["-p", "hi", "--top-logprobs", "21"], {}, "between 0 and 20"),
    ("timeout-zero", ["-p", "hi", "--timeout", "0"], {}, "--timeout must be > 0"),
    ("retries-negative", ["-p", "hi", "--retries", "-1"], {}, "--retries must be >= 0"),
    ("rate-zero", ["-p", "hi", "--rate", "0"], {}, "--rate must be > 0"),
    # NaN passed every `x < 0` check: --timeout nan was an internal error, --temperature nan one after the run began
    ("timeout-nan", ["-p", "hi", "--timeout", "nan"], {}, "--timeout must be > 0"),
    ("temperature-nan", ["-p", "hi", "--temperature", "nan"], {}, "--temperature must be >= 0"),
    ("rate-nan", ["-p", "hi", "--rate", "nan"], {}, "--rate must be > 0"),
    ("backoff-nan", ["-p", "hi", "--backoff", "nan"], {}, "--backoff must be >= 0"),
    # a mistyped -n was an out-of-memory kill
    ("n-huge", ["-p", "hi", "-n", "99999999999999999999"], {}, "a run holds at most 10000000"),
    ("header-no-colon", ["-p", "hi", "--header", "X-Token"], {}, "expected 'Name: value'"),
    # found only after every request of the run had been sent
    ("gate-baseline-missing", ["-p", "hi", "--gate", "max-unique=1,baseline=nope"], {}, "nope: no such run directory"),
    # said "pass at least one of --max-unique, ..." and "need --baseline RUN": options `run` does not have
    ("gate-no-rule", ["-p", "hi", "--gate", "baseline=nope"], {}, "--gate names no rule: give at least one of max-"),
    ("gate-empty", ["-p", "hi", "--gate", ""], {}, "--gate names no rule"),
    ("gate-needs-baseline", ["-p", "hi", "--gate", "require-same-modal"], {}, "need baseline=RUN"),
    # every request got HTTP 400, reported as "--model is required: .../models answered HTTP 400"
    ("header-control-char", ["-p", "hi", "--header", "X-Token: se\x01cret"], {}, "holds a control character"),
    ("unknown-option", ["-p", "hi", "--repeat", "3"], {}, "No such option"),
    ("key-env-unset", ["-p", "hi", "--api-key-env", "DETAUDIT_TEST_UNSET_KEY"], {}, "is not set"),
    ("extra-body-invalid", ["-p", "hi", "--extra-body", "{cache_salt: 1}"], {}, "--extra-body is not valid JSON"),
    ("extra-body-array", ["-p", "hi", "--extra-body", "[1, 2]"], {}, "must be a JSON object"),
    ("extra-body-reserved", ["-p", "hi", "--extra-body", '{"n": 8}'], {}, "may not set n"),
    ("prompt-file-missing", ["--prompt-file", "nope.txt"], {}, "cannot read prompt file"),
    ("prompt-file-is-dir", ["--prompt-file", "adir"], {"adir/x": b""}, "cannot read prompt file"),
    ("prompt-file-empty", ["--prompt-file", "e.txt"], {"e.txt": b"\n\n"}, "is empty"),
    ("prompt-file-binary", ["--prompt-file", "b.txt"], {"b.txt": b"ab\x00cd"}, "NUL bytes"),
    ("prompt-file-not-utf8", ["--prompt-file", "l.txt"], {"l.txt": b"caf\xe9"}, "not UTF-8"),
    ("jsonl-malformed", ["--prompt-file", "p.jsonl"], {"p.jsonl": b'{"prompt": "a"}\n{"prompt": \n'}, "p.jsonl:2"),
    ("jsonl-not-object", ["--prompt-file", "p.jsonl"], {"p.jsonl": b'["a"]\n'}, "expected a JSON object"),
    ("jsonl-both", ["--prompt-file", "p.jsonl"], {"p.jsonl": b'{"prompt": "a", "messages": []}\n'}, "exactly one"),
    ("jsonl-empty-prompt", ["--prompt-file", "p.jsonl"], {"p.jsonl": b'{"prompt": ""}\n'}, "non-empty string"),
    (
        "jsonl-bad-messages",
        ["--prompt-file", "p.jsonl"],
        {"p.jsonl": b'{"messages": [{"role": 1}]}\n'},
        '"messages" must be',
    ),
    ("jsonl-unknown-key", ["--prompt-file", "p.jsonl"], {"p.jsonl": b'{"prompt": "a", "temp": 1}\n'}, "unknown key"),
    ("jsonl-no-prompts", ["--prompt-file", "p.jsonl"], {"p.jsonl": b"\n\n"}, "holds no prompts"),
    (
        "jsonl-duplicate-id",
        ["--prompt-file", "p.jsonl"],
        {"p.jsonl": b'{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n'},
        "appears twice",
    ),
    (
        "completions-with-messages",
        ["--api", "completions", "--prompt-file", "p.jsonl"],
        {"p.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n'},
        "needs plain prompts",
    ),
    ("base-url-scheme", ["-p", "hi", "--base-url", "ftp://example.org/v1"], {}, "must start with http"),
    # an internal error (httpx's InvalidURL, or a ValueError out of a worker task) once the run had started
    ("base-url-port-range", ["-p", "hi", "--base-url", "http://127.0.0.1:99999/v1"], {}, "Port out of range"),
    ("base-url-port-word", ["-p", "hi", "--base-url", "http://127.0.0.1:abc/v1"], {}, "Port could not be cast"),
    ("base-url-ipv6", ["-p", "hi", "--base-url", "http://[::1/v1"], {}, "Invalid IPv6 URL"),
    ("base-url-no-host", ["-p", "hi", "--base-url", "http:///v1"], {}, "names no host"),
    ("base-url-space", ["-p", "hi", "--base-url", "http://127.0.0.1 :80/v1"], {}, "contains whitespace"),
    # an empty --base-url (an unset shell variable) quietly became https://api.openai.com/v1
    ("base-url-empty", ["-p", "hi", "--base-url", ""], {}, "must start with http:// or https://, got ''"),
    ("resume-without-out", ["--resume"], {}, "--resume needs --out"),
]


def _assert_one_line_exit_2(r, fragment: str) -> None:
    assert r.code == 2, (r.code, r.err)
    lines = [line for line in r.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error:") and "Traceback" not in r.err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case,args,files,fragment", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_arguments_and_prompt_files(
    case, args, files, fragment, capsys, tmp_path, monkeypatch, scripted_server
) -> None:
    server = scripted_server()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DETAUDIT_TEST_UNSET_KEY", raising=False)
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = tree_snapshot(tmp_path)
    out = [] if "--resume" in args else ["--out", tmp_path / "out"]
    r = cli(capsys, "run", "--base-url", server.base_url, *args, *out)  # a later --base-url in args wins
    _assert_one_line_exit_2(r, fragment)
    assert tree_snapshot(tmp_path) == before
    assert server.stats["requests"] == 0  # argument errors never reach the network


def test_endpoint_problems(scripted_server, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    unreachable = f"http://127.0.0.1:{free_port()}/v1"
    r = cli(capsys, "run", "--base-url", unreachable, "-p", "hi", "-n", 2, "--retries", 0, "--out", out)
    _assert_one_line_exit_2(r, "is unreachable")

    locked = scripted_server(api_key="sk-right-key-0000")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-1111")
    r = cli(capsys, "run", "--base-url", locked.base_url, "-p", "hi", "--out", out)
    _assert_one_line_exit_2(r, "refused the credentials")
    assert "sk-wrong-key-1111" not in r.err
    monkeypatch.delenv("OPENAI_API_KEY")

    two = scripted_server(models=["m-a", "m-b"])
    r = cli(capsys, "run", "--base-url", two.base_url, "-p", "hi", "--model", "m-c", "--out", out)
    _assert_one_line_exit_2(r, "unknown model 'm-c'")
    r = cli(capsys, "run", "--base-url", two.base_url, "-p", "hi", "--out", out)
    _assert_one_line_exit_2(r, "--model is required")

    html = scripted_server(faults={"rate": 1.0, "kinds": ["html"]})
    r = cli(capsys, "run", "--base-url", html.base_url, "-p", "hi", "--retries", 0, "--out", out)
    _assert_one_line_exit_2(r, "HTML error page")
    shape = scripted_server(faults={"rate": 1.0, "kinds": ["non_openai"]})
    r = cli(capsys, "run", "--base-url", shape.base_url, "-p", "hi", "--retries", 0, "--out", out)
    _assert_one_line_exit_2(r, "not an OpenAI completion")
    no_chat = scripted_server(apis=["completions"])
    r = cli(capsys, "run", "--base-url", no_chat.base_url, "-p", "hi", "--out", out)
    _assert_one_line_exit_2(r, "chat API")
    assert not out.exists() and not (tmp_path / "runs").exists()


# Each crashed (exit 70, some after the run directory was made), hung, or ate memory; run as real processes, with a
# time limit, so a hang fails the test. (case id, extra CLI args, files to create, expected fragment)
DEEP = "[" * 100_000 + "]" * 100_000
PROCESS_CASES = [
    ("extra-body-nan", ["--extra-body", '{"x": NaN}'], {}, "--extra-body holds NaN"),
    ("extra-body-infinity", ["--extra-body", '{"x": [Infinity]}'], {}, "--extra-body holds Infinity"),
    ("extra-body-deep", ["--extra-body", '{"x": ' + "[" * 20_000 + "]" * 20_000 + "}"], {}, "nested more than 64"),
    ("extra-body-surrogate", ["--extra-body", '{"x": "\\ud800"}'], {}, "lone surrogate"),
    ("temperature-inf", ["--temperature", "inf"], {}, "--temperature must be >= 0 and finite, got inf"),
    ("timeout-inf", ["--timeout", "inf"], {}, "--timeout must be > 0 and at most 86400 s, got inf"),
    ("backoff-inf", ["--backoff", "inf"], {}, "--backoff must be >= 0 and at most 86400 s, got inf"),
    ("rate-tiny", ["--rate", "1e-300"], {}, "--rate must be > 0 (at least 0.001 requests/s"),
    ("rate-inf", ["--rate", "inf"], {}, "--rate must be > 0 (at least 0.001 requests/s"),
    ("header-name-non-ascii", ["--header", "X-Tök: v"], {}, "a header name is ASCII letters"),
    ("header-value-non-ascii", ["--header", "X-Token: s€cret"], {}, "holds a non-ASCII character"),
    ("header-twice", ["--header", "X-A: 1", "--header", "x-a: 2"], {}, "is given twice"),
    ("base-url-idna", ["--base-url", "http://xn--abc-.invalid-/v1"], {}, "A-label must not end with a hyphen"),
    (
        "prompt-file-deep",
        ["--prompt-file", "deep.jsonl"],
        {"deep.jsonl": f'{{"prompt": {DEEP}}}\n'.encode()},
        "deep.jsonl:1: JSON nested too deeply",
    ),
    (
        "prompt-file-surrogate",
        ["--prompt-file", "s.jsonl"],
        {"s.jsonl": b'{"prompt": "a\\udc80"}\n'},
        "not valid Unicode",
    ),
    ("prompt-file-dev-zero", ["--prompt-file", "/dev/zero"], {}, "not a regular file"),
    ("prompt-file-fifo", ["--prompt-file", "fifo"], {"fifo": None}, "not a regular file"),
    ("prompt-file-too-large", ["--prompt-file", "big.txt"], {"big.txt": b"x" * (64 * 2**20 + 1)}, "larger than 64 MiB"),
    ("prompt-not-utf8", ["-p", b"caf\xe9"], {}, "not valid Unicode"),
]


@pytest.mark.parametrize("case,args,files,fragment", PROCESS_CASES, ids=[c[0] for c in PROCESS_CASES])
def test_values_that_crashed_or_hung_are_refused_up_front(
    case, args, files, fragment, tmp_path, monkeypatch, scripted_server
) -> None:
    server = scripted_server()
    monkeypatch.chdir(tmp_path)
    for name, data in files.items():
        if data is None:
            os.mkfifo(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(data)
    before = tree_snapshot(tmp_path)
    if not any(a in ("-p", "--prompt-file") for a in args):
        args = ["-p", "hi", *args]
    r = cli_process("run", "--base-url", server.base_url, *args, "--out", tmp_path / "out", timeout=60)
    _assert_one_line_exit_2(r, fragment)
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "runs").exists()
    assert server.stats["requests"] == 0


def _good_run(server, capsys, out: Path) -> None:
    r = cli(capsys, "run", "--base-url", server.base_url, "-p", "hi", "-n", 3, "--out", out)
    assert r.code == 0, r.err


def test_existing_and_broken_run_directories_are_refused_untouched(scripted_server, capsys, tmp_path) -> None:
    server = scripted_server(completions={"Q": QUEENS}, default="Q")
    run = tmp_path / "run"
    _good_run(server, capsys, run)
    base = ["run", "--base-url", server.base_url]

    before = tree_snapshot(run)
    r = cli(capsys, *base, "-p", "hi", "--out", run)
    _assert_one_line_exit_2(r, "already exists; pass --resume")
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = cli(capsys, *base, "-p", "hi", "--out", other, "--force")
    _assert_one_line_exit_2(r, "not a detaudit run directory")
    assert (other / "keep.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli(capsys, *base, "-p", "hi", "--out", afile)
    _assert_one_line_exit_2(r, "is not a directory")
    r = cli(capsys, *base, "--resume", "--out", tmp_path / "missing")
    _assert_one_line_exit_2(r, "no such run directory")
    r = cli(capsys, *base, "--resume", "--out", other)
    _assert_one_line_exit_2(r, "not a detaudit run directory")
    r = cli(capsys, *base, "--resume", "--out", run, "-p", "other prompt")
    _assert_one_line_exit_2(r, "drop --prompt")
    r = cli(capsys, *base, "--resume", "--out", run, "-n", 500, "--timeout", 5)
    _assert_one_line_exit_2(r, "drop --repeats, --timeout")
    assert tree_snapshot(run) == before

    def broken(name: str, mutate) -> Path:
        d = tmp_path / name
        _good_run(server, capsys, d)
        mutate(d)
        return d

    newer = broken(
        "newer",
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"detaudit.run/1"', '"detaudit.run/99"')
        ),
    )
    corrupt = broken("corrupt", lambda d: (d / "samples.parquet").write_bytes(b"PAR1 not really"))
    foreign = broken("foreign", lambda d: pq.write_table(pa.table({"a": [1]}), d / "samples.parquet"))
    bad_json = broken("badjson", lambda d: (d / "manifest.json").write_text("{"))
    shape = broken("shape", lambda d: (d / "manifest.json").write_text(json.dumps({"schema": "detaudit.run/1"})))
    cases = [
        (newer, "newer than this detaudit"),
        (corrupt, "corrupt or unreadable Parquet"),
        (foreign, "foreign Parquet"),
        (bad_json, "unreadable manifest"),
        (shape, "invalid manifest"),
    ]
    for d, fragment in cases:
        snap = tree_snapshot(d)
        r = cli(capsys, *base, "--resume", "--out", d)
        _assert_one_line_exit_2(r, fragment)
        assert tree_snapshot(d) == snap, d.name
