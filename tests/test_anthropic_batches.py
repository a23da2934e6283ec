"""Anthropic's Message Batches API, driven by the official `anthropic` SDK, unchanged.

The same core runs these batches as OpenAI's: translation to chat for engines that speak Chat
Completions (the simulator, echo, the embedded model), pass-through for routes that speak
Anthropic's Messages API themselves (`api = "anthropic"`).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import anthropic
import httpx
import pytest
from support import LowtideServer, make_config

SLOW = """
[[models]]
name = "slow-echo"
engine = "echo"
latency_ms = 100
max_concurrency = 2
"""


def _client(server: LowtideServer, api_key: str = "sk-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.base_url.removesuffix("/v1"), api_key=api_key, max_retries=0, timeout=30
    )


def _request(custom_id: str, text: str, model: str = "sim-model", **params: object) -> dict:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": text}],
            **params,
        },
    }


def _wait_ended(client: anthropic.Anthropic, batch_id: str, total: int, timeout: float = 90):
    """Poll until the batch ends; every poll's counts add up to the batch's requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        counts = batch.request_counts
        assert (
            counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            == total
        ), counts
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"message batch {batch_id} still {batch.processing_status}")


@pytest.fixture(scope="module")
def aserver(sim_url, tmp_path_factory):
    srv = LowtideServer(
        tmp_path_factory.mktemp("anthropic") / "data", make_config(sim_url, SLOW)
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def aclient(aserver):
    return _client(aserver)


def test_create_poll_results_list_delete(aclient, aserver):
    requests = [_request(f"req-{i}", f"hello number {i}") for i in range(60)]
    requests += [
        _request("unknown-model", "hi", model="no-such-model"),
        _request(
            "image-block",
            "x",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "base64", "data": "AA"}}],
                }
            ],
        ),
        {"custom_id": "no-max-tokens", "params": {"model": "sim-model", "messages": []}},
    ]
    batch = aclient.messages.batches.create(requests=requests)
    assert batch.id.startswith("msgbatch_")
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.results_url is None
    assert batch.request_counts.processing == len(requests)
    assert batch.expires_at > batch.created_at

    ended = _wait_ended(aclient, batch.id, len(requests))
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.canceled, counts.expired) == (60, 3, 0, 0)
    assert counts.processing == 0
    assert ended.ended_at is not None and ended.ended_at >= ended.created_at
    assert ended.results_url == f"{aserver.base_url}/messages/batches/{batch.id}/results"

    results = list(aclient.messages.batches.results(batch.id))
    by_id = {r.custom_id: r.result for r in results}
    assert Counter(r.custom_id for r in results) == Counter(r["custom_id"] for r in requests)
    ok = by_id["req-7"]
    assert ok.type == "succeeded"
    assert ok.message.type == "message" and ok.message.role == "assistant"
    assert ok.message.content[0].type == "text" and ok.message.content[0].text
    assert ok.message.usage.input_tokens > 0 and ok.message.usage.output_tokens > 0
    assert ok.message.stop_reason in ("end_turn", "max_tokens")
    assert by_id["unknown-model"].type == "errored"
    assert by_id["unknown-model"].error.error.type == "not_found_error"
    assert "no-such-model" in by_id["unknown-model"].error.error.message
    assert by_id["image-block"].error.error.type == "invalid_request_error"
    assert "image" in by_id["image-block"].error.error.message
    assert by_id["no-max-tokens"].error.error.type == "invalid_request_error"
    assert "max_tokens" in by_id["no-max-tokens"].error.error.message

    # The raw stream: JSONL, no blank lines, Anthropic's content type.
    raw = httpx.get(ended.results_url, headers={"x-api-key": "sk-test"}, timeout=30)
    assert raw.headers["content-type"].startswith("application/x-jsonl")
    assert b"\n\n" not in raw.content and b"\r" not in raw.content
    assert len(raw.content.splitlines()) == len(requests)

    # The same batch through the OpenAI face: one core, one store.
    openai_view = aserver.client().batches.retrieve(batch.id)
    assert openai_view.endpoint == "/v1/messages"
    assert openai_view.request_counts.completed == 60

    listed = [b.id for b in aclient.messages.batches.list(limit=5)]
    assert batch.id in listed

    deleted = aclient.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError) as exc:
        aclient.messages.batches.retrieve(batch.id)
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == "not_found_error"
    assert batch.id not in [b.id for b in aclient.messages.batches.list(limit=100)]


