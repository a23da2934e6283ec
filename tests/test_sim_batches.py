"""The simulator's Files + Batch API, driven through the official openai SDK like a provider."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import openai
import pytest
from support import chat_line, jsonl

from lowtide_sim.launch import Simulator, start_simulator

FAST = ("--batch-turnaround-seconds", "0.05", "--batch-cancel-seconds", "0.05")


@pytest.fixture
def start_sim():
    """Factory: ``start_sim(*flags)`` -> (Simulator, OpenAI client); stopped at teardown."""
    sims: list[Simulator] = []

    def start(*flags: str) -> tuple[Simulator, openai.OpenAI]:
        sims.append(start_simulator(*FAST, *flags))
        client = openai.OpenAI(base_url=sims[-1].url, api_key="sk-sim", max_retries=0, timeout=10)
        return sims[-1], client

    yield start
    for sim in sims:
        sim.stop()


@pytest.fixture(scope="module")
def shared():
    """One default simulator shared by tests that don't care about flags or counters."""
    with start_simulator(*FAST) as sim:
        yield openai.OpenAI(base_url=sim.url, api_key="sk-sim", max_retries=0, timeout=10)


def _lines(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [chat_line(f"{prefix}{i}", f"hello {i}") for i in range(n)]


def _submit(client: openai.OpenAI, lines: list[dict], **kw: Any):
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.02)
    raise TimeoutError(f"{batch_id} still {batch.status}")


def _read(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_normal_batch_completes(shared):
    client = shared
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(_lines(5)))), purpose="batch")
    assert f.id.startswith("file-") and f.object == "file" and f.status == "processed"
    assert f.filename == "in.jsonl" and f.purpose == "batch" and f.bytes == len(jsonl(_lines(5)))
    assert client.files.retrieve(f.id).bytes == f.bytes
    assert client.files.content(f.id).content == jsonl(_lines(5))

    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.id.startswith("batch_") and batch.status == "validating"
    assert batch.expires_at == batch.created_at + 86400 and batch.errors is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts.total == 0

    done = _wait(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    out = _read(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(5)]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        assert o["response"]["request_id"].startswith("req_")
        body = o["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == f"echo: hello {o['custom_id'][1:]}"
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output"


def test_metadata_round_trips_and_bad_requests(shared):
    client = shared
    batch = _submit(client, _lines(1), metadata={"job": "nightly", "team": "x"})
    assert batch.metadata == {"job": "nightly", "team": "x"}
    assert client.batches.retrieve(batch.id).metadata == {"job": "nightly", "team": "x"}

    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(input_file_id="x", endpoint="/v1/nope", completion_window="24h")
    assert err.value.code == "invalid_value"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    _wait(client, batch.id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_rate_500_puts_every_line_in_error_file(start_sim):
    _, client = start_sim("--batch-rate-500", "1")
    done = _wait(client, _submit(client, _lines(4)).id)
    assert done.status == "completed" and done.output_file_id is None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 4)
    errors = _read(client, done.error_file_id)
    assert len(errors) == 4
    for e in errors:
        assert e["response"]["status_code"] == 500 and e["error"] is None
        assert e["response"]["body"]["error"]["type"] == "server_error"


def test_rate_expired(start_sim):
    sim, client = start_sim("--seed", "3")
    sim.configure(batch_rate_expired=0.5)  # runtime-changeable like the other rates
    done = _wait(client, _submit(client, _lines(20)).id)
    assert done.status == "expired" and done.expired_at and done.completed_at is None
    out, errors = _read(client, done.output_file_id), _read(client, done.error_file_id)
    assert errors and out and len(out) + len(errors) == 20
    assert done.request_counts.completed == len(out)
    for e in errors:
        assert e["response"] is None
        assert e["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }


def test_token_limit_exceeded(start_sim):
    # Each line: 2 prompt tokens + 10 max_tokens = 12; three lines = 36.
    _, client = start_sim("--batch-token-limit", "50", "--batch-turnaround-seconds", "0.3")
    lines = [chat_line(f"t{i}", "hello there", max_tokens=10) for i in range(3)]
    first = _submit(client, lines)
    second = _submit(client, lines)  # 36 + 36 > 50 while the first is still enqueued
    assert second.status == "validating"  # created; the failure shows after validating
    failed = _wait(client, second.id)
    assert failed.status == "failed" and failed.failed_at
    assert failed.errors.data[0].code == "token_limit_exceeded"
    assert failed.output_file_id is None and failed.error_file_id is None
    assert _wait(client, first.id).status == "completed"
    assert _wait(client, _submit(client, lines).id).status == "completed"  # room again


def test_batch_max_lines(start_sim):
    _, client = start_sim("--batch-max-lines", "3")
    assert _wait(client, _submit(client, _lines(3)).id).status == "completed"
    failed = _wait(client, _submit(client, _lines(4)).id)
    assert failed.status == "failed"
    error = failed.errors.data[0]
    assert error.code == "invalid_request" and "at most 3" in error.message
    assert error.line is None and error.param is None


def test_cancel_keeps_answered_lines(start_sim):
    _, client = start_sim("--batch-lines-per-second", "20")
    batch = _submit(client, _lines(40))
    deadline = time.monotonic() + 5
    while client.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert client.batches.cancel(batch.id).status == "cancelling"  # idempotent
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    out, errors = _read(client, done.output_file_id), _read(client, done.error_file_id)
    assert len(out) >= 3 and errors and len(out) + len(errors) == 40
    assert done.request_counts.completed == len(out)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)


def test_list_pagination_with_after(start_sim):
    _, client = start_sim()
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(_lines(1)))), purpose="batch")
    ids = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    raw = client.batches.with_raw_response.list(limit=2, after=ids[3]).parse()
    assert [b.id for b in raw.data] == [ids[2], ids[1]] and raw.has_more
    assert [b.id for b in client.batches.list(limit=2, after=ids[1]).data] == [ids[0]]
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-paging
    assert len(client.batches.list().data) == 5  # default limit 20


