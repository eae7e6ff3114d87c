"""The HTML report in a real headless Chromium, driven over the DevTools protocol: it loads with no console error
and no network request, the fork tree and token view are there, model markup is text and never runs, and the
report's own script works under its Content-Security-Policy. A screenshot is kept as a test artifact."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from detaudit.reports.pipeline import write_reports
from test_report import EVIL, endpoint_run, invariant_run

websocket = pytest.importorskip("websocket", reason="websocket-client (the dev extra) drives Chromium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1400,1600",
]


class DevTools:
    """A minimal DevTools-protocol session on one page target: commands, and every event seen so far."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console errors, late requests)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
def chromium(tmp_path) -> Iterator[DevTools]:
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _artifact_dir(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DETAUDIT_TEST_ARTIFACTS", tmp_path / "artifacts"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def test_report_loads_offline_without_errors_and_shows_model_markup_as_text(tmp_path, chromium):
    html = tmp_path / "report.html"
    write_reports([endpoint_run(tmp_path), invariant_run(tmp_path)], html=html)
    url = html.resolve().as_uri()
    for domain in ("Page", "Runtime", "Log", "Network"):
        chromium.send(f"{domain}.enable")
    chromium.send("Page.navigate", url=url)
    chromium.wait_for("Page.loadEventFired")
    chromium.drain(1.0)

    requests = [e["params"]["request"]["url"] for e in chromium.events if e["method"] == "Network.requestWillBeSent"]
    assert requests == [url], "the report must make no request besides loading itself"
    errors = [
        e["params"]
        for e in chromium.events
        if e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []

    assert chromium.js("document.title") == "detaudit report: endpoint, local-bi"
    assert chromium.js("document.scripts.length") == 1
    assert chromium.js("document.images.length") == 0
    assert chromium.js(f"document.body.innerText.includes({json.dumps(EVIL)})") is True
    # the fork tree nests the fork at token 7 under the " New" branch of the fork at token 5
    assert chromium.js("document.querySelectorAll('details.forks ul.branches ul.tree').length") == 1
    assert chromium.js("document.querySelectorAll('table.tv-table').length") == 3
    assert chromium.js("document.querySelector('table.tv-table .tok.div').innerText") == "·Queens"
    assert chromium.js("document.querySelectorAll('.chart svg').length") == 1

    shot = _artifact_dir(tmp_path) / "report.png"
    shot.write_bytes(base64.b64decode(chromium.send("Page.captureScreenshot", format="png")["data"]))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # the report's own script is allowed by its CSP hash and works: collapse all, then expand all
    assert (
        chromium.js(
            "document.querySelector('button[data-details=close]').click(); "
            "document.querySelectorAll('details[open]').length"
        )
        == 0
    )
    assert (
        chromium.js(
            "document.querySelector('button[data-details=open]').click(); "
            "document.querySelectorAll('details:not([open])').length"
        )
        == 0
    )


# A demo-like pair of runs (docs/report-*.png): a code prompt whose loaded arm forks on whitespace and comparison
# tokens, next to a batch-invariant rerun whose one answer is not the endpoint's serial answer.
FIB_PROMPT = "def fibonacci(n):"
FIB = ["\n", "   ", " if", " n", " <", " 2", ":", "\n", "       ", " return", " n", "\n", "   ", " return", " fib"]
FIB += ["onacci", "(", "n", " -", " 1", ")", " +", " fib", "onacci", "(", "n", " -", " 2", ")", "\n", "\n", "def"]
FIB_LE = FIB[:4] + [" <=", " 1", ":", "\n", "       ", " return", " n", "\n", "   ", " return", " fib", "onacci", "("]
FIB_LE += ["n", " -", " 1", ")", " +", " fib", "onacci", "(", "n", " -", " 2", ")", "\n", "\n", "def"]
FIB_INLINE = FIB[:7] + [" return", " n", "\n", "   ", " return", " fib", "onacci", "(", "n", "-", "1", ")", " +"]
FIB_INLINE += [" fib", "onacci", "(", "n", "-", "2", ")", "\n", "\n", "\n", "#", " test"]
FIB_LOCAL = FIB[:11] + ["\n", "\n", "   ", " return", " fib", "onacci", "(", "n", " -", " 1", ")", " +", " fib"]
FIB_LOCAL += ["onacci", "(", "n", " -", " 2", ")", "\n", "\n", "print", "(", "fib"]
LOCAL_ENGINE = {
    "kernels": "batch-invariant",
    "dtype": "bfloat16",
    "device": "cpu",
    "torch": "2.13.0",
    "engine": {"max_batch": 16, "max_batched_tokens": 32, "block_size": 16, "cuda_graphs": False},
    "scenarios": ["single"],
    "seed": 3,
}


def demo_like_runs(tmp_path: Path, scripted_server, capsys) -> list[Path]:
    """An endpoint run recorded from a scripted load-dependent server through `detaudit run` (-n 48 -c 1,16, as
    the demo), and a local batch-invariant run written directly: the report the demo writes, built offline."""
    from runhelp import cli
    from test_report import make_run

    server = scripted_server(
        completions={"A": FIB, "B": FIB_LE, "C": FIB_INLINE},
        schedules={FIB_PROMPT: {"serial": "A", "loaded": ["A", "A", "B", "A", "A", "C", "A", "B"]}},
        latency_s=0.01,
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fibonacci", "prompt": FIB_PROMPT}) + "\n")
    endpoint = tmp_path / "endpoint-stock"
    args = ["run", "--base-url", server.base_url, "--prompt-file", prompts, "-n", 48, "-c", "1,16"]
    r = cli(capsys, *args, "--max-tokens", 32, "--out", endpoint)
    assert r.code == 0, r.err
    local = make_run(
        tmp_path / "local-batch-invariant",
        {"single": (16, [(FIB_LOCAL, 48)])},
        kind="local",
        engine=LOCAL_ENGINE,
        prompt=FIB_PROMPT,
        prompt_id="fibonacci",
    )
    return [endpoint, local]


@pytest.mark.parametrize("width", [1400, 1920])
def test_report_leads_with_the_finding_and_shows_each_fork_in_view(tmp_path, chromium, scripted_server, capsys, width):
    html = tmp_path / "report.html"
    write_reports(demo_like_runs(tmp_path, scripted_server, capsys), html=html)
    chromium.send("Page.enable")
    chromium.send("Emulation.setDeviceMetricsOverride", width=width, height=1100, deviceScaleFactor=1, mobile=False)
    chromium.send("Page.navigate", url=html.resolve().as_uri())
    chromium.wait_for("Page.loadEventFired")
    chromium.drain(0.5)

    # the first thing under the title is the finding, on the first screen, in words
    assert chromium.js("document.querySelector('h2').innerText") == "Findings"
    finding = chromium.js("document.querySelector('#findings li').innerText")
    assert finding.startswith("fibonacci load-dependent: the endpoint gave 1 distinct completion of 48 ok"), finding
    assert "the first fork is at token 4" in finding and "differs from the endpoint's answer" in finding
    assert chromium.js("document.querySelector('#findings li').getBoundingClientRect().bottom") < 1100
    assert chromium.js("document.body.innerText.includes('concurrency')") is False  # plain words, no jargon

    # every highlighted diverging token is inside its scroll box and inside the window
    boxes = chromium.js(
        "Array.from(document.querySelectorAll('.tv-scroll')).map(b => { const t = b.querySelector('.tok.div');"
        " const r = t.getBoundingClientRect(), s = b.getBoundingClientRect();"
        " return [r.left >= s.left - 0.5, r.right <= s.right + 0.5, r.right <= window.innerWidth]; })"
    )
    assert boxes and all(all(v) for v in boxes), boxes

    # the engine block is one line until opened
    assert (
        chromium.js("document.querySelector('details.engine summary').innerText")
        == "batch-invariant kernels, bfloat16, cpu"
    )
    assert chromium.js("document.querySelector('details.engine').open") is False

    shot = base64.b64decode(chromium.send("Page.captureScreenshot", format="png")["data"])
    (_artifact_dir(tmp_path) / f"report-{width}.png").write_bytes(shot)
    full = chromium.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
    (_artifact_dir(tmp_path) / f"report-{width}-full.png").write_bytes(base64.b64decode(full))
    if os.environ.get("DETAUDIT_DOCS_SCREENSHOTS"):  # regenerates docs/report-1400.png and docs/report-1920.png
        Path(os.environ["DETAUDIT_DOCS_SCREENSHOTS"], f"report-{width}.png").write_bytes(shot)
