"""The README's `transformers serve` snippet: every flag it gives the server exists in the installed transformers,
and it stays bounded (a timeout on the wait), quiet (the log to a file) and stoppable (a kill of the pid it saved).
The snippet itself is run by hand (its measured times are in the README); tests/test_transformers_serve.py runs a
real `transformers serve` with the same memory flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MAIN = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "transformers serve" in b]
    return block


def test_the_snippet_is_bounded_quiet_rerunnable_and_stoppable():
    block = _snippet()
    assert block.startswith("[ -d /tmp/tiny ] || detaudit tiny-model /tmp/tiny")  # re-runnable: no && chain
    serve = block[block.index("transformers serve") : block.index("&\n")]
    assert "> /tmp/transformers-serve.log 2>&1" in serve
    assert "echo $! > /tmp/transformers-serve.pid" in block and 'kill "$(cat /tmp/transformers-serve.pid)"' in block
    assert re.search(r"timeout \d+ sh -c 'until curl", block)
    assert "--out runs/transformers-serve --force" in block


def test_every_server_flag_of_the_snippet_exists():
    pytest.importorskip("transformers", reason="the local extra brings transformers")
    serve = _snippet().split("transformers serve", 1)[1].split(">", 1)[0]
    flags = set(re.findall(r"(--[a-z][a-z-]+)", serve))
    assert {"--cb-num-blocks", "--cb-block-size", "--cb-max-batch-tokens", "--continuous-batching"} <= flags
    help_text = subprocess.run(
        [sys.executable, "-c", MAIN, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert "--cb-num-blocks" in help_text, help_text[-2000:]
    assert [f for f in sorted(flags) if f not in help_text] == []
