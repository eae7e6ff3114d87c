"""A hostile endpoint (tests/hostile_server.py): one poisoned answer among good ones, one test per mode (issue #15).

Each test runs `detaudit run` as a real process against a loopback server that poisons arrival AT of the audited
prompt, then checks from disk that nothing was lost or doubled (N x arms rows, each sample index once), that the
poisoned answer is one `error` row with the expected machine-readable reason (or `ok` where the answer is
legitimately usable), that every other row holds exactly the scripted completion, that the manifest's status and
the exit code agree, and that nothing the server sent reached the terminal raw; then `detaudit analyze` on the run.
`--retries 0` so the poisoned attempt is the row's only one. The table of modes and results is docs/reliability.md §8.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_server import MODES, SERVER_MODES, STREAM_ONLY, HostileServer
from runhelp import FEYNMAN, QUEENS, Result, cli, cli_process

from detaudit.rundir.io import load_manifest, read_samples

N, CONCURRENCY, ARMS = 12, "3,6", 2
ROWS = N * ARMS
AT = 7  # the poisoned arrival: in the first arm, after a few good answers
SCRIPTED = "".join(QUEENS)
USER, PASSWORD = "alice", "s3cretpassw0rd"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
MAX_RAW_ANSWER = 64 * 1024  # a bound loose enough for any sane choice, far below the 10 MiB of `huge`
# What must never reach a terminal raw: C0 controls but tab and newline, a CR that does not end a line, DEL, C1,
# and the bidi controls that reorder what a reader sees.
RAW = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]|\r(?!\n)")


@dataclass(frozen=True)
class Case:
    """One mode over one transport, and what the run must record for it."""

    mode: str
    reason: str | None  # error_reason of the poisoned row; None: the row is ok
    stream: bool = False
    scope: str = "one"  # "one": arrival AT of the audited prompt; "all": every completion request, the probe's too
    text: str | None = None  # an ok poisoned row's text when it differs from the scripted one

    @property
    def id(self) -> str:
        return f"{self.mode}-{'stream' if self.stream else 'whole'}" + ("-all" if self.scope == "all" else "")

    @property
    def shared(self) -> bool:
        """Whether the case poisons the whole server (the probe, /v1/models), so its run cannot share it."""
        return self.scope == "all" or self.mode in SERVER_MODES

    @property
    def timeout(self) -> float:
        return 2.0 if self.mode in ("trickle", "keepalive") else 10.0


def _both(mode: str, reason: str | None, *, stream_reason: str | None = None) -> list[Case]:
    return [Case(mode, reason), Case(mode, stream_reason or reason, stream=True)]


CASES: list[Case] = [
    # wrong types: the writer used to drop rows or the run died with exit 70
    *_both("model_int", "malformed:model"),
    *_both("prompt_tokens_str", "malformed:usage.prompt_tokens"),
    Case("usage_huge", "malformed:usage.prompt_tokens"),
    *_both("token_id_huge", "malformed:choices.token_ids"),
    Case("token_id_float", "malformed:choices.token_ids"),
    Case("token_id_bool", "malformed:choices.token_ids"),
    *_both("finish_reason_dict", "malformed:choices.finish_reason"),
    *_both("surrogate_token", "malformed:choices.logprobs.content.token"),
    *_both(
        "surrogate_content",
        "malformed:choices.message.content",
        stream_reason="malformed:choices.delta.content",
    ),
    *_both("bytes_over_255", "malformed:choices.logprobs.content.bytes"),
    *_both("logprob_str", "malformed:choices.logprobs.content.logprob"),
    *_both("logprob_nan", "malformed:json"),
    Case("logprob_infinity", "malformed:json"),
    Case("top_logprobs_dict", "malformed:choices.logprobs.content.top_logprobs"),
    *_both(
        "content_list",
        "malformed:choices.message.content",
        stream_reason="malformed:choices.delta.content",
    ),
    Case("content_int", "malformed:choices.message.content"),
    Case("fingerprint_object", "malformed:system_fingerprint"),
    Case("choices_object", "malformed:choices"),
    # not a completion: used to be recorded ok with empty or wrong text
    *_both("content_null", "no_content"),
    *_both("refusal", "refusal"),
    *_both("tool_calls", "tool_calls"),
    Case("empty_stream", "empty_stream", stream=True),
    *_both("zero_choices", "choice_index", stream_reason="empty_stream"),
    Case("index_1_first", None),  # the choice with index 0 is the answer; the other is ignored
    Case("index_1_first", None, stream=True),
    Case("only_index_1", "choice_index"),
    *_both("duplicate_index", "choice_index"),
    Case("error_200", "server_error"),
    Case("error_event", "server_error", stream=True),
    *_both("not_openai", "not_openai"),
    Case("array_body", "not_openai"),
    # wire abuse
    *_both("trickle", "deadline"),
    *_both("keepalive", "deadline"),
    *_both("huge", "too_large"),
    *_both("truncated_json", "malformed:json"),
    *_both("empty_body", "malformed:json", stream_reason="truncated_stream"),
    Case("html_200", "malformed:json"),
    *_both("reset", "broken"),
    Case("gzip_lie", "broken"),
    Case("truncated_stream", "truncated_stream", stream=True),
    *_both("json_bomb", "malformed:json"),
    Case("redirect", "http:307"),
    # hostile strings: the row is what the server said; the terminal shows it escaped
    Case("osc_fingerprint", None),
    Case("csi_fingerprint", None),
    Case("osc_models", None),
    Case("osc_error", "http:500"),
    Case("osc_error", None, scope="all"),
    Case("bidi_token", None, text=SCRIPTED[:-1] + "\u202e.\u202c"),
    Case("c1_token", None, text=SCRIPTED + "\x9b2J\x07\rX"),
    Case("mention_token", None, text=SCRIPTED[:-1] + " @everyone"),
    # secrets: a server that echoes the Authorization header of URL credentials
    Case("echo_auth", "http:500"),
    Case("echo_auth", None, scope="all"),
    # legitimately fine
    *_both("duplicate_keys", None),
    Case("extra_fields", None),
    Case("nulls", None),
]


@dataclass
class Outcome:
    """What one `detaudit run` left: its exit code and output, its run directory, how many answers were poisoned."""

    result: Result
    out: Path
    poisoned: int


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer(completions={"Q": QUEENS}, default="Q", hold_s=6.0).start()
    yield server
    server.stop()


def _run(server: HostileServer, case: Case, prompt: str, out: Path) -> Result:
    base_url = server.base_url
    if case.mode == "echo_auth":
        base_url = base_url.replace("http://", f"http://{USER}:{PASSWORD}@")
    return cli_process(
        "run",
        "--base-url",
        base_url,
        "-p",
        prompt,
        "-n",
        N,
        "-c",
        CONCURRENCY,
        "--retries",
        0,
        "--timeout",
        case.timeout,
        "--out",
        out,
        *(["--stream"] if case.stream else []),
        timeout=120,
    )


@pytest.fixture(scope="module")
def outcomes(
    hostile: HostileServer, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """The runs of the selected cases that poison one answer, three at a time: each run has a prompt and a poison
    spec of its own, so they share the server without touching each other's arrivals (saves most of the wall time)."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)
    ]
    root = tmp_path_factory.mktemp("hostile")
    one = [case for case in selected if not case.shared]
    prompts = {case.id: f"{FEYNMAN} ({case.id})" for case in one}
    poisons = {c.id: hostile.add_poison({"mode": c.mode, "at": [AT], "prompts": [prompts[c.id]]}) for c in one}
    with ThreadPoolExecutor(3) as pool:
        results = {c.id: pool.submit(_run, hostile, c, prompts[c.id], root / c.id) for c in one}
        done = {cid: Outcome(f.result(), root / cid, poisons[cid].poisoned) for cid, f in results.items()}
    hostile.set_poison(None)
    return done


