"""Shared fixtures: the scripted loopback server (tests/scripted_server.py) and a tiny `transformers serve`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from scripted_server import ScriptedServer  # tests/ is on sys.path under pytest (rootdir conftest, no __init__.py)


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
