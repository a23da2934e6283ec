"""Scheduling through the real server: fair share, priority, ETA, metrics, learned limits."""

from __future__ import annotations

import httpx
import pytest
from openai import BadRequestError
from support import chat_line, make_config, submit_batch, wait_for_batch

from lowtide_sim.launch import start_simulator


def _create(client, lines, metadata=None):
    return submit_batch(client, lines, metadata=metadata)


@pytest.fixture
def slow_sim():
    with start_simulator("--latency-ms", "50") as sim:
        yield sim.url


def test_small_batch_finishes_while_big_one_runs(make_server, slow_sim):
    config = make_config(slow_sim).replace("max_concurrency = 32", "max_concurrency = 4")
    srv = make_server(config).start()
    client = srv.client()
    big = _create(client, [chat_line(f"big-{i}", f"b {i}") for i in range(3000)])
    wait_for_batch(client, big.id, statuses=("in_progress",))
    small = _create(
        client, [chat_line(f"small-{i}", f"s {i}") for i in range(5)], {"priority": "high"}
    )
    done = wait_for_batch(client, small.id, timeout=60)
    assert done.status == "completed" and done.request_counts.completed == 5
    running = client.batches.retrieve(big.id)
    assert running.status == "in_progress"  # the small batch did not wait for the big one
    extension = running.model_extra["lowtide"]
    assert extension["priority"] == "normal"
    assert (
        extension["lines_per_second"] > 0
        and extension["estimated_finish_at"] > running.in_progress_at
    )
    assert done.model_extra["lowtide"]["priority"] == "high"
    client.batches.cancel(big.id)
    metrics = httpx.get(srv.base_url.removesuffix("/v1") + "/metrics").text
    assert 'lowtide_route_requests_total{outcome="200",route="sim-model"}' in metrics
    assert 'lowtide_route_window{route="sim-model"}' in metrics


def test_priority_must_be_known(client):
    with pytest.raises(BadRequestError) as info:
        _create(client, [chat_line("p", "x")], {"priority": "urgent"})
    assert info.value.param == "metadata.priority"


def test_limits_learned_from_headers_keep_429s_rare(make_server):
    with start_simulator("--rpm", "120", "--latency-ms", "20") as sim:
        srv = make_server(make_config(sim.url)).start()
        client = srv.client()
        done = wait_for_batch(
            client,
            _create(client, [chat_line(f"l{i}", f"x {i}") for i in range(150)]).id,
            timeout=120,
        )
        assert done.status == "completed" and done.request_counts.completed == 150
        # 120 fit the upstream's bucket at once; the other 30 wait for its refill, 2 a second.
        # Retry-After and the learned limit keep the 429s to a handful (not one per request).
        assert sim.stats()["rate_limited"] <= 10
