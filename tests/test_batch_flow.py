"""The quick-start flow, end to end, with the official openai SDK against a real server."""

from __future__ import annotations

import io
import json

import pytest
from support import chat_line, jsonl, make_config, sim_stats, wait_for_batch


def _upload(client, lines: list[dict], name: str = "requests.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")


def _read_lines(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    assert "\n\n" not in text and not text.startswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_quick_start_chat_batch(client, sim_url):
    lines = [chat_line(f"req-{i}", f"question number {i}") for i in range(120)]
    f = _upload(client, lines)
    assert (
        f.purpose == "batch"
        and f.bytes > 0
        and f.status == "processed"
        and f.filename == "requests.jsonl"
    )
    assert f.expires_at is not None and f.expires_at - f.created_at == 30 * 86400

    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "tickets", "run": "1"},
    )
    assert b.status == "validating"
    assert b.expires_at == b.created_at + 86400
    assert b.request_counts.total == 0 and b.output_file_id is None and b.errors is None
    assert b.metadata == {"project": "tickets", "run": "1"}

    b = wait_for_batch(client, b.id)
    assert b.status == "completed", b
    assert (
        b.request_counts.total == 120
        and b.request_counts.completed == 120
        and b.request_counts.failed == 0
    )
    for stamp in (b.in_progress_at, b.finalizing_at, b.completed_at):
        assert stamp is not None and stamp >= b.created_at
    assert b.failed_at is None and b.cancelled_at is None and b.expired_at is None
    assert b.error_file_id is None
    assert b.model == "sim-model"

    out = _read_lines(client, b.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(120)]  # input order
    first = out[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"].startswith("req_")
    assert (
        first["response"]["body"]["choices"][0]["message"]["content"] == "echo: question number 0"
    )

    expected_in = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)
    expected_out = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    assert b.usage.input_tokens == expected_in and b.usage.output_tokens == expected_out
    assert b.usage.total_tokens == expected_in + expected_out

    meta = client.files.retrieve(b.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(
        client.files.content(b.output_file_id).content
    )


@pytest.mark.parametrize(
    ("endpoint", "body", "check"),
    [
        (
            "/v1/completions",
            {"prompt": "once upon a time"},
            lambda body: body["choices"][0]["text"],
        ),
        ("/v1/embeddings", {"input": ["alpha", "beta"]}, lambda body: len(body["data"]) == 2),
        ("/v1/responses", {"input": "hello"}, lambda body: body["output"]),
    ],
)
def test_other_endpoints(client, endpoint, body, check):
    lines = [
        {
            "custom_id": f"x{i}",
            "method": "POST",
            "url": endpoint,
            "body": {"model": "sim-model", **body},
        }
        for i in range(5)
    ]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id, endpoint=endpoint, completion_window="24h"
    )
    b = wait_for_batch(client, b.id)
    assert b.status == "completed" and b.request_counts.completed == 5
    out = _read_lines(client, b.output_file_id)
    assert all(check(o["response"]["body"]) for o in out)
    assert b.usage.input_tokens > 0


def test_http_errors_go_to_the_error_file_with_both_shapes(client):
    lines = [
        chat_line("ok-1", "fine"),
        chat_line("bad-1", "rejected", sim_fault=400),
        chat_line("ok-2", "fine too"),
        chat_line("gone-1", "unknown model", model="sim-model")
        | {"body": {"model": "sim-model", "messages": [], "sim_fault": 404}},
    ]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    b = wait_for_batch(client, b.id)
    assert b.status == "completed"
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 2)
    out = _read_lines(client, b.output_file_id)
    errs = _read_lines(client, b.error_file_id)
    assert [o["custom_id"] for o in out] == ["ok-1", "ok-2"]
    assert [e["custom_id"] for e in errs] == ["bad-1", "gone-1"]
    assert errs[0]["response"]["status_code"] == 400
    assert errs[0]["response"]["body"]["error"]["code"] == "sim_fault"
    assert errs[0]["error"]["code"] == "sim_fault" and errs[0]["error"]["message"]


def test_all_failed_batch_has_null_output_file(client):
    lines = [chat_line(f"bad-{i}", "x", sim_fault=422) for i in range(3)]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    b = wait_for_batch(client, b.id)
    assert b.status == "completed"
    assert b.output_file_id is None and b.error_file_id is not None
    assert b.request_counts.failed == 3


def test_retryable_failures_are_retried_until_success(client, sim_url):
    lines = [chat_line(f"flaky-{i}", f"try {i}", sim_fail_first=2, sim_fault=503) for i in range(5)]
    lines += [
        chat_line(f"ratelimited-{i}", f"try {i}", sim_fail_first=1, sim_fault=429) for i in range(5)
    ]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    b = wait_for_batch(client, b.id)
    assert b.status == "completed" and b.request_counts.completed == 10, _read_lines(
        client, b.error_file_id
    )


def test_list_batches_pages_newest_first(client):
    f = _upload(client, [chat_line("one", "x", model="lowtide-echo")])
    ids = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(5)
    ]
    first_page = client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == ids[::-1][:2] and first_page.has_more
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK follows has_more + after
    assert seen[:5] == ids[::-1]
    assert len(seen) == len(set(seen))
    for batch_id in ids:
        wait_for_batch(client, batch_id)


def test_unknown_batch_is_404(client):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as info:
        client.batches.retrieve("batch_doesnotexist")
    assert "No batch found" in info.value.message
    with pytest.raises(NotFoundError):
        client.batches.cancel("batch_doesnotexist")


def test_openapi_and_health(server):
    import httpx

    root = server.base_url.removesuffix("/v1")
    spec = httpx.get(root + "/openapi.json").json()
    assert "/v1/batches" in spec["paths"] and "/v1/files/{file_id}/content" in spec["paths"]
    assert httpx.get(root + "/healthz").json()["status"] == "ok"


def test_sim_saw_each_line_once_without_faults(sim_url, client):
    before = sim_stats(sim_url)["max_per_body"]
    lines = [chat_line(f"unique-{i}", f"unique body {i} for counting") for i in range(30)]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for_batch(client, b.id)
    assert sim_stats(sim_url)["max_per_body"] == max(before, 1)


def test_a_route_on_pyreqwest_runs_a_batch_like_aiohttp(make_server, sim_url):
    """`http_client = "pyreqwest"`: the same batch, answers, retries and error lines as the
    default client (the SDK sees no difference)."""
    models = f"""
[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim_url}"
http_client = "pyreqwest"
max_concurrency = 16
timeout = 2
max_retries = 8
"""
    client = make_server(make_config(models=models)).start().client()
    lines = [chat_line(f"req-{i}", f"question {i}") for i in range(60)]
    lines += [chat_line(f"flaky-{i}", "x", sim_fail_first=2, sim_fault=503) for i in range(3)]
    lines += [chat_line(f"limited-{i}", "x", sim_fail_first=1, sim_fault=429) for i in range(3)]
    lines += [chat_line("gone", "x", sim_fault=404)]
    b = client.batches.create(
        input_file_id=_upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    b = wait_for_batch(client, b.id)
    assert b.status == "completed", b
    assert b.request_counts.completed == 66 and b.request_counts.failed == 1
    out = _read_lines(client, b.output_file_id)
    assert [o["custom_id"] for o in out] == [line["custom_id"] for line in lines[:-1]]
    assert all(o["response"]["request_id"].startswith("req_") for o in out)
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: question 0"
    [gone] = _read_lines(client, b.error_file_id)
    assert gone["custom_id"] == "gone" and gone["response"]["status_code"] == 404
