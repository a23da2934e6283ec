"""What a batch costs: the batch object, the files and the organization endpoints agree, to
the token and to 1e-9 in money, across a SIGKILL and a restart."""

from __future__ import annotations

import io
import json
import time

import httpx
from support import chat_line, jsonl, make_config, wait_for_batch

from lowtide_sim.launch import start_simulator

PRICES = """
input_price = 2.0
cached_input_price = 1.0
output_price = 8.0
batch_price_factor = 0.5
"""


def _priced_config(sim_url: str, extra: str = "") -> str:
    models = f"""
[[models]]
name = "sim-model"
base_url = "{sim_url}"
max_concurrency = 8
timeout = 2
max_retries = 8
{PRICES}

[[models]]
name = "lowtide-echo"
engine = "echo"
"""
    return make_config(models=models, extra=extra)


def _file_lines(client, file_id) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def _expected(lines: list[dict]) -> dict:
    """Sums computed from the result files alone, at the configured prices."""
    totals = {"input": 0, "output": 0, "cached": 0, "sync": 0.0, "echo_lines": 0}
    for line in lines:
        body = (line.get("response") or {}).get("body") or {}
        usage = body.get("usage") if isinstance(body, dict) else None
        if not usage:
            continue
        inp, out = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
        totals["input"] += inp
        totals["output"] += out
        totals["cached"] += cached
        if body.get("model") == "lowtide-echo":
            totals["echo_lines"] += 1  # a route without prices: 0
            continue
        totals["sync"] += ((inp - cached) * 2.0 + cached * 1.0 + out * 8.0) / 1e6
    return totals


def _check_batch_against_files(client, batch) -> dict:
    lines = _file_lines(client, batch.output_file_id) + _file_lines(client, batch.error_file_id)
    want = _expected(lines)
    cost = batch.model_extra["lowtide"]["cost"]
    assert cost["currency"] == "USD"
    assert abs(cost["sync_amount"] - want["sync"]) < 1e-9
    assert abs(cost["amount"] - want["sync"] * 0.5) < 1e-9
    assert abs(cost["saved"] - (cost["sync_amount"] - cost["amount"])) < 1e-12
    assert cost["no_price_lines"] == want["echo_lines"]
    assert batch.usage.input_tokens == want["input"]
    assert batch.usage.output_tokens == want["output"]
    assert batch.usage.input_tokens_details.cached_tokens == want["cached"]
    return want


def _org(srv, path: str, **params) -> dict:
    r = httpx.get(
        f"{srv.base_url}/organization/{path}",
        params={"start_time": int(time.time()) - 86400, **params},
        headers={"Authorization": "Bearer sk-test"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_cost_is_exact_and_the_organization_endpoints_agree(make_server, sim_url):
    srv = make_server(_priced_config(sim_url)).start()
    client = srv.client()
    lines = [chat_line(f"c{i}", "word " * (i % 7 + 1), max_tokens=5 + i % 4) for i in range(120)]
    lines += [chat_line("bad", "x", sim_fault=400), chat_line("e1", "hi", model="lowtide-echo")]
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    final = wait_for_batch(client, b.id)
    assert final.status == "completed" and final.request_counts.failed == 1
    want = _check_batch_against_files(client, final)
    assert final.model_extra["lowtide"]["cost"]["amount"] > 0

    usage = _org(srv, "usage/completions", group_by="model")
    results = [r for bucket in usage["data"] for r in bucket["results"]]
    by_model = {r["model"]: r for r in results}
    assert by_model["sim-model"]["num_model_requests"] == 121  # 120 answered + the 400
    assert sum(r["input_tokens"] for r in results) == want["input"]
    assert sum(r["output_tokens"] for r in results) == want["output"]
    costs = _org(srv, "costs", group_by="line_item")
    values = [r["amount"]["value"] for bucket in costs["data"] for r in bucket["results"]]
    assert abs(sum(values) - want["sync"] * 0.5) < 1e-9
    assert all(r["amount"]["currency"] == "usd" for b in costs["data"] for r in b["results"])
    assert _org(srv, "usage/embeddings")["data"][-1]["results"] == []


def test_cost_survives_a_sigkill_and_restart(make_server):
    with start_simulator("--latency-ms", "40") as sim:
        srv = make_server(_priced_config(sim.url)).start()
        client = srv.client()
        lines = [chat_line(f"k{i}", "some words " * (i % 5 + 1), max_tokens=4) for i in range(400)]
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 60
        while client.batches.retrieve(b.id).request_counts.completed < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        srv.kill()
        srv.start()
        final = wait_for_batch(client, b.id, timeout=120)
        assert final.status == "completed" and final.request_counts.completed == 400
        want = _check_batch_against_files(client, final)
        costs = _org(srv, "costs")
        values = [r["amount"]["value"] for bucket in costs["data"] for r in bucket["results"]]
        assert abs(sum(values) - want["sync"] * 0.5) < 1e-9


def test_usage_is_scoped_to_the_project_and_an_admin_key_sees_all(make_server, sim_url):
    keys = (
        '\n[auth]\napi_keys = [{ key = "sk-a", project = "team-a" }, '
        '{ key = "sk-b", project = "team-b" }, { key = "sk-root", project = "ops", admin = true }]\n'
    )
    srv = make_server(_priced_config(sim_url, extra=keys)).start()
    for key, n in (("sk-a", 3), ("sk-b", 5)):
        client = srv.client(api_key=key)
        lines = [chat_line(f"{key}-{i}", "a few words") for i in range(n)]
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert wait_for_batch(client, b.id).status == "completed"

    def requests(key: str, **params) -> dict:
        r = httpx.get(
            f"{srv.base_url}/organization/usage/completions",
            params={"start_time": int(time.time()) - 86400, "group_by": "project_id", **params},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        found: dict = {}
        for bucket in r.json()["data"]:
            for result in bucket["results"]:
                project = result["project_id"]
                found[project] = found.get(project, 0) + result["num_model_requests"]
        return found

    assert requests("sk-a") == {"team-a": 3}
    assert requests("sk-b") == {"team-b": 5}
    assert requests("sk-root") == {"team-a": 3, "team-b": 5}
    assert requests("sk-root", project_ids="team-b") == {"team-b": 5}
    bad = httpx.get(
        f"{srv.base_url}/organization/costs",
        params={"start_time": 0, "bucket_width": "1h"},
        headers={"Authorization": "Bearer sk-a"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "bucket_width"
