"""Routes with upstream_batch = true: lines go through the provider's own Batch API, split to
its limits, stitched back by custom_id, crash-safe (SIGKILL) without paying twice.

The provider here is Lowtide itself (a second `lowtide serve` with the echo engine and a small
`[batches] max_lines`), and the simulator's Files and Batches API for the faults Lowtide
cannot be made to produce (failed and expired lines, token limits, dropped connections)."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from openai import OpenAI
from support import jsonl, make_config, submit_batch, wait_for_batch

from lowtide_sim.launch import start_simulator


def _provider_config(latency_ms: int = 0, max_lines: int = 1000) -> str:
    models = f"""
[[models]]
name = "lowtide-echo"
engine = "echo"
max_concurrency = 1024
latency_ms = {latency_ms}
"""
    return make_config(models=models, extra=f"max_lines = {max_lines}\n")


def _route(base_url: str, *, max_lines: int = 1000, extra: str = "") -> str:
    return f"""
[[models]]
name = "gpt-4o-mini"
engine = "openai"
base_url = "{base_url}"
api_key = "sk-provider"
upstream_model = "lowtide-echo"
upstream_batch = true
upstream_batch_max_lines = {max_lines}
upstream_batch_poll_seconds = 0.2
input_price = 0.15
output_price = 0.60
{extra}

[[models]]
name = "lowtide-echo"
engine = "echo"
input_price = 0.15
output_price = 0.60
"""


def _lines(n: int, model_of=lambda i: "gpt-4o-mini") -> list[dict]:
    return [
        {
            "custom_id": f"pb-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model_of(i), "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(n)
    ]


def _provider_batches(provider: OpenAI, batch_id: str) -> list:
    return [
        b
        for b in provider.batches.list(limit=100)
        if (b.metadata or {}).get("lowtide_batch_id") == batch_id
    ]


def _output(client: OpenAI, batch) -> list[dict]:
    return [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]


def _upstream(batch) -> dict:
    return batch.model_extra["lowtide"]["upstream_batches"]


def test_a_mixed_batch_is_split_to_the_provider_limit_and_stitched(make_server):
    provider = make_server(_provider_config(max_lines=100), name="provider").start()
    main = make_server(make_config(models=_route(provider.base_url, max_lines=100)), name="main")
    client = main.start().client()
    # Every third line runs here on the echo engine; the others go to the provider.
    lines = _lines(300, lambda i: "lowtide-echo" if i % 3 == 0 else "gpt-4o-mini")
    batch = wait_for_batch(client, submit_batch(client, lines).id, timeout=120)
    assert batch.status == "completed", (batch, main.log())
    out = _output(client, batch)
    counts = Counter(o["custom_id"] for o in out)
    assert len(counts) == 300 and max(counts.values()) == 1 and batch.error_file_id is None
    by_id = {o["custom_id"]: o for o in out}
    # The provider's answer, under Lowtide's own line id and the user's custom_id.
    answer = by_id["pb-1"]
    assert answer["response"]["status_code"] == 200 and answer["id"].startswith("batch_req_")
    assert "q1" in json.dumps(answer["response"]["body"])
    provider_client = provider.client()
    sent = _provider_batches(provider_client, batch.id)
    assert len(sent) == 2 and all(b.status == "completed" for b in sent)
    assert sorted(b.request_counts.total for b in sent) == [100, 100]
    # Input, output and error files are deleted at the provider once the results are in.
    deadline = time.monotonic() + 10
    while provider_client.files.list().data and time.monotonic() < deadline:
        time.sleep(0.1)
    assert provider_client.files.list().data == []
    upstream = _upstream(batch)
    assert upstream["lines_with_provider"] == 0
    assert sorted(b["id"] for b in upstream["batches"]) == sorted(b.id for b in sent)
    # Provider lines cost the batch price, the same tokens synchronously twice as much.
    cost = batch.model_extra["lowtide"]["cost"]
    assert cost["amount"] > 0 and cost["saved"] > 0


def test_sigkill_after_create_and_while_polling_pays_for_no_batch_twice(make_server):
    provider = make_server(_provider_config(latency_ms=1500), name="provider").start()
    main = make_server(make_config(models=_route(provider.base_url)), name="main")
    # First life: killed (SIGKILL, by itself) right after the first provider batch was
    # created and before Lowtide recorded it.
    client = main.start(env={"LOWTIDE_FAILPOINTS": "upstream_batch_created"}).client()
    batch = submit_batch(client, _lines(5000))
    deadline = time.monotonic() + 60
    while main.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert main.proc.returncode == -9, main.log()
    provider_client = provider.client()
    # (Other chunks' creates may have been in flight at that moment too.)
    assert 1 <= len(_provider_batches(provider_client, batch.id)) <= 5
    # Second life: finds that batch by its metadata, submits the rest, and is killed again
    # while it polls.
    client = main.start().client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = client.batches.retrieve(batch.id)
        upstream = _upstream(current)
        if upstream and upstream["lines_with_provider"] >= 2000:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"provider batches never in flight: {current}\n{main.log()}")
    main.kill()
    # Third life: picks up polling where the second left off.
    client = main.start().client()
    done = wait_for_batch(client, batch.id, timeout=180)
    assert done.status == "completed", (done, main.log())
    counts = Counter(o["custom_id"] for o in _output(client, done))
    assert len(counts) == 5000 and max(counts.values()) == 1 and done.error_file_id is None
    assert done.request_counts.completed == 5000
    sent = _provider_batches(provider_client, batch.id)
    assert len(sent) == 5, [(b.id, b.metadata, b.status) for b in sent]
    assert sorted(b.metadata["lowtide_chunk"] for b in sent) == [
        f"{batch.id}/{i}" for i in range(5)
    ]


def _sim_route(sim_url: str, *, max_lines: int = 50, extra: str = "") -> str:
    return f"""
