"""Lines that share a prompt prefix go out together; the simulator's prefix cache shows it pays."""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter

import httpx
import pytest
from support import jsonl, make_config, sim_stats, start_sim, wait_for_batch

from lowtide.runner.prefix_groups import dispatch_order, prefix_key
from lowtide_sim.config import SimConfig
from lowtide_sim.launch import stop_process
from lowtide_sim.prefill import BLOCK, PrefillEngine


def _line(custom_id: str, system: str, user: str, model: str = "sim-model", **extra) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        **extra,
    }
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode()


# ---------------------------------------------------------------- the order


def test_prefix_key_is_the_start_of_the_prompt_whatever_the_key_order():
    a = _line("a-1", "You sort tickets.", "one")
    b = json.dumps(
        {
            "body": {"messages": [{"role": "system", "content": "You sort tickets."}], "n": 1},
            "url": "/v1/chat/completions",
            "custom_id": "quite-another-id",
        }
    ).encode()
    assert prefix_key(a).startswith(b'"messages"')
    assert prefix_key(a)[:40] == prefix_key(b)[:40]
    # A quoted key inside a string is escaped, so it is not taken for the prompt.
    tricky = _line('say "prompt"', "x", 'the "input" word')
    assert prefix_key(tricky).startswith(b'"messages"')
    assert prefix_key(b'{"custom_id": "x", "body": {"model": "m"}}') == b""
    anthropic = b'{"custom_id":"m","body":{"model":"c","system":"Be brief.","messages":[]}}'
    assert prefix_key(anthropic).startswith(b'"system"')
    # A key's text before the body (a custom_id named like one) is not the prompt.
    named = b'{"custom_id":"input","body":{"model":"c","prompt":"Say hi."}}'
    assert prefix_key(named) == b'"prompt":"Say hi."}}'
    responses = b'{"body":{"instructions":"Be brief.","input":[{"role":"user","content":"x"}]}}'
    assert prefix_key(responses).startswith(b'"instructions":"Be brief.","input"')


def test_dispatch_order_groups_by_first_appearance_and_keeps_file_order_inside():
    systems = ["A" * 300, "B" * 300, "C" * 300]
    lines = [_line(f"r{i}", systems[i % 3], f"doc {i}") for i in range(9)]
    assert list(dispatch_order(lines, 0, 9)) == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert list(dispatch_order(lines, 4, 9)) == [4, 7, 5, 8, 6]  # a resumed shard
    unique = [_line(f"u{i}", f"instruction {i}", "doc") for i in range(5)]
    assert list(dispatch_order(unique, 0, 5)) == [0, 1, 2, 3, 4]
    same = [_line(f"s{i}", "one instruction", f"doc {i}") for i in range(5)]
    assert list(dispatch_order(same, 0, 5)) == [0, 1, 2, 3, 4]
    # A short system prompt: the key stops before the last message (the document).
    short = [_line(f"t{i}", "AB"[i % 2], f"document number {i}") for i in range(4)]
    assert list(dispatch_order(short, 0, 4)) == [0, 2, 1, 3]
    # One message: its first bytes (an instruction before the document, in one text).
    one = [
        json.dumps({"body": {"messages": [{"role": "user", "content": "X" * 300 + str(i)}]}})
        for i in range(3)
    ]
    assert list(dispatch_order([o.encode() for o in one], 0, 3)) == [0, 1, 2]


# ---------------------------------------------------------------- the simulator's cache


def test_prefix_cache_finds_the_longest_cached_run_of_blocks_and_evicts_the_oldest():
    engine = PrefillEngine(SimConfig(prefill_tokens_per_s=1e6, prefix_cache_tokens=6 * BLOCK))
    a = [f"a{i}" for i in range(3 * BLOCK + 5)]
    assert engine.lookup(a) == 0
    assert engine.lookup(a) == 3 * BLOCK  # full blocks only
    b = a[: 2 * BLOCK] + ["other"] * (2 * BLOCK)
    assert engine.lookup(b) == 2 * BLOCK  # shares two blocks, then differs
    c = [f"c{i}" for i in range(4 * BLOCK)]
    assert engine.lookup(c) == 0  # 4 new blocks push out a's and b's oldest
    assert engine.lookup(a) < 3 * BLOCK
    engine.reset()
    assert engine.lookup(c) == 0


@pytest.fixture
def cache_sim():
    proc, url = start_sim("--prefill-tokens-per-s", "1000000", "--prefix-cache-tokens", "10000")
    yield url
    stop_process(proc)


