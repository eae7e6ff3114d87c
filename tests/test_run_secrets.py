"""API keys, header values and URL credentials never reach any file, report, log or message detaudit writes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from runhelp import QUEENS, cli_process

KEY = "sk-leaktest-KEY-0123456789abcdef"
HEADER_VALUE = "hv-leaktest-HEADER-fedcba9876543210"
URL_PASSWORD = "pw-leaktest-URL-55aa55aa"
SECRETS = [KEY, HEADER_VALUE, URL_PASSWORD, "leaktest"]


def _scan(texts: list[str], root: Path) -> list[str]:
    """Where any secret appears: in the given texts or in any file under root (bytes, so Parquet too)."""
    found = []
    for i, text in enumerate(texts):
        found += [f"output #{i}: {s}" for s in SECRETS if s in text]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    return found


def test_no_secret_anywhere(scripted_server, tmp_path) -> None:
    server = scripted_server(
        completions={"Q": QUEENS},
        default="Q",
        api_key=KEY,
        faults={"rate": 0.3, "seed": 3, "kinds": ["429", "500", "reset", "html"], "prompts": ["hi"]},
    )
    env = {"OPENAI_API_KEY": KEY}
    out = tmp_path / "run"
    outputs: list[str] = []

    def run(*args: str, code: int | None = 0) -> None:
        r = cli_process(*args, env=env)
        outputs.extend([r.out, r.err])
        if code is not None:
            assert r.code == code, r.err

    run(
        "run",
        "--base-url",
        server.base_url,
        "-p",
        "hi",
        "-n",
        30,
        "-c",
        "1,4",
        "--retries",
        1,
        "--backoff",
        0.01,
        "--header",
        f"X-Custom-Token: {HEADER_VALUE}",
        "--out",
        out,
    )
    assert server.log[-1]["headers"]["x-custom-token"] == HEADER_VALUE  # it was sent...
    run("analyze", out, "--json")
    run("report", out, "--html", tmp_path / "r.html", "--md", tmp_path / "r.md", "--junit", tmp_path / "r.xml")
    run("run", "--resume", "--out", out, "--header", f"X-Custom-Token: {HEADER_VALUE}")
    # ...and failures: a wrong key, a URL with credentials, a refused header
    env["OPENAI_API_KEY"] = KEY + "-wrong"
    run("run", "--base-url", server.base_url, "-p", "hi", "--out", tmp_path / "x", code=2)
    url = server.base_url.replace("http://", f"http://user:{URL_PASSWORD}@")
    run("run", "--base-url", url, "-p", "hi", "--out", tmp_path / "y", code=2)
    open_server = scripted_server(completions={"Q": QUEENS}, default="Q")
    del env["OPENAI_API_KEY"]
    url = open_server.base_url.replace("http://", f"http://user:{URL_PASSWORD}@") + f"?api-key={URL_PASSWORD}"
    run("run", "--base-url", url, "-p", "hi", "-n", 3, "--out", tmp_path / "z")
    run("probe", "endpoint", "--base-url", url, "--json")
    run(
        "run",
        "--base-url",
        f"http://127.0.0.1:9/v1?token={URL_PASSWORD}",
        "-p",
        "hi",
        "--retries",
        0,
        "--out",
        tmp_path / "w",
        code=2,
    )
    assert (tmp_path / "z" / "manifest.json").exists() and (tmp_path / "r.html").exists()
    assert "***" in (tmp_path / "z" / "manifest.json").read_text()  # the URL was recorded, redacted
    assert _scan(outputs, tmp_path) == []


def _basic_token(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()


def test_an_echoed_basic_auth_header_is_scrubbed(scripted_server, tmp_path) -> None:
    # The Basic header httpx derives from user:password looks nothing like the password: it leaked in error lines.
    echo = {"kinds": ["500"], "message": "request had Authorization: {authorization}"}
    always = scripted_server(faults={"rate": 1.0, **echo})
    url = always.base_url.replace("http://", f"http://user:{URL_PASSWORD}@")
    token = _basic_token(url)
    env = {"OPENAI_API_KEY": ""}
    r = cli_process("--debug", "run", "--base-url", url, "-p", "hi", "--retries", 0, "--out", tmp_path / "a", env=env)
    assert r.code == 2 and "Traceback" in r.err and "request had Authorization: Basic ***" in r.err, r.err
    assert always.log[-1]["headers"]["authorization"] == f"Basic {token}"  # it was sent, and echoed
    # A run that records the echo in its error rows: never on disk either.
    some = scripted_server(faults={"first": ["500"] * 4, "prompts": ["hi"], **echo})
    url = some.base_url.replace("http://", f"http://user:{URL_PASSWORD}@")
    r2 = cli_process(
        "--debug", "run", "--base-url", url, "-p", "hi", "-n", 6, "--retries", 0, "--out", tmp_path / "b", env=env
    )
    assert r2.code == 3, r2.err  # 4 of 6 failed
    outputs = [r.out, r.err, r2.out, r2.err]
    assert [t for t in outputs if token in t] == []
    assert _scan(outputs, tmp_path) == [] and not [
        p for p in tmp_path.rglob("*") if p.is_file() and token.encode() in p.read_bytes()
    ]


@pytest.mark.parametrize(
    "url_creds,header,key,names",
    [
        (True, True, False, "user:password in --base-url and --header Authorization"),
        (True, False, True, "user:password in --base-url and the API key in OPENAI_API_KEY"),
        (False, True, True, "--header Authorization and the API key in OPENAI_API_KEY"),
    ],
)
def test_two_sources_of_credentials_are_refused(url_creds, header, key, names, scripted_server, tmp_path) -> None:
    # Whichever httpx applied last silently won: the URL's Basic auth replaced the header and the key.
    server = scripted_server()
    url = server.base_url.replace("http://", f"http://user:{URL_PASSWORD}@") if url_creds else server.base_url
    common = ["--base-url", url] + (["--header", f"authorization: Bearer {HEADER_VALUE}"] if header else [])
    env = {"OPENAI_API_KEY": KEY if key else ""}
    for args in (["run", *common, "-p", "hi", "--out", tmp_path / "run"], ["probe", "endpoint", *common]):
        r = cli_process(*args, env=env)
        assert r.code == 2 and r.err.count("\n") == 1 and f"conflicting credentials: {names}" in r.err, r.err
        assert _scan([r.out, r.err], tmp_path) == []
    assert not (tmp_path / "run").exists() and server.stats["requests"] == 0
