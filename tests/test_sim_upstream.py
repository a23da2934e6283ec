"""Tests for the simulated upstream, run as a real subprocess like benchmarks do."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import support

SRC = Path(__file__).resolve().parents[1] / "src"
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello there"}]}


def _start(*flags: str) -> tuple[subprocess.Popen, str]:
    return support.start_sim(*flags)


def _stop(proc: subprocess.Popen) -> None:
    support.stop_process(proc)


@pytest.fixture
def start_sim():
    """Factory: ``start_sim("--rate-429", "1")`` -> base URL; killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> str:
        proc, url = _start(*flags)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture(scope="module")
def sim_url():
    """One default simulator shared by tests that don't care about flags."""
    proc, url = _start()
    yield url
    _stop(proc)


def _root(url: str) -> str:
    return url.removesuffix("/v1")


async def _call(
    method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 5
) -> tuple[int, Mapping[str, str], Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
        s.request(method, url, json=body, headers=headers) as resp,
    ):
        return resp.status, resp.headers.copy(), await resp.json()


def call(method: str, url: str, body: Any = None, **kw: Any):
    return asyncio.run(_call(method, url, body, **kw))


def test_ready_line_and_chat_completion(sim_url):
    assert sim_url.startswith("http://127.0.0.1:") and sim_url.endswith("/v1")
    assert int(sim_url.split(":")[2].split("/")[0]) > 0

    status, headers, body = call("POST", f"{sim_url}/chat/completions", CHAT)
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "sim-model"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "echo: hello there",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_openai_sdk_parses_all_endpoints(sim_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=sim_url, api_key="anything", max_retries=0)

    raw = client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse().choices[0].message.content == "echo: hello there"

    text = client.completions.create(model="m", prompt="one two")
    assert text.choices[0].text == "echo: one two"
    assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens

    resp = client.responses.create(model="r", input="say hi")
    assert resp.output_text == "echo: say hi"
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens

    # The SDK asks for base64 embeddings by default and decodes them itself.
    emb = client.embeddings.create(model="e", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [8, 8]

    assert [m.id for m in client.models.list()] == ["sim-model"]


def test_embeddings_list_input_is_deterministic(sim_url):
    req = {"model": "emb", "input": ["alpha", "beta gamma", "alpha"]}
    status, _, body = call("POST", f"{sim_url}/embeddings", req)
    assert status == 200
    assert body["object"] == "list" and body["model"] == "emb"
    vecs = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(v) == 8 for v in vecs)
    assert vecs[0] == vecs[2] != vecs[1]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-9
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}

    _, _, again = call("POST", f"{sim_url}/embeddings", {**req, "dimensions": 3})
    assert len(again["data"][0]["embedding"]) == 3

    status, _, body = call("POST", f"{sim_url}/embeddings", {"model": "e", "input": [1.5]})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_deterministic_faults(sim_url):
    status, headers, body = call(
        "POST", f"{sim_url}/chat/completions", {**CHAT, "model": "sim-missing"}
    )
    assert status == 404
    assert headers["x-request-id"].startswith("req_")
    assert body["error"]["code"] == "model_not_found"
    assert set(body["error"]) == {"message", "type", "param", "code"}

    for _ in range(2):  # every time, not by chance
        status, _, body = call("POST", f"{sim_url}/chat/completions", {**CHAT, "sim_fault": 400})
        assert status == 400
        assert body["error"]["type"] == "invalid_request_error"


def test_fail_first_then_succeed(sim_url):
    req = {**CHAT, "sim_fail_first": 2, "sim_fault": 503}
    statuses = [call("POST", f"{sim_url}/chat/completions", req)[0] for _ in range(3)]
    assert statuses == [503, 503, 200]


def test_rate_429_sends_retry_after(start_sim):
    url = start_sim("--rate-429", "1", "--retry-after", "0.25")
    status, headers, body = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 429
    assert headers["Retry-After"] == "0.25"
    assert headers["retry-after-ms"] == "250"
    assert body["error"]["type"] == "rate_limit_exceeded"


def test_rate_drop_closes_connection(start_sim):
    url = start_sim("--rate-drop", "1")
    with pytest.raises(aiohttp.ClientConnectionError):
        call("POST", f"{url}/chat/completions", CHAT)
    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert stats["by_status"] == {"drop": 1}


def test_rate_timeout_hangs(start_sim):
    url = start_sim("--rate-timeout", "1", "--hang-seconds", "5")
    with pytest.raises(asyncio.TimeoutError):
        call("POST", f"{url}/chat/completions", CHAT, timeout=0.3)
    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert stats["by_status"] == {"timeout": 1}  # counted while still hanging


def test_require_key(start_sim):
    url = start_sim("--require-key", "sekret")
    status, _, body = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    ok = {"Authorization": "Bearer sekret"}
    assert call("POST", f"{url}/chat/completions", CHAT, headers=ok)[0] == 200


def test_stats_count_duplicate_bodies(start_sim):
    url = start_sim()
    for body in (CHAT, CHAT, {**CHAT, "model": "other"}):
        call("POST", f"{url}/chat/completions", body)
    call("POST", f"{url}/chat/completions", {**CHAT, "sim_fault": 400})

    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 3, "400": 1}
    assert stats["distinct_bodies"] == 3
    assert stats["max_per_body"] == 2
    assert stats["bodies_over"]["1"] == 1

    call("POST", f"{_root(url)}/sim/reset")
    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert (stats["requests"], stats["distinct_bodies"], stats["max_per_body"]) == (0, 0, 0)


def test_runtime_config_changes_rates(start_sim):
    url = start_sim("--seed", "1")
    assert call("POST", f"{url}/chat/completions", CHAT)[0] == 200

    status, _, cfg = call("POST", f"{_root(url)}/sim/config", {"rate_500": 1})
    assert status == 200 and cfg["rate_500"] == 1.0
    assert call("POST", f"{url}/chat/completions", CHAT)[0] in (500, 502, 503)

    call("POST", f"{_root(url)}/sim/config", {"rate_500": 0})
    assert call("POST", f"{url}/chat/completions", CHAT)[0] == 200

    assert call("POST", f"{_root(url)}/sim/config", {"rate_500": 2})[0] == 400
    assert call("POST", f"{_root(url)}/sim/config", {"port": 1})[0] == 400