def test_list_pages_both_ways(aclient):
    ids = [
        aclient.messages.batches.create(requests=[_request("a", "x", model="lowtide-echo")]).id
        for _ in range(5)
    ]
    newest_first = list(reversed(ids))
    page = aclient.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more and page.first_id == newest_first[0] and page.last_id == newest_first[1]
    older = aclient.messages.batches.list(limit=2, after_id=page.last_id)
    assert [b.id for b in older.data] == newest_first[2:4]
    newer = aclient.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in newer.data] == newest_first[1:3]
    assert newer.has_more  # newest_first[0] is before them
    seen = [b.id for b in aclient.messages.batches.list(limit=2)]  # auto-pagination
    assert seen[:5] == newest_first
    with pytest.raises(anthropic.BadRequestError):
        aclient.messages.batches.list(limit=0)


def test_cancel_then_delete(aclient):
    requests = [_request(f"c{i}", "slow", model="slow-echo") for i in range(200)]
    batch = aclient.messages.batches.create(requests=requests)
    with pytest.raises(anthropic.BadRequestError) as exc:
        aclient.messages.batches.delete(batch.id)  # still running
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    time.sleep(0.5)
    cancelling = aclient.messages.batches.cancel(batch.id)
    assert cancelling.processing_status in ("canceling", "ended")
    assert cancelling.cancel_initiated_at is not None
    ended = _wait_ended(aclient, batch.id, 200)
    counts = ended.request_counts
    assert counts.canceled > 0 and counts.succeeded > 0
    assert counts.succeeded + counts.errored + counts.canceled == 200
    results = list(aclient.messages.batches.results(batch.id))
    kinds = Counter(r.result.type for r in results)
    assert kinds["canceled"] == counts.canceled and kinds["succeeded"] == counts.succeeded
    assert len({r.custom_id for r in results}) == 200
    again = aclient.messages.batches.cancel(batch.id)  # an ended batch stays as it is
    assert again.processing_status == "ended"
    aclient.messages.batches.delete(batch.id)


