"""Fixtures shared by the server's process tests."""

from __future__ import annotations

import pytest

from tests.serve.test_serve_process import ServerProcess


@pytest.fixture
def server_process():
    procs = []

    def start(*flags):
        procs.append(ServerProcess(*flags))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()
