"""POST /v1/batches/{id}/retry: rerun only what did not succeed, merge the files, pay once.

The simulator counts every request body it receives, so "a line that succeeded never runs
again" is checked as arithmetic on its request counter."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from support import jsonl, make_config, submit_batch, wait_for_batch

from lowtide_sim.launch import start_simulator


def _route(sim_url: str, max_concurrency: int = 8) -> str:
    return f"""
[[models]]
name = "sim-model"
base_url = "{sim_url}"
max_concurrency = {max_concurrency}
max_retries = 2
timeout = 5
input_price = 1.0
output_price = 2.0
"""


def _lines(n: int, failing: set[int] = frozenset()) -> list[dict]:
    lines = []
    for i in range(n):
        body = {"model": "sim-model", "messages": [{"role": "user", "content": f"q{i}"}]}
        if i in failing:
            body["sim_fail_first"] = 3  # three receipts fail: more than max_retries allows
        lines.append(
            {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return lines


def _retry(client: openai.OpenAI, batch_id: str, **body):
    return client.post(f"/batches/{batch_id}/retry", body=body, cast_to=openai.types.Batch)


def _file(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def _lowtide(batch) -> dict:
    return batch.model_extra["lowtide"]


def test_retry_reruns_only_failed_lines_and_merges_in_input_order(make_server):
    failing = {3, 7, 11, 19, 23, 29, 31, 33}
    with start_simulator() as sim:
        srv = make_server(make_config(models=_route(sim.url)))
        client = srv.start().client()
        first = wait_for_batch(client, submit_batch(client, _lines(40, failing)).id)
        assert first.status == "completed" and first.request_counts.failed == 8, first
        errors = _file(client, first.error_file_id)
        assert {e["response"]["status_code"] for e in errors} == {500}
        sent = sim.stats()["requests"]
        assert sent == 32 + 8 * 3

        # A running batch cannot be retried; a retry picks lines by custom_id.
        picked = _retry(client, first.id, custom_ids=["r-3", "r-7", "r-0"])
        assert picked.status == "in_progress" and _lowtide(picked)["retries"] == 1
        with pytest.raises(openai.ConflictError):
            _retry(client, first.id)
        second = wait_for_batch(client, first.id)
        assert second.status == "completed", (second, srv.log())
        assert second.request_counts.completed == 34 and second.request_counts.failed == 6
        assert sim.stats()["requests"] == sent + 2  # r-0 succeeded before: not sent again

        # A retry of a retried batch, without a body: every line that did not succeed.
        third = wait_for_batch(client, _retry(client, first.id).id)
        assert third.status == "completed", (third, srv.log())
        assert _lowtide(third)["retries"] == 2
        assert third.request_counts.completed == 40 and third.request_counts.failed == 0
        assert third.error_file_id is None
        stats = sim.stats()
        assert stats["requests"] == sent + 8  # each failing line once more, nothing else
        assert stats["distinct_bodies"] == 40
        out = _file(client, third.output_file_id)
        assert [o["custom_id"] for o in out] == [f"r-{i}" for i in range(40)]  # input order
        # Usage and cost describe the merged result: 40 answered lines, nothing counted twice.
        assert third.usage.input_tokens == sum(
            o["response"]["body"]["usage"]["prompt_tokens"] for o in out
        )
        assert _lowtide(third)["cost"]["amount"] > 0


def test_pause_is_cancel_and_resume_is_retry(make_server):
    with start_simulator("--latency-ms", "100") as sim:
        srv = make_server(make_config(models=_route(sim.url, max_concurrency=2)))
        client = srv.start().client()
        batch = submit_batch(client, _lines(60))
        deadline = time.monotonic() + 30
        while client.batches.retrieve(batch.id).request_counts.completed < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.batches.cancel(batch.id)  # pause
        paused = wait_for_batch(client, batch.id)
        assert paused.status == "cancelled"
        kept = {o["custom_id"] for o in _file(client, paused.output_file_id)}
        assert 10 <= len(kept) < 60
        sent = sim.stats()["requests"]
        resumed = wait_for_batch(client, _retry(client, batch.id).id, timeout=60)  # resume
        assert resumed.status == "completed", (resumed, srv.log())
        out = _file(client, resumed.output_file_id)
        assert [o["custom_id"] for o in out] == [f"r-{i}" for i in range(60)]
        assert resumed.error_file_id is None
        stats = sim.stats()
        assert stats["requests"] - sent == 60 - len(kept), (stats, srv.log())


def test_retry_after_expiry_with_a_new_window(make_server):
    with start_simulator("--latency-ms", "200") as sim:
        srv = make_server(make_config(models=_route(sim.url, max_concurrency=1)))
        client = srv.start().client()
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(_lines(30)))), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2s"
        )
        expired = wait_for_batch(client, batch.id, timeout=30)
        assert expired.status == "expired"
        codes = {e["error"]["code"] for e in _file(client, expired.error_file_id)}
        assert codes == {"batch_expired"}
        kept = len(_file(client, expired.output_file_id))
        sent = sim.stats()["requests"]
        again = _retry(client, batch.id, codes=["batch_expired"], completion_window="1h")
        assert again.expires_at - again.in_progress_at == 3600
        done = wait_for_batch(client, batch.id, timeout=60)
        assert done.status == "completed" and done.request_counts.completed == 30
        assert sim.stats()["requests"] - sent == 30 - kept


def test_retry_refuses_what_it_cannot_do(client):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(jsonl([line]))), purpose="batch")
    failed = client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_for_batch(client, failed.id)
    assert failed.status == "failed"
    with pytest.raises(openai.ConflictError):
        _retry(client, failed.id)
    with pytest.raises(openai.NotFoundError):
        _retry(client, "batch_nope")
    with pytest.raises(openai.BadRequestError):
        _retry(client, failed.id, codes="not-a-list")
