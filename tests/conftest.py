"""Shared fixtures: the scripted loopback server (tests/scripted_server.py) and a tiny `transformers serve`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `from tests.scripted_server import ...` works however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.scripted_server import ScriptedServer  # noqa: E402


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """A factory: `server = scripted_server(completions=..., schedules=..., faults=...)` starts one on 127.0.0.1.

    Every server started through it is stopped when the test ends. See tests/scripted_server.py for the script API.
    """
    started: list[ScriptedServer] = []

    def make(**kwargs) -> ScriptedServer:
        server = ScriptedServer(**kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
