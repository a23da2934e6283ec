"""Every validation failure a user can produce, through the SDK: the batch fails with line errors."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from openai import BadRequestError
from support import chat_line, jsonl, make_config, wait_for_batch


def _run(client, raw: bytes, endpoint: str = "/v1/chat/completions"):
    f = client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    return wait_for_batch(client, b.id)


def _errors(batch) -> list[tuple[str, int | None, str | None]]:
    assert batch.status == "failed", batch
    assert (
        batch.failed_at is not None and batch.output_file_id is None and batch.error_file_id is None
    )
    return [(e.code, e.line, e.param) for e in batch.errors.data]


GOOD = chat_line("good", "fine")


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (b'{"custom_id": "x", "method": "POST", ', ("invalid_json_line", 2, None)),
        (b'["not", "an", "object"]', ("invalid_json_line", 2, None)),
        (
            jsonl([{"method": "POST", "url": "/v1/chat/completions", "body": {}}]),
            ("missing_required_parameter", 2, "custom_id"),
        ),
        (
            jsonl([{"custom_id": "x", "url": "/v1/chat/completions", "body": {}}]),
            ("missing_required_parameter", 2, "method"),
        ),
        (
            jsonl([{"custom_id": "x", "method": "POST", "body": {}}]),
            ("missing_required_parameter", 2, "url"),
        ),
        (
            jsonl([{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}]),
            ("missing_required_parameter", 2, "body"),
        ),
        (jsonl([chat_line("x", "y") | {"method": "GET"}]), ("invalid_method", 2, "method")),
        (jsonl([chat_line("x", "y") | {"url": "/v1/embeddings"}]), ("invalid_url", 2, "url")),
        (jsonl([chat_line("x", "y", stream=True)]), ("streaming_unsupported", 2, "body.stream")),
        (
            jsonl(
                [
                    {
                        "custom_id": "x",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"messages": []},
                    }
                ]
            ),
            ("invalid_request", 2, "body.model"),
        ),
        (jsonl([chat_line("x", "y", model="no-such-model")]), ("model_not_found", 2, "body.model")),
        (
            jsonl(
                [
                    {
                        "custom_id": "x",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {"model": "sim-model"},
                    }
                ]
            ),
            ("invalid_request", 2, "body.messages"),
        ),
        (jsonl([chat_line("good", "again")]), ("duplicate_custom_id", 2, "custom_id")),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-custom-id",
        "no-method",
        "no-url",
        "no-body",
        "get",
        "url-mismatch",
        "stream",
        "no-model",
        "unknown-model",
        "no-messages",
        "duplicate",
    ],
)
def test_bad_line_fails_batch(client, bad_line, expected):
    raw = jsonl([GOOD]) + bad_line.rstrip(b"\n") + b"\n" + jsonl([chat_line("after", "z")])
    assert _errors(_run(client, raw)) == [expected]


def test_many_errors_reported_per_line_in_order(client):
    lines = [GOOD, chat_line("a", "x", stream=True), chat_line("b", "x", model="nope")]
    raw = jsonl(lines) + b"\n   \n" + b"{oops\n" + jsonl([chat_line("a", "dup")])
    errors = _errors(_run(client, raw))
    assert errors == [
        ("streaming_unsupported", 2, "body.stream"),
        ("model_not_found", 3, "body.model"),
        ("invalid_json_line", 6, None),
        ("duplicate_custom_id", 7, "custom_id"),
    ]
    failed = _run(client, raw)
    assert "nope" in failed.errors.data[1].message


def test_blank_lines_and_crlf_are_tolerated(client):
    raw = b"\r\n".join(jsonl([chat_line(f"c{i}", "x")]).rstrip() for i in range(3)) + b"\r\n\r\n"
    b = _run(client, raw)
    assert b.status == "completed" and b.request_counts.completed == 3


def test_several_models_in_one_file_are_allowed(client):
    b = _run(client, jsonl([chat_line("m1", "x"), chat_line("m2", "y", model="lowtide-echo")]))
    assert b.status == "completed" and b.request_counts.completed == 2


def test_missing_input_file_fails_batch(client):
    b = client.batches.create(
        input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
    )
    b = wait_for_batch(client, b.id)
    assert _errors(b) == [("invalid_request", None, "file_id")]


def test_empty_and_non_jsonl_files_are_rejected_at_upload(client):
    for raw in (b"", b"\n\n  \n", b"hello world\n"):
        with pytest.raises(BadRequestError) as info:
            client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
        assert "jsonl" in info.value.message.lower()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint"),
        ({"completion_window": "48d"}, "completion_window"),
        ({"completion_window": ""}, "completion_window"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"completion_window": "\u0662\u0664h"}, "completion_window"),  # Arabic-Indic "24"
        ({"completion_window": " 24h "}, "completion_window"),
        ({"completion_window": "24h\n"}, "completion_window"),
        ({"completion_window": "24H"}, "completion_window"),
        ({"completion_window": "+24h"}, "completion_window"),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": " 3600 "}},
            "output_expires_after.seconds",
        ),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": 3600.5}},
            "output_expires_after.seconds",
        ),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": True}},
            "output_expires_after.seconds",
        ),
        ({"metadata": {"tags": ["a"]}}, "metadata.tags"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ],
)
def test_create_time_errors(client, kwargs, param):
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([GOOD]))), purpose="batch")
    args = {
        "input_file_id": f.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        **kwargs,
    }
    with pytest.raises(BadRequestError) as info:
        client.batches.create(**args)
    assert info.value.param == param
    assert (
        info.value.body["type"] == "invalid_request_error"
        if isinstance(info.value.body, dict)
        else True
    )


def test_missing_required_create_fields(server):
    import httpx

    r = httpx.post(
        server.base_url + "/batches",
        json={"endpoint": "/v1/chat/completions"},
        headers={"Authorization": "Bearer k"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] in ("input_file_id", "completion_window")
    r = httpx.post(
        server.base_url + "/batches",
        content=b"{not json",
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()


def test_too_many_lines_and_size_limit(make_server, sim_url):
    srv = make_server(make_config(sim_url, "max_lines = 3\nmax_file_bytes = 2000")).start()
    client = srv.client()
    b = _run(client, jsonl([chat_line(f"t{i}", "x") for i in range(4)]))
    assert _errors(b) == [("too_many_tasks", None, None)]
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as info:
        client.files.create(
            file=(
                "big.jsonl",
                io.BytesIO(jsonl([chat_line(f"t{i}", "x" * 100) for i in range(20)])),
            ),
            purpose="batch",
        )
    assert info.value.status_code == 413
    assert client.files.list().data == [] or all(
        f.filename != "big.jsonl" for f in client.files.list()
    )


def test_a_byte_order_mark_is_skipped(client):
    raw = b"\xef\xbb\xbf" + jsonl([chat_line("bom-1", "x"), chat_line("bom-2", "y")])
    b = _run(client, raw)
    assert b.status == "completed" and b.request_counts.completed == 2
    out = client.files.content(b.output_file_id).text.splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == ["bom-1", "bom-2"]


def test_upload_rejection_names_the_line(client):
    with pytest.raises(BadRequestError) as info:
        client.files.create(file=("in.jsonl", io.BytesIO(b"\n\n  \nnot json\n")), purpose="batch")
    assert "line 4" in info.value.message


def test_a_model_whose_route_cannot_serve_the_endpoint_fails_validation(client):
    line = {
        "custom_id": "e1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "SmolLM2-135M-Instruct", "input": "hello"},
    }
    b = _run(client, jsonl([line]), endpoint="/v1/embeddings")
    assert _errors(b) == [("unsupported_endpoint", 1, "body.model")]
    assert "/v1/chat/completions" in b.errors.data[0].message


@pytest.mark.parametrize("limit", [" 5", "5 ", "\u0665", "5.0", "+5"])
def test_numbers_in_query_strings_are_strict(server, limit):
    r = httpx.get(
        server.base_url + "/batches", params={"limit": limit}, headers={"Authorization": "Bearer k"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