def test_every_mode_has_a_case() -> None:
    """The table above is the list in docs/reliability.md: a mode without a case would go untested."""
    assert {c.mode for c in CASES} == set(MODES)
    assert all(c.stream for c in CASES if c.mode in STREAM_ONLY)
    assert len(MODES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def _assert_clean(*texts: str) -> None:
    for text in texts:
        found = RAW.search(text)
        assert found is None, f"raw {found.group()!r} on the terminal: {text[max(0, found.start() - 80) :][:200]!r}"


def _assert_no_secret(out: Path, *texts: str) -> None:
    files = [p.read_bytes() for p in out.rglob("*") if p.is_file()] if out.exists() else []
    for blob in [t.encode() for t in texts] + files:
        for secret in (PASSWORD, BASIC):
            assert secret.encode() not in blob


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_poisoned_answer(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    hostile: HostileServer = request.getfixturevalue("hostile")
    if case.shared:  # poisons the whole server: runs alone
        hostile.set_poison({"mode": case.mode, "rate": 1.0})
        run = Outcome(_run(hostile, case, FEYNMAN, tmp_path / "run"), tmp_path / "run", hostile.poisoned)
        hostile.set_poison(None)
    else:
        run = request.getfixturevalue("outcomes")[case.id]
    r, out = run.result, run.out
    _assert_clean(r.out, r.err)
    _assert_no_secret(out, r.out, r.err)
    if case.scope == "all":  # the probe's own answers are poisoned: the endpoint is refused before any write
        assert r.code == 2, r.err
        assert r.err.startswith("error: ") and len(r.err.splitlines()) == 1, r.err
        assert not out.exists()
        return
    assert r.code == 0, r.err
    assert load_manifest(out).status == "complete"
    assert run.poisoned == (0 if case.mode == "osc_models" else 1)
    rows = read_samples(out).to_pylist()
    assert len(rows) == ROWS
    assert Counter(row["sample_index"] for row in rows) == Counter(range(ROWS))
    odd = [row for row in rows if row["status"] != "ok" or row["text"] != SCRIPTED]
    good = [row for row in rows if row not in odd]
    assert all(row["status"] == "ok" and row["error"] is None and row["error_reason"] is None for row in good)
    if case.reason is None:
        assert all(row["status"] == "ok" for row in rows)
        assert [row["text"] for row in odd] == ([case.text] if case.text is not None else [])
    else:
        assert [(row["status"], row["error_reason"]) for row in odd] == [("error", case.reason)]
        bad = odd[0]
        assert bad["text"] is None and bad["error"] and "\n" not in bad["error"]
        assert bad["raw_answer"] is None or len(bad["raw_answer"]) <= MAX_RAW_ANSWER
    a = cli(capsys, "analyze", out)
    assert a.code == 0, a.err
    _assert_clean(a.out, a.err)
    _assert_no_secret(out, a.out, a.err)
    errors = 0 if case.reason is None else 1
    assert f"{ROWS - errors} ok, {errors} errors of {ROWS} rows ({ROWS} expected)" in " ".join(a.out.split())


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("model_int", None),
        ("truncated_json", None),
        ("content_null", "no_content"),
    ],
)
def test_retries(mode: str, reason: str | None, hostile: HostileServer, tmp_path: Path) -> None:
    """A malformed answer is retried like a 5xx: with one retry the poisoned sample ends ok on its second attempt.
    An answer the model gave (no content, a refusal, a tool call) is not: asking again would only cost time."""
    hostile.set_poison({"mode": mode, "at": [AT], "prompts": [FEYNMAN]})
    out = tmp_path / "run"
    r = cli_process(
        "run",
        "--base-url",
        hostile.base_url,
        "-p",
        FEYNMAN,
        "-n",
        N,
        "-c",
        CONCURRENCY,
        "--retries",
        1,
        "--backoff",
        0.01,
        "--out",
        out,
    )
    hostile.set_poison(None)
    assert r.code == 0, r.err
    rows = read_samples(out).to_pylist()
    assert Counter(row["sample_index"] for row in rows) == Counter(range(ROWS))
    if reason is None:
        assert all(row["status"] == "ok" and row["text"] == SCRIPTED for row in rows)
        assert sorted(row["attempts"] for row in rows) == [1] * (ROWS - 1) + [2]
    else:
        assert Counter(row["error_reason"] for row in rows) == {None: ROWS - 1, reason: 1}
        assert {row["attempts"] for row in rows} == {1}


def test_poison_among_hundreds(hostile: HostileServer, tmp_path: Path) -> None:
    """A seeded 3 % of 300 answers poisoned (a wrong-type field that used to cost a whole shard of rows): every
    poisoned answer is exactly one error row, every other one exactly one ok row."""
    hostile.set_poison({"mode": "usage_huge", "rate": 0.03, "seed": 15, "prompts": [FEYNMAN]})
    out = tmp_path / "run"
    r = cli_process(
        "run", "--base-url", hostile.base_url, "-p", FEYNMAN, "-n", 150, "-c", "4,16", "--retries", 0, "--out", out
    )
    poisoned = hostile.poisoned
    hostile.set_poison(None)
    assert r.code == 0, r.err
    assert load_manifest(out).status == "complete"
    rows = read_samples(out).to_pylist()
    assert Counter(row["sample_index"] for row in rows) == Counter(range(300))
    assert Counter(row["error_reason"] for row in rows) == {
        None: 300 - poisoned,
        "malformed:usage.prompt_tokens": poisoned,
    }
    assert poisoned > 3