def test_simulator_reports_cached_prompt_tokens_in_each_api(cache_sim):
    root = cache_sim.removesuffix("/v1")
    system = " ".join(f"w{i}" for i in range(70))  # 4 full blocks and 6 words
    chat = {
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "hello there"},
        ],
        "max_tokens": 4,
    }
    first = httpx.post(f"{cache_sim}/chat/completions", json=chat).json()["usage"]
    assert first["prompt_tokens"] == 72 and "prompt_tokens_details" not in first
    again = httpx.post(f"{cache_sim}/chat/completions", json=chat).json()["usage"]
    assert again["prompt_tokens_details"] == {"cached_tokens": 4 * BLOCK}
    message = {
        "model": "claude-x",
        "system": system,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    httpx.post(f"{cache_sim}/messages", json=message, headers=headers).raise_for_status()
    usage = httpx.post(f"{cache_sim}/messages", json=message, headers=headers).json()["usage"]
    assert usage["cache_read_input_tokens"] == 4 * BLOCK and usage["input_tokens"] == 71 - 64
    metrics = httpx.get(f"{root}/metrics").text
    # Hits: the second chat request, and both messages (their system prompt is the same text).
    assert 'vllm:prefix_cache_hits_total{model_name="sim-model"} 192.0' in metrics
    assert sim_stats(cache_sim)["cached_tokens_total"] == 192
    httpx.post(f"{root}/sim/reset").raise_for_status()  # an empty cache again
    usage = httpx.post(f"{cache_sim}/chat/completions", json=chat).json()["usage"]
    assert "prompt_tokens_details" not in usage


# ---------------------------------------------------------------- through a batch


def _instructions(n: int, words: int) -> list[str]:
    rng = random.Random(7)
    return [
        f"Task {k}: " + " ".join(rng.choice("abcdefghij") for _ in range(words)) for k in range(n)
    ]


def _run(client, model: str, systems: list[str], n: int):
    lines = [
        json.loads(_line(f"r-{i}", systems[i % len(systems)], f"doc {i}", model=model))
        for i in range(n)
    ]
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return wait_for_batch(client, b.id, timeout=90)


def _answers(client, batch) -> list[dict]:
    return [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]


def test_grouped_lines_keep_the_upstream_cache_warm_and_results_stay_in_file_order(make_server):
    # 8 instructions of 80 tokens, line i uses i mod 8; the cache holds about two of them, so in
    # file order each instruction is evicted before its next use.
    proc, url = start_sim("--prefill-tokens-per-s", "1000000", "--prefix-cache-tokens", "200")
    try:
        routes = "".join(
            f'[[models]]\nname = "{name}"\nengine = "openai"\nbase_url = "{url}"\n'
            f"max_concurrency = 8\nadaptive = false\ngroup_prefixes = {grouped}\n"
            "input_price = 1.0\ncached_input_price = 0.5\n"
            for name, grouped in (("grouped", "true"), ("file-order", "false"))
        )
        srv = make_server(make_config(models=routes)).start()
        client = srv.client()
        systems = _instructions(8, 79)
        cached = {}
        cost = {}
        for model in ("grouped", "file-order"):
            httpx.post(f"{url.removesuffix('/v1')}/sim/reset").raise_for_status()
            batch = _run(client, model, systems, 240)
            assert batch.status == "completed" and batch.request_counts.completed == 240
            out = _answers(client, batch)
            assert [o["custom_id"] for o in out] == [f"r-{i}" for i in range(240)]
            for i, o in enumerate(out):  # each line got its own answer
                content = o["response"]["body"]["choices"][0]["message"]["content"]
                assert content == f"echo: doc {i}"
            usage = batch.usage
            cached[model] = usage.input_tokens_details.cached_tokens / usage.input_tokens
            cost[model] = batch.model_extra["lowtide"]["cost"]["amount"]
        assert cached["grouped"] > 0.8, cached
        assert cached["file-order"] < cached["grouped"] / 4, cached
        assert cost["grouped"] < cost["file-order"]  # cached input is billed at its price
    finally:
        stop_process(proc)


def test_grouped_batch_survives_a_kill_exactly_once(make_server):
    proc, url = start_sim("--latency-ms", "40")
    try:
        config = make_config(url).replace("max_concurrency = 32", "max_concurrency = 8")
        srv = make_server(config).start()
        client = srv.client()
        systems = _instructions(6, 40)
        lines = [json.loads(_line(f"r-{i}", systems[i % 6], f"doc {i}")) for i in range(500)]
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while client.batches.retrieve(b.id).request_counts.completed < 150:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        srv.kill()  # SIGKILL mid-batch, with finished lines past the committed prefix
        srv.start()
        client = srv.client()
        final = wait_for_batch(client, b.id, timeout=90)
        assert final.status == "completed", srv.log()
        out = _answers(client, final)
        assert Counter(o["custom_id"] for o in out) == Counter(f"r-{i}" for i in range(500))
        for i, o in enumerate(out):
            content = o["response"]["body"]["choices"][0]["message"]["content"]
            assert content == f"echo: doc {i}"
        assert sim_stats(url)["max_per_body"] <= 2  # one kill: a line is sent at most twice
    finally:
        stop_process(proc)
