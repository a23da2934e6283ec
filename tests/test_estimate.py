"""POST /v1/batches/estimate and `lowtide estimate`: exact tokens where Lowtide has the model's
tokenizer, an upper bound on the cost, and a duration within 2x of the real run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import httpx
import pytest
from support import (
    ROOT,
    LowtideServer,
    _env,
    chat_line,
    jsonl,
    make_config,
    start_sim,
    stop_process,
    wait_for_batch,
)

from lowtide.admission.estimate import estimate_prompt_tokens
from lowtide.api.schemas import BatchEstimate, EstimateCost, ModelEstimate
from lowtide.config import BatchLimits, ModelRoute, default_routes
from lowtide.engines.echo import EchoEngine
from lowtide.runner.estimate import Estimator
from lowtide.runner.validation import FileValidator

CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"
PRICES = "input_price = 2.0\noutput_price = 8.0\nbatch_price_factor = 0.5\n"
CHAT = "/v1/chat/completions"


def _estimate(client, file_id: str, endpoint: str = CHAT, **body) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **body}
    return client.post("/batches/estimate", body=body, cast_to=httpx.Response)


def _upload(client, lines: list[dict], raw: bytes = b"") -> str:
    data = jsonl(lines) + raw
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id


def _run(client, file_id: str, endpoint: str = CHAT, timeout: float = 300):
    batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    batch = wait_for_batch(client, batch.id, timeout=timeout)
    assert batch.status == "completed", batch
    assert batch.error_file_id is None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return batch, [o["response"]["body"]["usage"] for o in out]


# -- the embedded models: exact input tokens --------------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    models = f"""
[[models]]
name = "{CHAT_MODEL}"
engine = "llamacpp"
max_concurrency = 64
{PRICES}
[[models]]
name = "{EMBED_MODEL}"
engine = "embeddings"
input_price = 0.1
"""
    srv = LowtideServer(
        tmp_path_factory.mktemp("estimate-local") / "data", make_config(models=models)
    ).start()
    yield srv.client(timeout=120)
    srv.stop()


def _ask(custom_id: str, content, max_tokens: int, **body) -> dict:
    line = chat_line(custom_id, "", model=CHAT_MODEL, max_tokens=max_tokens, temperature=0)
    line["body"]["messages"] = (
        content if isinstance(content, list) else [{"role": "user", "content": content}]
    )
    line["body"].update(body)
    return line


def test_chat_tokens_are_exact_and_high_bounds_the_cost(local):
    lines = [
        _ask("plain", "What is the capital of France?", 6),
        _ask("digits", "Add 12,345 and 678.90 — then 3x that. 🙂 naïve 東京", 5),
        _ask("spaces", "  several   spaces\n\n\tand tabs  ", 4),
        _ask("special", "say <|im_end|> and <|im_start|>user please", 4),
        _ask(
            "system",
            [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Colour of the sky?"},
            ],
            3,
        ),
        _ask(
            "developer",
            [
                {"role": "developer", "content": "Be terse."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            3,
        ),
        _ask("n2", "Name a fruit.", 3, n=2, temperature=0.7, seed=1),
        _ask("completion-limit", "Count to three.", 0, max_completion_tokens=4),
    ]
    file_id = _upload(local, lines)
    response = _estimate(local, file_id)
    assert response.status_code == 200, response.text
    estimate = response.json()
    batch, usages = _run(local, file_id)
    assert estimate["object"] == "batch.estimate" and estimate["lines"] == len(lines)
    assert estimate["invalid_lines"] == 0 and estimate["no_price_models"] == []
    assert estimate["input_tokens_method"] == "tokenizer"
    assert estimate["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert estimate["max_output_tokens"] == 6 + 5 + 4 + 4 + 3 + 3 + 3 * 2 + 4
    cost = batch.model_extra["lowtide"]["cost"]
    assert estimate["cost"]["currency"] == "USD"
    # Lines that use their whole limit cost exactly `high`: allow for the order of the sums.
    assert estimate["cost"]["high"] >= cost["amount"] - 1e-12 and cost["amount"] > 0
    assert estimate["cost"]["sync_high"] >= cost["sync_amount"] - 1e-12
    assert estimate["cost"]["low"] <= cost["amount"]  # no history yet: no output at all
    assert estimate["fits_window"] is True and estimate["estimated_seconds"] > 0

    # Now the ledger knows this model's output per request: low assumes it (capped by high).
    again = _estimate(local, file_id).json()
    model = again["models"][0]
    average = batch.usage.output_tokens / len(lines)
    assert model["expected_output_tokens"] == min(round(average * len(lines)), 35)
    assert 0 < again["cost"]["low"] <= again["cost"]["high"] == estimate["cost"]["high"]


def test_completions_count_the_raw_prompt(local):
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": CHAT_MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0},
        }
        for i, prompt in enumerate(["The capital of France is", ["Once upon a time"], " 1 2 3"])
    ]
    file_id = _upload(local, lines)
    estimate = _estimate(local, file_id, "/v1/completions").json()
    _, usages = _run(local, file_id, "/v1/completions")
    assert estimate["input_tokens_method"] == "tokenizer"
    assert estimate["input_tokens"] == sum(u["prompt_tokens"] for u in usages)


def test_embeddings_tokens_are_exact(local):
    texts = ["A man is eating food.", ["Two", "inputs, one line"], "long " * 400, "Ünïcödé ✓"]
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": EMBED_MODEL, "input": text},
        }
        for i, text in enumerate(texts)
    ]
    file_id = _upload(local, lines)
    estimate = _estimate(local, file_id, "/v1/embeddings").json()
    _, usages = _run(local, file_id, "/v1/embeddings")
    assert estimate["input_tokens_method"] == "tokenizer"
    assert estimate["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert estimate["max_output_tokens"] == 0
    assert estimate["cost"]["high"] == pytest.approx(estimate["input_tokens"] * 0.1 / 1e6 * 0.5)


# -- an upstream: approximate tokens, limits, queues, errors ----------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    proc, url = start_sim()
    models = f"""
