"""Tests for the simulated upstream, run as a real subprocess like benchmarks do."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lowtide.admission.headers import parse_reset
from lowtide_sim.config import SimConfig
from lowtide_sim.faults import delay_ms
from lowtide_sim.interactive import run_interactive
from lowtide_sim.launch import Simulator, start_simulator
from lowtide_sim.limits import format_duration

SRC = Path(__file__).resolve().parents[1] / "src"
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def start_sim():
    """Factory: ``start_sim("--rate-429", "1")`` -> base URL; stopped at teardown."""
    sims: list[Simulator] = []

    def start(*flags: str) -> str:
        sims.append(start_simulator(*flags))
        return sims[-1].url

    yield start
    for sim in sims:
        sim.stop()


@pytest.fixture(scope="module")
def sim_url():
    """One default simulator shared by tests that don't care about flags."""
    with start_simulator() as sim:
        yield sim.url


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


# ---------------------------------------------------------------- provider rate limits


def _chat_n(n: int, **extra: Any) -> dict[str, Any]:
    return {**CHAT, "max_tokens": n, **extra}


def test_rpm_limit_answers_429_with_retry_after_and_headers(start_sim):
    url = start_sim("--rpm", "3")
    key = {"Authorization": "Bearer alice"}
    remaining = []
    for _ in range(3):
        status, headers, _ = call("POST", f"{url}/chat/completions", CHAT, headers=key)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-limit-tokens" not in headers  # no --tpm
        remaining.append(headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    assert parse_reset(headers["x-ratelimit-reset-requests"]) == pytest.approx(60, abs=1)

    status, headers, body = call("POST", f"{url}/chat/completions", CHAT, headers=key)
    assert status == 429
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "requests per min" in body["error"]["message"]
    assert headers["retry-after"] == "20"  # one request refills in 60/3 s, rounded up
    assert 19_000 < int(headers["retry-after-ms"]) <= 20_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert parse_reset(headers["x-ratelimit-reset-requests"]) is not None

    # Limits are per key: another key (or none) still has its full minute.
    status, headers, _ = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "2"

    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert stats["rate_limited"] == 1
    assert stats["by_status"] == {"200": 4, "429": 1}

    call("POST", f"{_root(url)}/sim/reset")  # refills every bucket
    assert call("POST", f"{url}/chat/completions", CHAT, headers=key)[0] == 200


def test_no_ratelimit_headers_still_sends_retry_after(start_sim):
    url = start_sim("--rpm", "1", "--tpm", "1000", "--no-ratelimit-headers")
    status, headers, _ = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 200
    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
    status, headers, body = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 429 and body["error"]["type"] == "requests"
    assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
    assert headers["retry-after"] == "60" and int(headers["retry-after-ms"]) > 59_000


def test_tpm_charges_prompt_plus_max_tokens(start_sim):
    url = start_sim("--tpm", "100")
    # "hello there" is 2 prompt tokens; the charge is prompt + max_tokens.
    status, headers, _ = call("POST", f"{url}/chat/completions", _chat_n(40))
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "58"
    assert "x-ratelimit-limit-requests" not in headers  # no --rpm
    body = {**CHAT, "max_completion_tokens": 30, "max_tokens": 5}  # the newer field wins
    _, headers, _ = call("POST", f"{url}/chat/completions", body)
    assert headers["x-ratelimit-remaining-tokens"] == "26"
    _, headers, _ = call("POST", f"{url}/chat/completions", _chat_n(20))
    assert headers["x-ratelimit-remaining-tokens"] == "4"
    # No budget given: 2 + 16 tokens are charged, more than the 4 left.
    status, headers, body = call("POST", f"{url}/chat/completions", CHAT)
    assert status == 429
    assert body["error"]["type"] == "tokens" and "tokens per min" in body["error"]["message"]
    # 14 more tokens at 100/60 per second: about 8.4 s.
    assert headers["retry-after"] == "9"
    assert 8_000 < int(headers["retry-after-ms"]) <= 8_400
    # More than a whole minute's worth can never fit.
    status, _, body = call("POST", f"{url}/chat/completions", _chat_n(500))
    assert status == 429 and "too large" in body["error"]["message"]


def test_format_duration_matches_openai():
    assert [format_duration(s) for s in (0, 0.02, 1, 90.5, 360, 3723.25)] == [
        "0s",
        "20ms",
        "1s",
        "1m30.5s",
        "6m0s",
        "1h2m3.25s",
    ]
    assert format_duration(0.0001) == "1ms"  # a positive wait never reads as 0


# ---------------------------------------------------------------- engine capacity


async def _timed_chats(url: str, bodies: list[dict]) -> list[tuple[float, dict]]:
    """Send bodies concurrently; (seconds until each answer, body) in send order."""
    async with aiohttp.ClientSession() as s:

        async def one(body: dict) -> tuple[float, dict]:
            start = time.perf_counter()
            async with s.post(f"{url}/chat/completions", json=body) as resp:
                assert resp.status == 200
                payload = await resp.json()
            return time.perf_counter() - start, payload

        return await asyncio.gather(*(one(b) for b in bodies))


def test_capacity_shares_decode_rate(start_sim):
    url = start_sim("--capacity-tokens-per-s", "200", "--max-tokens-per-s-per-request", "100")
    [(alone, body)] = asyncio.run(_timed_chats(url, [_chat_n(50)]))
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 50
    assert len(choice["message"]["content"].split()) == 50
    assert choice["finish_reason"] == "length"

    # Two fit under the ceiling (200 / 2 = 100 tokens/s each, the per-request max).
    two = asyncio.run(_timed_chats(url, [_chat_n(50)] * 2))
    assert max(t for t, _ in two) / alone < 1.4
    # Four share 200 tokens/s: 50 each, twice as slow.
    four = asyncio.run(_timed_chats(url, [_chat_n(50)] * 4))
    assert min(t for t, _ in four) / alone > 1.4

    _, _, stats = call("GET", f"{_root(url)}/sim/stats")
    assert stats["completion_tokens_total"] == 7 * 50
    assert (stats["running"], stats["waiting"]) == (0, 0)


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics:\n{text}")


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


def test_metrics_show_waiting_queue(start_sim):
    url = start_sim(
        "--max-running", "1", "--capacity-tokens-per-s", "100",
        "--max-tokens-per-s-per-request", "100",
    )  # fmt: skip

    async def scenario() -> tuple[str, str, list]:
        sends = asyncio.gather(_timed_chats(url, [_chat_n(30)] * 3))
        await asyncio.sleep(0.15)
        during = await _get_text(f"{_root(url)}/metrics")
        results = await sends
        after = await _get_text(f"{_root(url)}/metrics")
        return during, after, results[0]

    during, after, results = asyncio.run(scenario())
    model = {"model_name": "sim-model"}
    assert "# TYPE vllm:num_requests_waiting gauge" in during
    assert _metric(during, "vllm:num_requests_running", **model) == 1
    assert _metric(during, "vllm:num_requests_waiting", **model) == 2
    assert _metric(after, "vllm:num_requests_running", **model) == 0
    assert _metric(after, "vllm:num_requests_waiting", **model) == 0
    assert _metric(after, "vllm:request_success_total", finished_reason="length", **model) == 3
    assert _metric(after, "vllm:generation_tokens_total", **model) == 90
    # One at a time: the last waited for the two before it (about 0.9 s in all).
    assert max(t for t, _ in results) > 2 * min(t for t, _ in results)


def test_priority_orders_waiting_queue(start_sim):
    url = start_sim(
        "--max-running", "1", "--capacity-tokens-per-s", "1000",
        "--max-tokens-per-s-per-request", "100",
    )  # fmt: skip
    done: list[str] = []

    async def scenario() -> None:
        async with aiohttp.ClientSession() as s:

            async def one(name: str, body: dict) -> None:
                async with s.post(f"{url}/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
                done.append(name)

            tasks = [asyncio.create_task(one("first", _chat_n(30)))]  # runs alone: 0.3 s
            for name, prio in (("p5", 5), ("p1", 1), ("p-1", -1), ("p1-later", 1), ("p0", None)):
                await asyncio.sleep(0.03)
                extra = {} if prio is None else {"priority": prio}
                tasks.append(asyncio.create_task(one(name, _chat_n(2, **extra))))
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    # Lower priority first; equal priority in arrival order; no priority means 0.
    assert done == ["first", "p-1", "p0", "p1", "p1-later", "p5"]


def test_runtime_config_limits_and_capacity(start_sim):
    url = start_sim()
    changes = {
        "rpm": 2,
        "tpm": 1000,
        "capacity_tokens_per_s": 5000,
        "max_running": 4,
        "latency_dist": "lognormal",
        "latency_sigma": 0.1,
        "no_ratelimit_headers": False,
    }
    status, _, cfg = call("POST", f"{_root(url)}/sim/config", changes)
    assert status == 200 and {k: cfg[k] for k in changes} == changes
    statuses = [call("POST", f"{url}/chat/completions", _chat_n(5))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, _, body = call("POST", f"{_root(url)}/sim/config", {"rpm": 0})
    status, headers, body = call("POST", f"{url}/chat/completions", _chat_n(5))
    assert status == 200 and body["usage"]["completion_tokens"] == 5
    assert "x-ratelimit-limit-requests" not in headers
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    for bad in ({"latency_dist": "weird"}, {"rpm": 1.5}, {"max_running": -1}):
        assert call("POST", f"{_root(url)}/sim/config", bad)[0] == 400


def test_latency_distributions():
    def sample(dist: str, n: int = 4000) -> list[float]:
        cfg, rng = SimConfig(latency_ms=100, latency_dist=dist), random.Random(7)
        return sorted(delay_ms(cfg, rng) for _ in range(n))

    assert set(sample("fixed", 10)) == {100}
    uniform = sample("uniform")
    assert 0 <= uniform[0] < 5 and 195 < uniform[-1] <= 200
    assert sum(uniform) / len(uniform) == pytest.approx(100, rel=0.05)
    lognormal = sample("lognormal")
    assert lognormal[len(lognormal) // 2] == pytest.approx(100, rel=0.05)  # the median
    assert lognormal[-1] > 250  # sigma 0.5: a long right tail


# ---------------------------------------------------------------- interactive load


def test_interactive_generator(start_sim):
    url = start_sim("--latency-ms", "20")
    result = asyncio.run(run_interactive(url, rate=20, duration=1.0, seed=3, max_tokens=8))
    assert result["sent"] > 5
    assert result["ok"] == result["sent"] and result["errors"] == 0
    assert 20 <= result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] < 2000
    assert result["mean_ms"] >= 20

    proc = subprocess.run(
        [sys.executable, "-m", "lowtide_sim.interactive", "--url", url, "--rate", "20"]
        + ["--duration", "0.3", "--fixed-interval", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=True,
    )
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["sent"] == 5 and line["ok"] == 5 and line["errors"] == 0
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms"} <= set(line)