def test_bad_creates_are_anthropic_errors(aclient, aserver):
    cases = [
        ([], "at least 1"),
        ([{"custom_id": "has space", "params": {}}], "requests.0.custom_id"),
        ([{"custom_id": "x" * 65, "params": {}}], "requests.0.custom_id"),
        ([_request("dup", "a"), _request("dup", "b")], "Duplicate custom_id"),
        ([{"custom_id": "p", "params": "text"}], "requests.0.params"),
        ([{"custom_id": "p"}], "requests.0.params"),
        ([{"custom_id": "p", "params": {}, "other": 1}], "requests.0.other"),
    ]
    for requests, expected in cases:
        with pytest.raises(anthropic.BadRequestError) as exc:
            aclient.messages.batches.create(requests=requests)
        assert exc.value.body["type"] == "error"
        assert exc.value.body["error"]["type"] == "invalid_request_error"
        assert expected in exc.value.body["error"]["message"], exc.value.body
    url = f"{aserver.base_url}/messages/batches"
    for body in (b"{not json", b'{"requests": [1, 2', b"[]", b'{"requests": "x"}'):
        response = httpx.post(url, content=body, headers={"x-api-key": "k"}, timeout=30)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.headers.get("request-id")
    with pytest.raises(anthropic.NotFoundError):
        aclient.messages.batches.retrieve("msgbatch_nope")
    with pytest.raises(anthropic.NotFoundError):
        list(aclient.messages.batches.results("msgbatch_nope"))
    # An OpenAI batch is not a message batch.
    response = httpx.get(f"{aserver.base_url}/messages/batches/batch_abc", timeout=30)
    assert response.status_code == 404 and response.json()["type"] == "error"
    response = httpx.post(f"{aserver.base_url}/messages", json={}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_limits_keys_and_projects(make_server, sim_url):
    config = make_config(
        sim_url,
        """
[message_batches]
max_requests = 50
max_bytes = 20000

[[auth.api_keys]]
key = "key-a"
project = "a"

[[auth.api_keys]]
key = "key-b"
project = "b"
""",
    )
    server = make_server(config).start()
    a, b = _client(server, "key-a"), _client(server, "key-b")
    with pytest.raises(anthropic.AuthenticationError) as exc:
        _client(server, "wrong").messages.batches.list()
    assert exc.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.APIStatusError) as too_many:
        a.messages.batches.create(requests=[_request(f"r{i}", "x") for i in range(51)])
    assert too_many.value.status_code == 413
    assert too_many.value.body["error"]["type"] == "request_too_large"
    with pytest.raises(anthropic.APIStatusError) as too_big:
        a.messages.batches.create(requests=[_request(f"r{i}", "x" * 1000) for i in range(30)])
    assert too_big.value.status_code == 413

    batch = a.messages.batches.create(requests=[_request("only", "hi", model="lowtide-echo")])
    _wait_ended(a, batch.id, 1)
    for call in (
        lambda: b.messages.batches.retrieve(batch.id),
        lambda: b.messages.batches.cancel(batch.id),
        lambda: b.messages.batches.delete(batch.id),
        lambda: list(b.messages.batches.results(batch.id)),
    ):
        with pytest.raises(anthropic.NotFoundError):
            call()
    assert b.messages.batches.list().data == []
    # b cannot fetch a's results by URL either.
    url = a.messages.batches.retrieve(batch.id).results_url
    assert httpx.get(url, headers={"x-api-key": "key-b"}, timeout=30).status_code == 404
    assert [r.custom_id for r in a.messages.batches.results(batch.id)] == ["only"]


def test_sigkill_mid_batch_loses_and_duplicates_nothing(make_server):
    config = make_config(None, SLOW.replace("latency_ms = 100", "latency_ms = 20"))
    server = make_server(config).start()
    client = _client(server)
    batch = client.messages.batches.create(
        requests=[_request(f"k{i}", f"line {i}", model="slow-echo") for i in range(400)]
    )
    deadline = time.monotonic() + 60
    while client.messages.batches.retrieve(batch.id).request_counts.succeeded < 60:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.kill()
    server.start()
    client = _client(server)
    ended = _wait_ended(client, batch.id, 400, timeout=120)
    assert ended.request_counts.succeeded == 400
    results = list(client.messages.batches.results(batch.id))
    assert Counter(r.custom_id for r in results) == Counter(f"k{i}" for i in range(400))
    assert all(r.result.type == "succeeded" for r in results)
    # echo answers with the prompt: each result is its own line's, never another's.
    assert all(r.result.message.content[0].text == f"echo: line {r.custom_id[1:]}" for r in results)


def test_embedded_model_answers_messages(make_server):
    server = make_server(make_config(None)).start(120)
    client = _client(server)
    params = {
        "model": "SmolLM2-135M-Instruct",
        "max_tokens": 12,
        "temperature": 0,
        "system": "You answer with one word.",
    }
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": "capital",
                "params": {
                    **params,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                },
            },
            {
                "custom_id": "blocks",
                "params": {
                    **params,
                    "stop_sequences": ["\n"],
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}
                    ],
                },
            },
        ]
    )
    ended = _wait_ended(client, batch.id, 2, timeout=300)
    assert ended.request_counts.succeeded == 2, list(client.messages.batches.results(batch.id))
    for r in client.messages.batches.results(batch.id):
        message = r.result.message
        assert message.model == "SmolLM2-135M-Instruct"
        assert message.content and message.content[0].text.strip()
        assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 12
        assert message.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
    usage = server.client().batches.retrieve(batch.id).usage
    assert usage.input_tokens > 10 and usage.output_tokens > 0