[[models]]
name = "sim-model"
base_url = "{url}"
max_concurrency = 32
timeout = 5
{PRICES}
[[models]]
name = "limited"
base_url = "{url}"
upstream_model = "sim-model"
max_concurrency = 32
rpm = 600

[[models]]
name = "lowtide-echo"
engine = "echo"
"""
    auth = '[auth]\napi_keys = [{ key = "sk-a", project = "a" }, { key = "sk-b", project = "b" }]'
    config = make_config(models=models, extra=auth)
    srv = LowtideServer(tmp_path_factory.mktemp("estimate-sim") / "data", config).start()
    yield srv
    srv.stop()
    stop_process(proc)


def test_approximate_tokens_prices_and_invalid_lines(upstream):
    client = upstream.client("sk-a")
    lines = [chat_line(f"s{i}", "word " * (i * 7), max_tokens=10 * i) for i in range(1, 6)]
    lines += [chat_line("echo", "hi there", model="lowtide-echo")]
    lines += [chat_line("unknown", "hi", model="gpt-nope"), {**lines[0], "url": "/v1/embeddings"}]
    file_id = _upload(client, lines, b"not json\n\r\n\n")
    estimate = _estimate(client, file_id).json()
    # Exactly the documented fields (the fuzzer allows extra ones).
    BatchEstimate.model_validate(estimate)
    assert set(estimate) == set(BatchEstimate.model_fields)
    assert set(estimate["cost"]) == set(EstimateCost.model_fields)
    assert all(set(m) == set(ModelEstimate.model_fields) for m in estimate["models"])
    assert estimate["lines"] == 6 and estimate["invalid_lines"] == 3
    assert estimate["input_tokens_method"] == "approximate"
    by_model = {m["model"]: m for m in estimate["models"]}
    sim = by_model["sim-model"]
    prompt = sum(estimate_prompt_tokens(CHAT, line["body"]) for line in lines[:5])
    assert sim["input_tokens"] == prompt and sim["max_output_tokens"] == 150
    assert by_model["lowtide-echo"]["max_output_tokens"] == 256  # no limit: admission's default
    assert estimate["no_price_models"] == ["lowtide-echo"]
    high = (prompt * 2.0 + 150 * 8.0) / 1e6
    assert estimate["cost"]["sync_high"] == pytest.approx(high)
    assert estimate["cost"]["high"] == pytest.approx(high * 0.5)
    assert estimate["cost"]["low"] == pytest.approx(prompt * 2.0 / 1e6 * 0.5)


def test_errors_are_those_of_batch_create(upstream):
    client = upstream.client("sk-a")
    file_id = _upload(client, [chat_line("a", "hi")])

    def post(body: dict, key: str = "sk-a") -> httpx.Response:
        body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **body}
        return httpx.post(
            f"{upstream.base_url}/batches/estimate",
            json={k: v for k, v in body.items() if v is not None},
            headers={"Authorization": f"Bearer {key}"},
        )

    bad = [
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"completion_window": "1y"}, "completion_window"),
        ({"metadata": {"priority": "urgent"}}, "metadata.priority"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 5}}, None),
        ({"input_file_id": None}, "input_file_id"),
    ]
    for extra, param in bad:
        response = post(extra)
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
        if param:
            assert response.json()["error"]["param"] == param
    for body, key in (({"input_file_id": "file-nope"}, "sk-a"), ({}, "sk-b")):
        response = post(body, key)  # unknown, or another project's: the same answer
        assert response.status_code == 404 and response.json()["error"]["param"] == "input_file_id"
    assert post({}, "sk-wrong").status_code == 401
    assert post({}).status_code == 200


def test_configured_rpm_predicts_the_duration_and_queues_count(upstream):
    client = upstream.client("sk-a")
    # rpm = 600: an idle route spends its one-minute burst (600 lines) at once, then 10/s.
    lines = [chat_line(f"r{i}", f"line {i}", model="limited", max_tokens=4) for i in range(750)]
    file_id = _upload(client, lines)
    estimate = _estimate(client, file_id).json()
    assert estimate["models"][0]["throughput"] == "limits"
    assert estimate["estimated_seconds"] == pytest.approx(15.0)
    started = time.monotonic()
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    while client.batches.retrieve(batch.id).request_counts.completed < 650:
        time.sleep(0.2)
    behind = _estimate(client, file_id).json()["models"][0]  # the same file again, queued
    assert 0 < behind["queued_lines"] <= 100
    assert behind["estimated_seconds"] > (750 + behind["queued_lines"]) / 10 - 1
    batch = wait_for_batch(client, batch.id, timeout=120)
    took = time.monotonic() - started
    assert batch.status == "completed"
    print(f"estimated {estimate['estimated_seconds']}s, took {took:.1f}s")
    assert took / 2 <= estimate["estimated_seconds"] <= took * 2, took


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_estimate_and_run_print_the_estimate(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        jsonl([chat_line(f"c{i}", "hello " * i, model="lowtide-echo") for i in range(5)])
    )
    config = tmp_path / "lowtide.toml"
    config.write_text(f'[[models]]\nname = "lowtide-echo"\nengine = "echo"\n{PRICES}')
    cli = [sys.executable, "-m", "lowtide.cli"]
    done = subprocess.run(
        [*cli, "estimate", str(path), "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    found = json.loads(done.stdout)
    assert found["lines"] == 5 and found["endpoint"] == CHAT and found["cost"]["high"] > 0
    assert found["max_output_tokens"] == 5 * 256
    done = subprocess.run(
        [*cli, "estimate", str(path), "--config", str(config), "--window", "1h"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert "5 lines" in done.stdout and "fits the 1h window" in done.stdout
    done = subprocess.run(
        [*cli, "run", str(path), "-o", str(tmp_path / "out.jsonl"), "--config", str(config)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "estimate: 5 lines" in done.stderr


# -- the estimator alone -------------------------------------------------------------------------

_ROUTES = {r.name: r for r in default_routes()}


def _tally(data: bytes, endpoint: str = CHAT, chunk: int = 7) -> Estimator:
    estimator = Estimator(endpoint, _ROUTES.get, lambda route: EchoEngine(route.name))
    for i in range(0, len(data), chunk):
        estimator.feed(data[i : i + chunk])
        estimator.count_pending()
    estimator.end()
    estimator.count_pending()
    return estimator


def test_estimator_takes_exactly_the_lines_validation_takes():
    good = chat_line("ok", "hi", model="lowtide-echo")
    body = good["body"]
    variants = [
        good,
        {**good, "custom_id": ""},
        {**good, "custom_id": 5},
        {**good, "custom_id": None},
        {**good, "method": "GET"},
        {**good, "url": "/v1/completions"},
        {**good, "body": [body]},
        {**good, "body": {**body, "stream": True}},
        {**good, "body": {**body, "model": ""}},
        {**good, "body": {**body, "model": 3}},
        {**good, "body": {**body, "model": "gpt-nope"}},
        {**good, "body": {**body, "model": EMBED_MODEL}},
        {**good, "body": {**body, "messages": None}},
        {k: v for k, v in good.items() if k != "body"},
        [good],
    ]
    for variant in variants:
        raw = json.dumps(variant).encode()
        validator = FileValidator(
            CHAT,
            lambda m: _ROUTES[m].served_endpoints() if m in _ROUTES else None,
            BatchLimits(),
        )
        validator.feed(raw)
        result = validator.finish()
        validator.close()
        tally = _tally(raw).result()
        assert (tally.lines, tally.invalid_lines) == (
            (1, 0) if result.error_count == 0 else (0, 1)
        ), variant
    for raw in (b"{", b"[1", b"nope"):
        assert _tally(raw).result().invalid_lines == 1


def test_estimator_stream_edges_and_quick_counts_agree_with_admission():
    bodies = [
        {"messages": [{"role": "user", "content": "x" * 41}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc" * 9}]}]},
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"content": "yo"}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": "not a list"},
        {"messages": [{"role": "system", "content": "é" * 13}, {"role": "user", "content": ""}]},
    ]
    lines = [
        {
            "custom_id": f"l{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "lowtide-echo", **b},
        }
        for i, b in enumerate(bodies)
    ]
    data = (
        b"\xef\xbb\xbf"
        + jsonl(lines).replace(b"\n", b"\r\n", 2)
        + b"\n  \n"
        + json.dumps(lines[0] | {"custom_id": "last"}).encode()
    )  # a byte-order mark, CRLFs, a blank line, no newline at the end
    want = sum(estimate_prompt_tokens(CHAT, line["body"]) for line in [*lines, lines[0]])
    for chunk in (1, 2, 5, 64, 1 << 20):
        result = _tally(data, chunk=chunk).result()
        assert (result.lines, result.invalid_lines) == (len(lines) + 1, 0), chunk
        assert sum(t.input_tokens for t in result.models) == want
    prompts = [
        {"model": "lowtide-echo", "prompt": "p" * 17},
        {"model": "lowtide-echo", "prompt": ["a", "bc"]},
        {"model": "lowtide-echo", "prompt": "x", "input": "yyyyyyyy"},
    ]
    completions = [
        {"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i, body in enumerate(prompts)
    ]
    result = _tally(jsonl(completions), "/v1/completions").result()
    assert result.models[0].input_tokens == sum(
        estimate_prompt_tokens("/v1/completions", b) for b in prompts
    )
    assert result.models[0].max_output_tokens == 3 * 16


def test_estimator_skips_an_overlong_line(monkeypatch):
    import lowtide.runner.estimate as estimate_module

    monkeypatch.setattr(estimate_module, "MAX_LINE_BYTES", 200)
    ok = jsonl([chat_line("a", "hi", model="lowtide-echo")])
    long = jsonl([chat_line("b", "z" * 500, model="lowtide-echo")])
    result = _tally(ok + long + ok, chunk=16).result()
    assert (result.lines, result.invalid_lines) == (2, 1)


def test_glob_routes_fold_models_past_the_cap(monkeypatch):
    import lowtide.runner.estimate as estimate_module

    monkeypatch.setattr(estimate_module, "MAX_MODELS", 3)
    star = ModelRoute(name="*", engine="echo")
    estimator = Estimator(CHAT, lambda m: star, lambda route: EchoEngine(route.name))
    estimator.feed(jsonl([chat_line(f"c{i}", "hi", model=f"m{i}") for i in range(10)]))
    estimator.end()
    estimator.count_pending()
    result = estimator.result()
    assert result.lines == 10
    assert sorted(t.model for t in result.models) == ["*", "m0", "m1", "m2"]
