"""request_counts move line by line and the ETA shows up with the first answers, not with the
first segment commit."""

from __future__ import annotations

import time

from support import make_config, submit_batch, wait_for_batch


def test_counts_and_eta_advance_before_any_commit(make_server):
    routes = """
[[models]]
name = "slow-echo"
engine = "echo"
latency_ms = 50
max_concurrency = 4
"""
    config = make_config(models=routes).replace(
        "segment_lines = 50\nsegment_seconds = 0.3", "segment_lines = 100000\nsegment_seconds = 600"
    )
    assert "segment_seconds = 600" in config
    client = make_server(config).start().client()
    lines = [
        {
            "custom_id": f"p-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "slow-echo", "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(300)
    ]
    batch = submit_batch(client, lines)
    seen: list[int] = []
    eta = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = client.batches.retrieve(batch.id)
        if current.status == "validating":
            time.sleep(0.05)
            continue
        if current.status != "in_progress":
            break
        seen.append(current.request_counts.completed)
        eta = eta or current.model_extra["lowtide"]["estimated_finish_at"]
        time.sleep(0.2)
    # Nothing is committed before the shard ends (one segment), yet the counts moved in steps
    # and an estimated finish was there from the first answers.
    steps = sorted(set(seen))
    assert len(steps) >= 5 and 0 < steps[1] < 300, steps
    assert eta is not None
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 300