def test_results_lines_are_plain_json(aclient, aserver):
    batch = aclient.messages.batches.create(
        requests=[_request(f"j{i}", "ok", model="lowtide-echo") for i in range(3)]
    )
    ended = _wait_ended(aclient, batch.id, 3)
    raw = httpx.get(ended.results_url, timeout=30).content
    lines = [json.loads(x) for x in raw.decode().split("\n") if x]
    assert {line["result"]["type"] for line in lines} == {"succeeded"}
    assert {line["custom_id"] for line in lines} == {"j0", "j1", "j2"}


def test_anthropic_route_passes_requests_through(make_server):
    """A route with api = "anthropic" sends Messages requests as they are to an upstream that
    speaks Anthropic's API (the simulator), learns its limits from anthropic-ratelimit-*, and
    retries its transient failures."""
    from support import sim_stats, start_sim, stop_process

    proc, url = start_sim("--rpm", "6000")
    try:
        models = f"""
[[models]]
name = "claude-sim"
engine = "openai"
api = "anthropic"
base_url = "{url}"
api_key = "sk-upstream"
max_concurrency = 8
timeout = 5
max_retries = 5
"""
        server = make_server(make_config(None, models)).start()
        client = _client(server)
        requests = [_request(f"p{i}", f"pass {i}", model="claude-sim") for i in range(40)]
        requests[3]["params"]["sim_fail_first"] = 2  # two 5xx, then an answer
        requests[4]["params"]["stop_sequences"] = ["4"]
        batch = client.messages.batches.create(requests=requests)
        ended = _wait_ended(client, batch.id, 40)
        assert ended.request_counts.succeeded == 40, list(client.messages.batches.results(batch.id))
        by_id = {r.custom_id: r.result.message for r in client.messages.batches.results(batch.id)}
        assert by_id["p7"].content[0].text.endswith("pass 7")
        assert by_id["p4"].stop_reason == "stop_sequence" and by_id["p4"].stop_sequence == "4"
        stats = sim_stats(url)  # 40 answers, and the two failures retried
        assert stats["by_status"]["200"] == 40 and stats["requests"] == 42, stats
        usage = server.client().batches.retrieve(batch.id).usage
        assert usage.input_tokens > 0 and usage.output_tokens > 0
    finally:
        stop_process(proc)


def test_cancel_then_retry_resumes_a_message_batch(aclient, aserver):
    """Retry of the one core (the OpenAI face's /retry) works on message batches: the canceled
    requests run, the finished ones are kept, and the results name each request once."""
    requests = [_request(f"r{i}", f"resume {i}", model="slow-echo") for i in range(120)]
    batch = aclient.messages.batches.create(requests=requests)
    time.sleep(0.5)
    aclient.messages.batches.cancel(batch.id)
    first = _wait_ended(aclient, batch.id, 120).request_counts
    assert first.canceled > 0
    openai = aserver.client()
    resumed = openai.post(f"/batches/{batch.id}/retry", body={}, cast_to=dict)
    assert resumed["status"] == "in_progress"
    assert aclient.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    ended = _wait_ended(aclient, batch.id, 120)
    assert ended.request_counts.succeeded == 120
    results = list(aclient.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(120))
    assert all(
        r.result.message.content[0].text == f"echo: resume {r.custom_id[1:]}" for r in results
    )


def test_dashboard_shows_message_batches(aclient, aserver):
    batch = aclient.messages.batches.create(requests=[_request("d0", "dash", model="lowtide-echo")])
    _wait_ended(aclient, batch.id, 1)
    root = aserver.base_url.removesuffix("/v1")
    listing = httpx.get(f"{root}/ui/batches", timeout=30)
    assert listing.status_code == 200 and batch.id in listing.text
    page = httpx.get(f"{root}/ui/batches/{batch.id}", timeout=30)
    assert page.status_code == 200 and "/v1/messages" in page.text