def test_counters_and_delete(start_sim):
    sim, client = start_sim("--batch-turnaround-seconds", "0.5")  # time to cancel the second
    done = _wait(client, _submit(client, _lines(3)).id)
    other = _submit(client, _lines(2))
    client.batches.cancel(other.id)
    _wait(client, other.id)
    stats = sim.stats()
    # Input files 2, output files 1 (the cancelled batch's lines all went to an error file: 1).
    assert (stats["batches_created"], stats["batches_cancelled"], stats["batch_lines"]) == (2, 1, 5)
    assert (stats["files_created"], stats["files_live"], stats["files_deleted"]) == (4, 4, 0)

    deleted = client.files.delete(done.output_file_id)
    assert (deleted.id, deleted.object, deleted.deleted) == (done.output_file_id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.content(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(done.output_file_id)

    sim.reset()
    stats = sim.stats()
    assert (stats["batches_created"], stats["files_deleted"]) == (0, 0)
    assert stats["files_live"] == 3  # a gauge: the files are still stored


def test_drop_before_or_after_the_action(start_sim):
    sim, client = start_sim("--seed", "5", "--batch-rate-drop", "1")
    for _ in range(8):
        with pytest.raises(openai.APIConnectionError):
            client.files.create(file=("in.jsonl", io.BytesIO(jsonl(_lines(1)))), purpose="batch")
    stats = sim.stats()
    assert stats["batch_drops"] == 8
    assert 0 < stats["files_created"] < 8  # some stored before the drop, some not
    sim.configure(batch_rate_drop=0)
    assert len(client.files.list().data) == stats["files_live"] == stats["files_created"]


def test_require_key(start_sim):
    _, client = start_sim("--require-key", "sekret")
    with pytest.raises(openai.AuthenticationError):
        client.batches.list()
    good = client.with_options(api_key="sekret")
    assert good.batches.list().data == []