[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim_url}"
api_key = "sk-sim"
upstream_batch = true
upstream_batch_max_lines = {max_lines}
upstream_batch_poll_seconds = 0.2
max_retries = 10
timeout = 5
input_price = 1.0
output_price = 2.0
{extra}
"""


def _sim_client(sim) -> OpenAI:
    return OpenAI(base_url=sim.url, api_key="sk-sim", max_retries=0, timeout=10)


def _sim_lines(n: int) -> list[dict]:
    return _lines(n, lambda i: "sim-model")


FAST_SIM = ("--batch-turnaround-seconds", "0.1", "--batch-cancel-seconds", "0.1")


def test_failed_expired_and_dropped_lines_are_sent_again_never_twice(make_server):
    flags = ("--seed", "7", "--batch-rate-500", "0.2", "--batch-rate-expired", "0.1")
    with start_simulator(*FAST_SIM, *flags, "--batch-rate-drop", "0.15") as sim:
        main = make_server(make_config(models=_sim_route(sim.url)))
        client = main.start().client()
        batch = wait_for_batch(client, submit_batch(client, _sim_lines(200)).id, timeout=120)
        assert batch.status == "completed", (batch, main.log())
        counts = Counter(o["custom_id"] for o in _output(client, batch))
        assert len(counts) == 200 and max(counts.values()) == 1 and batch.error_file_id is None
        # Retry chunks went out for the failed and expired lines, and despite dropped
        # connections (some after the provider created the batch) no chunk went out twice.
        sim.configure(batch_rate_drop=0)  # (this test's own calls are not the subject)
        keys = [b.metadata["lowtide_chunk"] for b in _sim_client(sim).batches.list(limit=100)]
        assert len(keys) > 4 and len(keys) == len(set(keys)), keys
        assert sim.stats()["batch_drops"] > 0


def test_a_provider_at_its_token_limit_means_wait_not_fail(make_server):
    # Room for about one 50-line chunk at a time: the others are refused until it finishes.
    flags = ("--batch-token-limit", "2000", "--batch-lines-per-second", "200")
    with start_simulator(*FAST_SIM, *flags) as sim:
        main = make_server(make_config(models=_sim_route(sim.url)))
        client = main.start().client()
        batch = wait_for_batch(client, submit_batch(client, _sim_lines(150)).id, timeout=120)
        assert batch.status == "completed", (batch, main.log())
        assert batch.request_counts.completed == 150
        failed = [b for b in _sim_client(sim).batches.list(limit=100) if b.status == "failed"]
        assert failed and all(b.errors.data[0].code == "token_limit_exceeded" for b in failed)


def test_cancel_cancels_the_provider_batch_and_keeps_what_it_finished(make_server):
    with start_simulator(*FAST_SIM, "--batch-lines-per-second", "20") as sim:
        main = make_server(make_config(models=_sim_route(sim.url, max_lines=100)))
        client = main.start().client()
        batch = submit_batch(client, _sim_lines(100))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            upstream = _upstream(client.batches.retrieve(batch.id))
            if upstream and upstream["lines_with_provider"]:
                break
            time.sleep(0.05)
        time.sleep(1.5)  # the provider answers some 20 lines a second meanwhile
        client.batches.cancel(batch.id)
        done = wait_for_batch(client, batch.id, timeout=60)
        assert done.status == "cancelled", (done, main.log())
        assert sim.stats()["batches_cancelled"] == 1
        kept = _output(client, done)
        errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
        assert kept and errors
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        ids = Counter(o["custom_id"] for o in kept + errors)
        assert len(ids) == 100 and max(ids.values()) == 1


def test_near_the_deadline_unfinished_lines_fall_back_to_synchronous_calls(make_server):
    # The provider would take 1000 s; the batch has 20 s: at 18 s its lines run synchronously.
    with start_simulator("--batch-turnaround-seconds", "1000") as sim:
        route = _sim_route(sim.url, extra='upstream_batch_fallback = "sync"')
        main = make_server(make_config(models=route))
        client = main.start().client()
        f = client.files.create(file=("in.jsonl", jsonl(_sim_lines(30))), purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="20s"
        )
        done = wait_for_batch(client, batch.id, timeout=60)
        assert done.status == "completed", (done, main.log())
        counts = Counter(o["custom_id"] for o in _output(client, done))
        assert len(counts) == 30 and max(counts.values()) == 1
        assert sim.stats()["batches_cancelled"] == 1 and sim.stats()["requests"] >= 30
        # Synchronous calls pay the full price: nothing saved on them.
        cost = done.model_extra["lowtide"]["cost"]
        assert cost["amount"] > 0 and cost["amount"] == pytest.approx(cost["sync_amount"])
        modes = {b["mode"] for b in _upstream(done)["batches"]}
        assert "sync" in modes


def test_validation_plans_chunks_within_both_limits_and_route_pure_shards():
    from lowtide.config import BatchLimits, ModelRoute
    from lowtide.runner.validation import FileValidator, iter_request_lines

    provider = ModelRoute(
        name="gpt-4o-mini",
        base_url="http://127.0.0.1:1/v1",
        upstream_batch=True,
        upstream_batch_max_lines=7,
        upstream_batch_max_bytes=1024 * 1024,
    )
    lines = _lines(40, lambda i: "lowtide-echo" if i % 5 == 4 else "gpt-4o-mini")
    lines[10]["body"]["messages"][0]["content"] = "x" * 1500  # a big line: the bytes limit
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    provider.upstream_batch_max_bytes = 2000
    validator = FileValidator(
        "/v1/chat/completions",
        lambda model: ("/v1/chat/completions",),
        BatchLimits(shard_lines=4),
        upstream_of=lambda model: provider if model == "gpt-4o-mini" else None,
    )
    validator.feed(raw)
    result = validator.finish()
    assert not result.errors
    in_chunk: dict[int, list[str]] = {}
    for shard in result.shards:
        models = {
            json.loads(line)["body"]["model"]
            for line in iter_request_lines(raw[shard["byte_start"] : shard["byte_end"]])
        }
        assert len(models) == 1  # a shard's lines all go to the provider, or none do
        assert ("chunk" in shard) == (models == {"gpt-4o-mini"})
        if "chunk" in shard:
            in_chunk.setdefault(shard["chunk"], []).extend(
                iter_request_lines(raw[shard["byte_start"] : shard["byte_end"]])
            )
    assert sum(len(v) for v in in_chunk.values()) == 32
    for chunk in result.chunks:
        got = in_chunk[chunk["idx"]]
        assert chunk["line_count"] == len(got) <= 7
        assert chunk["bytes"] == sum(len(line) + 1 for line in got) <= 2000
    # 32 provider lines, 7 a chunk at most, and the big line forces a cut of its own.
    assert len(result.chunks) >= 6
