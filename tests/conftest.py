"""Shared fixtures: a simulated upstream and a Lowtide server per test module."""

from __future__ import annotations

import pytest
from support import LowtideServer, drop_test_databases, make_config, start_sim, stop_process


@pytest.fixture(scope="module")
def sim_url():
    proc, url = start_sim()
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def server(sim_url, tmp_path_factory):
    srv = LowtideServer(tmp_path_factory.mktemp("lowtide") / "data", make_config(sim_url)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture
def make_server(tmp_path):
    """Factory for a server with its own configuration; stopped at teardown."""
    servers: list[LowtideServer] = []

    def make(config_text: str, name: str = "data") -> LowtideServer:
        srv = LowtideServer(tmp_path / name, config_text)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session", autouse=True)
def _drop_databases():
    yield
    drop_test_databases()
