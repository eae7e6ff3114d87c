"""API keys, header values and URL credentials never reach any file, report, log or message detaudit writes."""

from __future__ import annotations

from pathlib import Path

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
    server = scripted_server(completions={"Q": QUEENS}, default="Q", api_key=KEY,
                             faults={"rate": 0.3, "seed": 3, "kinds": ["429", "500", "reset", "html"],
                                     "prompts": ["hi"]})  # fmt: skip
    env = {"OPENAI_API_KEY": KEY}
    out = tmp_path / "run"
    outputs: list[str] = []

    def run(*args: str, code: int | None = 0) -> None:
        r = cli_process(*args, env=env)
        outputs.extend([r.out, r.err])
        if code is not None:
            assert r.code == code, r.err

    run("run", "--base-url", server.base_url, "-p", "hi", "-n", 30, "-c", "1,4", "--retries", 1, "--backoff", 0.01,
        "--header", f"X-Custom-Token: {HEADER_VALUE}", "--out", out)  # fmt: skip
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
    run("run", "--base-url", f"http://127.0.0.1:9/v1?token={URL_PASSWORD}", "-p", "hi", "--retries", 0,
        "--out", tmp_path / "w", code=2)  # fmt: skip
    assert (tmp_path / "z" / "manifest.json").exists() and (tmp_path / "r.html").exists()
    assert "***" in (tmp_path / "z" / "manifest.json").read_text()  # the URL was recorded, redacted
    assert _scan(outputs, tmp_path) == []
