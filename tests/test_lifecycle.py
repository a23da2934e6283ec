"""Cancel, expiry, crashes and faults: every line ends up exactly once, in one of the two files."""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter

import pytest
from openai import BadRequestError, ConflictError
from support import (
    chat_line,
    jsonl,
    make_config,
    sim_stats,
    start_sim,
    stop_process,
    wait_for_batch,
)


def _create(client, n: int, prefix: str = "r", window: str = "24h", model: str = "sim-model"):
    lines = [chat_line(f"{prefix}-{i}", f"{prefix} body {i}", model=model) for i in range(n)]
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window=window
    )


def _lines(client, file_id):
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def _exactly_once(client, batch, n: int, prefix: str = "r") -> tuple[list[dict], list[dict]]:
    out, err = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    ids = Counter(line["custom_id"] for line in out + err)
    assert set(ids) == {f"{prefix}-{i}" for i in range(n)}
    assert max(ids.values()) == 1
    return out, err


def _wait_progress(client, batch_id: str, at_least: int, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.request_counts.completed >= at_least:
            return b
        time.sleep(0.05)
    raise TimeoutError(f"no progress: {b}")


@pytest.fixture
def slow_sim():
    proc, url = start_sim("--latency-ms", "50")
    yield url
    stop_process(proc)


def _slow_config(sim_url: str, concurrency: int = 4, extra: str = "") -> str:
    return make_config(sim_url, extra).replace(
        "max_concurrency = 32", f"max_concurrency = {concurrency}"
    )


def test_cancel_in_progress_keeps_finished_lines(make_server, slow_sim):
    srv = make_server(_slow_config(slow_sim)).start()
    client = srv.client()
    b = _create(client, 400)
    _wait_progress(client, b.id, 20)
    cancelled = client.batches.cancel(b.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    again = client.batches.cancel(b.id)  # idempotent while cancelling and after
    assert again.status in ("cancelling", "cancelled")
    final = wait_for_batch(client, b.id)
    assert final.status == "cancelled" and final.cancelled_at is not None
    out, err = _exactly_once(client, final, 400)
    assert len(out) >= 20 and final.request_counts.completed == len(out)
    codes = Counter(e["error"]["code"] for e in err)
    assert codes["batch_cancelled"] == len(err) and len(err) > 0
    assert err[0]["response"] is None
    assert client.batches.cancel(b.id).status == "cancelled"


def test_cancel_right_after_create(make_server, slow_sim):
    srv = make_server(_slow_config(slow_sim)).start()
    client = srv.client()
    b = _create(client, 50)
    assert client.batches.cancel(b.id).status == "cancelling"
    final = wait_for_batch(client, b.id)
    assert final.status == "cancelled"
    if final.request_counts.total:  # it had reached in_progress before the cancel landed
        _exactly_once(client, final, 50)


def test_cancel_finished_batches_is_409(client):
    done = wait_for_batch(client, _create(client, 2, prefix="fin", model="lowtide-echo").id)
    with pytest.raises(ConflictError) as info:
        client.batches.cancel(done.id)
    assert "Cannot cancel a batch with status 'completed'" in info.value.message
    assert info.value.response.headers.get("x-should-retry") == "false"
    bad = client.files.create(file=("x.jsonl", io.BytesIO(b'{"broken": \n')), purpose="batch")
    failed = wait_for_batch(
        client,
        client.batches.create(
            input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert failed.status == "failed"
    with pytest.raises(ConflictError):
        client.batches.cancel(failed.id)


def test_idempotency_key_makes_a_retried_create_safe(client):
    """A client that retries a create after a lost response gets the first batch back."""
    f = client.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("i-0", "x")]))), purpose="batch"
    )
    key = {"Idempotency-Key": f"nightly-{time.time_ns()}"}
    args = {
        "input_file_id": f.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    first = client.batches.create(**args, extra_headers=key)
    again = client.batches.create(**args, extra_headers=key)
    assert again.id == first.id
    assert client.batches.create(**args).id != first.id  # no key: a new batch each time
    with pytest.raises(ConflictError) as info:
        client.batches.create(**{**args, "completion_window": "48h"}, extra_headers=key)
    assert info.value.code == "idempotency_key_reused" and first.id in info.value.message
    with pytest.raises(BadRequestError):
        client.batches.create(**args, extra_headers={"Idempotency-Key": "k" * 256})
    done = wait_for_batch(client, first.id)
    assert done.status == "completed"
    assert client.batches.create(**args, extra_headers=key).status == "completed"


def test_expiry_keeps_finished_lines(make_server, slow_sim):
    srv = make_server(_slow_config(slow_sim, concurrency=2)).start()
    client = srv.client()
    b = _create(client, 300, window="3s")
    assert b.expires_at - b.created_at == 3
    final = wait_for_batch(client, b.id, timeout=30)
    assert final.status == "expired" and final.expired_at is not None
    out, err = _exactly_once(client, final, 300)
    assert 0 < len(out) < 300
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert (
        err[0]["error"]["message"]
        == "This request could not be executed before the completion window expired."
    )
    assert final.request_counts.total == 300 and final.request_counts.completed == len(out)
    with pytest.raises(ConflictError):
        client.batches.cancel(final.id)


def test_crash_and_restart_resumes_exactly_once(make_server, slow_sim):
    srv = make_server(_slow_config(slow_sim, concurrency=8)).start()
    client = srv.client()
    b = _create(client, 600)
    _wait_progress(client, b.id, 150)
    srv.kill()  # SIGKILL mid-batch
    srv.start()
    client = srv.client()
    final = wait_for_batch(client, b.id, timeout=90)
    assert final.status == "completed", srv.log()
    out, err = _exactly_once(client, final, 600)
    assert len(out) == 600 and not err
    assert final.request_counts.completed == 600
    # Only lines in flight at the kill can have been sent twice.
    assert sim_stats(slow_sim)["max_per_body"] <= 2


def test_sigterm_hands_work_back_and_restart_finishes(make_server, slow_sim):
    srv = make_server(_slow_config(slow_sim, concurrency=8)).start()
    client = srv.client()
    b = _create(client, 500)
    _wait_progress(client, b.id, 100)
    started = time.monotonic()
    stop_process(srv.proc, signal.SIGTERM, timeout=30)
    assert srv.proc.returncode is not None and time.monotonic() - started < 20
    srv.start()
    final = wait_for_batch(srv.client(), b.id, timeout=90)
    out, err = _exactly_once(srv.client(), final, 500)
    assert final.status == "completed" and len(out) == 500


def test_transient_faults_lose_no_line(make_server):
    proc, url = start_sim(
        "--rate-429",
        "0.05",
        "--rate-500",
        "0.05",
        "--rate-timeout",
        "0.05",
        "--rate-drop",
        "0.05",
        "--hang-seconds",
        "3",
        "--seed",
        "7",
    )
    try:
        srv = make_server(make_config(url)).start()
        client = srv.client()
        final = wait_for_batch(client, _create(client, 400, prefix="flt").id, timeout=120)
        out, err = _exactly_once(client, final, 400, prefix="flt")
        assert final.status == "completed" and len(out) == 400, err[:3]
        stats = sim_stats(url)
        assert stats["by_status"].get("429", 0) > 0 and stats["by_status"].get("drop", 0) > 0
        assert stats["max_per_body"] <= 9  # 1 try + max_retries
    finally:
        stop_process(proc)


def test_partial_results_while_running(make_server, slow_sim):
    import httpx

    srv = make_server(_slow_config(slow_sim)).start()
    client = srv.client()
    b = _create(client, 300, prefix="pr")
    _wait_progress(client, b.id, 120)
    url = f"{srv.base_url}/batches/{b.id}/results"
    partial = [
        json.loads(x)
        for x in httpx.get(url, headers={"Authorization": "Bearer k"}).text.splitlines()
    ]
    ids = [line["custom_id"] for line in partial]
    assert 50 <= len(ids) < 300 and len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda c: int(c.split("-")[1]))  # input order
    assert all(line["response"]["status_code"] == 200 for line in partial)
    final = wait_for_batch(client, b.id)
    done = httpx.get(url + "?type=output", headers={"Authorization": "Bearer k"}).text
    assert done == client.files.content(final.output_file_id).text
    assert (
        httpx.get(
            url.replace(b.id, "batch_nope"), headers={"Authorization": "Bearer k"}
        ).status_code
        == 404
    )

    # Once the output file is deleted, its results are gone: 404, not the old lines or nothing.
    client.files.delete(final.output_file_id)
    gone = httpx.get(url + "?type=output", headers={"Authorization": "Bearer k"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
    assert httpx.get(url, headers={"Authorization": "Bearer k"}).status_code == 404


def test_no_line_starts_after_cancel(make_server, slow_sim):
    """Lines waiting for admission when the cancel lands never reach the upstream."""
    concurrency = 8
    srv = make_server(_slow_config(slow_sim, concurrency=concurrency)).start()
    client = srv.client()
    b = _create(client, 600, prefix="nc")
    _wait_progress(client, b.id, 40)
    client.batches.cancel(b.id)  # lines queued behind the window of 8 must never start
    sent_at_cancel = sim_stats(slow_sim)["requests"]
    final = wait_for_batch(client, b.id)
    assert final.status == "cancelled"
    # Only requests already on their way may still arrive: at most one window of them.
    print("DIFF", sim_stats(slow_sim)["requests"] - sent_at_cancel)
    assert sim_stats(slow_sim)["requests"] - sent_at_cancel <= concurrency
    out, err = _exactly_once(client, final, 600, prefix="nc")
    assert final.request_counts.completed == len(out) <= sent_at_cancel + concurrency
