"""Routes that fail fast: a route the upstream refuses stops, its lines wait, and it resumes."""

from __future__ import annotations

import time

import httpx
from support import make_config, submit_batch, wait_for_batch

from lowtide_sim.launch import start_simulator


def _route(sim_url: str, key_line: str) -> str:
    return f"""
[[models]]
name = "sim-model"
base_url = "{sim_url}"
{key_line}
max_concurrency = 4
timeout = 2
max_retries = 2
"""


def _lines(n: int) -> list[dict]:
    return [
        {
            "custom_id": f"rp-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-model", "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(n)
    ]


def _lowtide(batch) -> dict:
    return batch.model_extra["lowtide"]


def test_a_refused_route_holds_its_lines_and_resumes_when_it_works(make_server):
    with start_simulator("--require-key", "sk-right") as sim:
        config = make_config(models=_route(sim.url, 'api_key = "sk-wrong"'))
        config = config.replace("[worker]\n", "[worker]\nroute_probe_seconds = 0.5\n")
        srv = make_server(config).start()
        client = srv.client()
        batch = submit_batch(client, _lines(30))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batch = client.batches.retrieve(batch.id)
            if _lowtide(batch)["paused_reason"]:
                break
            time.sleep(0.1)
        reason = _lowtide(batch)["paused_reason"]
        assert reason and "401" in reason and "sim-model" in reason, batch
        health = httpx.get(f"http://127.0.0.1:{srv.port}/healthz").json()
        assert "sim-model" in health["route_problems"]
        # Held, not failed: no line is burned, and only a probe now and then reaches upstream.
        sent = sim.stats()["requests"]
        time.sleep(1.6)
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "in_progress" and batch.request_counts.failed == 0
        assert sim.stats()["requests"] - sent <= 5
        assert sent <= 4 + 2  # the first window, and a probe or two
        sim.configure(require_key="sk-wrong")  # the upstream now takes the key
        final = wait_for_batch(client, batch.id, timeout=60)
        assert final.status == "completed" and final.request_counts.completed == 30
        assert final.request_counts.failed == 0 and _lowtide(final)["paused_reason"] is None
        assert httpx.get(f"http://127.0.0.1:{srv.port}/healthz").json()["route_problems"] == {}


def test_an_unset_key_variable_is_reported_at_start(make_server, sim_url):
    config = make_config(models=_route(sim_url, 'api_key_env = "LOWTIDE_TEST_NO_SUCH_KEY"'))
    srv = make_server(config).start()
    problems = httpx.get(f"http://127.0.0.1:{srv.port}/healthz").json()["route_problems"]
    assert "LOWTIDE_TEST_NO_SUCH_KEY" in problems["sim-model"]
    assert "LOWTIDE_TEST_NO_SUCH_KEY" in srv.log()
