"""Issue 15: every parameter honoured or refused; structured outputs and logprobs on the embedded
chat model, for real; answers checked against their schema on any route."""

from __future__ import annotations

import asyncio
import io
import json
import math

import jsonschema
import pytest
from support import (
    LowtideServer,
    chat_line,
    jsonl,
    make_config,
    sim_stats,
    start_sim,
    stop_process,
    wait_for_batch,
)

from lowtide.config import ModelRoute
from lowtide.engines.echo import EchoEngine
from lowtide.engines.params import request_problem, unhonoured
from lowtide.runner.schema_check import answer_check, line_problem
from lowtide.runner.upstream import request_for_provider

pytest.importorskip("llama_cpp")

CHAT_MODEL = "SmolLM2-135M-Instruct"
LABELS = ["positive", "negative", "neutral"]
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": LABELS},
        "item": {
            "type": "object",
            "properties": {
                "product": {"type": "string", "maxLength": 16},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            },
            "required": ["product", "rating"],
            "additionalProperties": False,
        },
    },
    "required": ["label", "item"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "review", "schema": SCHEMA, "strict": True},
}
SYSTEM = (
    "Classify the review as positive, negative or neutral, and extract the product and a "
    "rating from 1 to 5. Answer in JSON."
)
PRODUCTS = ["phone", "laptop", "kettle", "backpack", "headphones", "blender", "lamp", "chair"]
VERDICTS = [
    ("positive", "works perfectly and arrived a day early"),
    ("negative", "stopped working after two days"),
    ("neutral", "is fine, nothing special"),
    ("positive", "is the best purchase I made this year"),
    ("negative", "is flimsy and overpriced"),
]


@pytest.fixture(scope="module")
def sim():
    proc, url = start_sim()
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def server(sim, tmp_path_factory):
    routes = f"""
[[models]]
name = "sim-checked"
engine = "openai"
base_url = "{sim}"
validate_schema = true
max_retries = 5
timeout = 5

[[models]]
name = "sim-checked-once"
engine = "openai"
base_url = "{sim}"
validate_schema = true
max_retries = 1
timeout = 5

[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim}"
timeout = 5
"""
    data = tmp_path_factory.mktemp("structured") / "data"
    srv = LowtideServer(data, make_config(models=routes)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(timeout=120)


def _run(client, lines: list[dict], timeout: float = 240):
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return wait_for_batch(client, b.id, timeout=timeout)


def _results(client, batch) -> tuple[dict, dict]:
    def read(file_id):
        if not file_id:
            return {}
        rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
        return {r["custom_id"]: r for r in rows}

    assert batch.status == "completed", batch
    return read(batch.output_file_id), read(batch.error_file_id)


def _errors(batch) -> list[tuple[str, int | None, str | None]]:
    assert batch.status == "failed", batch
    return [(e.code, e.line, e.param) for e in batch.errors.data]


def _review_line(i: int, **body) -> dict:
    label, verdict = VERDICTS[i % len(VERDICTS)]
    review = f"The {PRODUCTS[i % len(PRODUCTS)]} {verdict}."
    return {
        "custom_id": f"r-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": CHAT_MODEL,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": review},
            ],
            "temperature": 0,
            **body,
        },
    }


def _content(row: dict) -> str:
    return row["response"]["body"]["choices"][0]["message"]["content"]


# -- structured outputs on the embedded model ----------------------------------------------


def test_200_schema_lines_all_parse_and_match(client):
    # Worst case under the grammar: ~20 tokens of structure, 16 of product, 1 of rating: an
    # answer always ends on its own within 64 tokens, so none is cut by max_tokens.
    lines = [_review_line(i, max_tokens=64, response_format=SCHEMA_FORMAT) for i in range(200)]
    out, err = _results(client, _run(client, lines))
    assert not err and len(out) == 200
    validator = jsonschema.Draft202012Validator(SCHEMA)
    correct = 0
    for i in range(200):
        row = out[f"r-{i}"]
        assert row["response"]["body"]["choices"][0]["finish_reason"] == "stop"
        value = json.loads(_content(row))
        assert validator.is_valid(value), (value, list(validator.iter_errors(value)))
        correct += value["label"] == VERDICTS[i % len(VERDICTS)][0]
    print(f"labels right: {correct}/200")  # the small model's quality, not asserted


JSON_OBJECT_PROMPTS = [
    ('Answer with a JSON object with the keys "city" and "country".', "Where is the Eiffel Tower?"),
    ('Answer with a JSON object with the keys "name" and "color".', "Describe a banana."),
    ('Reply in JSON: {"answer": <number>}.', "What is 2 + 3?"),
    ('Reply with a JSON object: {"sentiment": "positive" or "negative"}.', "I love this phone."),
    ('Return JSON with the key "capital".', "What is the capital of Italy?"),
    ('Return JSON with the key "language".', "Which language is 'Bonjour'?"),
]


def test_json_object_lines_all_parse(client):
    lines = []
    for i, (system, user) in enumerate(JSON_OBJECT_PROMPTS):
        line = chat_line(
            f"j-{i}",
            user,
            model=CHAT_MODEL,
            max_tokens=64,
            temperature=0,
            response_format={"type": "json_object"},
        )
        line["body"]["messages"].insert(0, {"role": "system", "content": system})
        lines.append(line)
    # Sampled too: the grammar holds whatever is drawn.
    lines += [
        chat_line(
            f"s-{i}",
            user,
            model=CHAT_MODEL,
            max_tokens=64,
            temperature=0.7,
            seed=i,
            response_format={"type": "json_object"},
        )
        for i, (_, user) in enumerate(JSON_OBJECT_PROMPTS[:3])
    ]
    for line in lines[-3:]:
        line["body"]["messages"].insert(0, {"role": "system", "content": JSON_OBJECT_PROMPTS[0][0]})
    out, err = _results(client, _run(client, lines))
    assert not err and len(out) == len(lines)
    for custom_id, row in out.items():
        body = row["response"]["body"]
        if custom_id.startswith("s-") and body["choices"][0]["finish_reason"] == "length":
            # A sampled answer may run out of max_tokens mid-object (as OpenAI's JSON mode can):
            # then it says so, and what it wrote is the start of an object.
            assert body["usage"]["completion_tokens"] == 64
            assert _content(row).startswith("{"), _content(row)
            continue
        assert body["choices"][0]["finish_reason"] == "stop", row
        assert isinstance(json.loads(_content(row)), dict), _content(row)


def test_logprobs_are_openai_shaped_and_match_greedy_choices(client):
    lines = [
        chat_line(
            "lp", "Is this review positive or negative? 'I love it.'", model=CHAT_MODEL,
            max_tokens=8, temperature=0, logprobs=True, top_logprobs=5,
        ),
        chat_line("lp-none", "Say hi.", model=CHAT_MODEL, max_tokens=4, temperature=0,
                  logprobs=True),
        _review_line(0, max_tokens=64, response_format=SCHEMA_FORMAT, logprobs=True,
                     top_logprobs=3) | {"custom_id": "lp-schema"},
        chat_line("plain", "Say hi.", model=CHAT_MODEL, max_tokens=4, temperature=0),
        chat_line("lp-stop", "Count from one to ten, separated by commas.", model=CHAT_MODEL,
                  max_tokens=16, temperature=0, stop=["\n"], logprobs=True),
    ]  # fmt: skip
    out, err = _results(client, _run(client, lines))
    assert not err
    for custom_id in ("lp", "lp-schema"):
        choice = out[custom_id]["response"]["body"]["choices"][0]
        content = choice["logprobs"]["content"]
        assert choice["logprobs"]["refusal"] is None and content
        text = b""
        for entry in content:
            assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
            top = entry["top_logprobs"]
            assert 1 <= len(top) <= (5 if custom_id == "lp" else 3)
            assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
            assert all(a["logprob"] >= b["logprob"] for a, b in zip(top, top[1:], strict=False))
            # temperature 0: the chosen token is the most likely one, with its log probability
            assert top[0]["token"] == entry["token"] and top[0]["bytes"] == entry["bytes"]
            assert math.isclose(top[0]["logprob"], entry["logprob"], abs_tol=1e-9)
            assert entry["logprob"] <= 0
            text += bytes(entry["bytes"])
        assert text.decode() == choice["message"]["content"]
    # Under the schema's grammar the label's probabilities are those among the allowed labels.
    label = json.loads(_content(out["lp-schema"]))["label"]
    assert label in LABELS
    none = out["lp-none"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert none and all(e["top_logprobs"] == [] for e in none)
    assert out["plain"]["response"]["body"]["choices"][0]["logprobs"] is None
    # Cut at a stop string: the logprobs cover the text kept, and no token after it.
    stopped = out["lp-stop"]["response"]["body"]["choices"][0]
    pieces = [bytes(e["bytes"]) for e in stopped["logprobs"]["content"]]
    kept = stopped["message"]["content"].encode()
    assert stopped["finish_reason"] == "stop" and pieces
    assert b"".join(pieces).startswith(kept) and len(b"".join(pieces[:-1])) < len(kept) + 1


def test_logit_bias_and_penalties_change_the_answer(client):
    from lowtide.engines.llamacpp.tokens import load_vocab
    from lowtide.engines.model_files import smollm2_gguf

    question = "What is the capital of France? Answer in one word."
    first = chat_line("first", question, model=CHAT_MODEL, max_tokens=3, temperature=0,
                      logprobs=True)  # fmt: skip
    out, _ = _results(client, _run(client, [first]))
    token = out["first"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]
    ids = load_vocab(smollm2_gguf()).tokenize(bytes(token["bytes"]), add_bos=False, special=True)
    assert len(ids) == 1
    repeat = "Count from one to ten, separated by commas."  # '1. 1\n2. 2\n3. 3\n4'
    lines = [
        first | {"custom_id": "banned"},
        chat_line("plain", repeat, model=CHAT_MODEL, max_tokens=16, temperature=0),
        chat_line("penalised", repeat, model=CHAT_MODEL, max_tokens=16, temperature=0,
                  frequency_penalty=2.0, presence_penalty=1.0),
    ]  # fmt: skip
    lines[0]["body"] = lines[0]["body"] | {"logit_bias": {str(ids[0]): -100}}
    out, err = _results(client, _run(client, lines))
    assert not err
    banned = out["banned"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]
    assert banned["bytes"] != token["bytes"]
    assert _content(out["plain"]) != _content(out["penalised"])


def test_completions_logprobs_in_the_legacy_shape(client):
    line = {
        "custom_id": "c",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": CHAT_MODEL, "prompt": "The capital of France is", "max_tokens": 4,
                 "temperature": 0, "logprobs": 2},
    }  # fmt: skip
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([line]))), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
    )
    out, err = _results(client, wait_for_batch(client, b.id, timeout=120))
    choice = out["c"]["response"]["body"]["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert (
        len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == len(logprobs["top_logprobs"])
    )
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):  # fmt: skip
        assert len(top) == 2 and max(top, key=top.get) == token and math.isclose(top[token], lp)
    assert logprobs["text_offset"][0] == len("The capital of France is")


# -- refused at validation ---------------------------------------------------------------


def test_a_parameter_the_route_cannot_honour_fails_validation_with_its_line(client):
    good = _review_line(0, max_tokens=4)
    cases = [
        (_review_line(1, tools=[{"type": "function", "function": {"name": "f"}}]),
         ("unsupported_parameter", "body.tools")),
        (_review_line(2, top_logprobs=3), ("invalid_request", "body.top_logprobs")),
        (_review_line(3, logprobs=True, top_logprobs=21), ("invalid_request", "body.top_logprobs")),
        (_review_line(4, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {
                "score": {"type": "number", "minimum": 0}}}}}),
         ("invalid_request", "body.response_format")),
        (_review_line(5, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "objet"}}}), ("invalid_request", "body.response_format")),
        (_review_line(6, response_format={"type": "xml"}), ("invalid_request", "body.response_format")),
        (chat_line("e", "x", model="lowtide-echo", response_format={"type": "json_object"}),
         ("unsupported_parameter", "body.response_format")),
        (chat_line("v", "x", model="sim-model", lowtide_validate_schema="yes"),
         ("invalid_request", "body.lowtide_validate_schema")),
        (chat_line("w", "x", model="sim-model", lowtide_validate_schema=True),
         ("invalid_request", "body.lowtide_validate_schema")),
        (chat_line("z", "x", model="sim-checked", response_format=SCHEMA_FORMAT | {
            "json_schema": {"name": "x", "schema": {"type": 5}}}),
         ("invalid_request", "body.response_format")),
    ]  # fmt: skip
    lines = [good]
    for i, (line, _) in enumerate(cases):
        lines += [line | {"custom_id": f"bad-{i}"}, _review_line(100 + i, max_tokens=4)]
    batch = _run(client, [*lines, good | {"custom_id": "last"}])
    expected = [(code, 2 + 2 * i, param) for i, (_, (code, param)) in enumerate(cases)]
    assert _errors(batch) == expected
    message = batch.errors.data[0].message
    assert "'tools'" in message and "response_format" in message  # says what it honours
    assert "minimum" in batch.errors.data[3].message


def test_harmless_and_neutral_parameters_pass(client):
    lines = [
        _review_line(0, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False, stream=False,
                     n=1, logprobs=False, response_format={"type": "text"}, tools=[],
                     frequency_penalty=0.5, presence_penalty=0.2, logit_bias={"13": -5}, seed=3),
        chat_line("sim", "x", model="sim-model", tools=[{"type": "function"}], foo="bar"),
        chat_line("echo", "x", model="lowtide-echo", temperature=0.3, max_tokens=5),
    ]  # fmt: skip
    out, err = _results(client, _run(client, lines))
    assert not err and set(out) == {"r-0", "sim", "echo"}


# -- refused by the engine, when a line reaches it anyway --------------------------------


def test_engines_refuse_what_they_cannot_honour_per_line():
    echo = EchoEngine("lowtide-echo")
    body = {"model": "e", "messages": [{"role": "user", "content": "x"}], "logprobs": True}
    answer = asyncio.run(echo.execute("/v1/chat/completions", body))
    assert answer.status_code == 400
    assert answer.body["error"]["code"] == "unsupported_parameter"
    assert answer.body["error"]["param"] == "logprobs"
    assert (
        unhonoured("embeddings", "/v1/embeddings", {"input": "x", "truncate": True}) == "truncate"
    )
    assert unhonoured("openai", "/v1/chat/completions", {"anything": 1}) is None
    route = ModelRoute(name="m", engine="llamacpp")
    assert request_problem(route, "/v1/completions", {"prompt": "x", "echo": True}).param == "echo"
    assert request_problem(route, "/v1/chat/completions", {"messages": [], "n": 17}).param == "n"


def test_the_extension_field_never_leaves_lowtide():
    route = ModelRoute(name="p", base_url="http://x/v1", upstream_batch=True)
    raw = jsonl([chat_line("a", "x", lowtide_validate_schema=True)]).strip()
    sent = json.loads(request_for_provider(raw, route))
    assert "lowtide_validate_schema" not in sent["body"] and sent["body"]["model"] == "sim-model"
    assert line_problem(route, "/v1/chat/completions", {"lowtide_validate_schema": 1}) is not None
    checked = ModelRoute(name="c", base_url="http://x/v1", validate_schema=True, max_retries=1)
    check = answer_check(checked, "/v1/chat/completions", {"response_format": SCHEMA_FORMAT}, None)
    assert check is not None and check.retries == 1
    assert answer_check(checked, "/v1/chat/completions", {}, None) is None  # nothing to check


# -- schema checks on any route ------------------------------------------------------------


def test_a_schema_checked_route_retries_then_reports_schema_violation(client, sim):
    good = json.dumps({"label": "positive", "item": {"product": "phone", "rating": 5}})
    wrong = json.dumps({"label": "great", "item": {"product": "phone", "rating": 5}})
    malformed = '{"label": "positive", "item": {"product": "phone"'

    def line(custom_id, model, content, **body):
        return chat_line(custom_id, custom_id, model=model, response_format=SCHEMA_FORMAT,
                         sim_content=content, **body)  # fmt: skip

    before = sim_stats(sim)
    lines = [
        line("ok", "sim-checked", good),
        line("malformed", "sim-checked", malformed),
        line("wrong", "sim-checked", wrong),
        line("once", "sim-checked-once", malformed),  # max_retries = 1: one retry only
        line("opt-out", "sim-checked", malformed, lowtide_validate_schema=False),
        line("opt-in", "sim-model", malformed, lowtide_validate_schema=True),
        line("unchecked", "sim-model", malformed),
        chat_line("no-format", "x", model="sim-checked", sim_content="not json"),
    ]
    batch = _run(client, lines, timeout=60)
    out, err = _results(client, batch)
    assert set(out) == {"ok", "opt-out", "unchecked", "no-format"}
    assert set(err) == {"malformed", "wrong", "once", "opt-in"}
    for custom_id in err:
        assert err[custom_id]["error"]["code"] == "schema_violation"
        assert err[custom_id]["response"]["status_code"] == 200  # the answer, for inspection
    assert "not valid JSON" in err["malformed"]["error"]["message"]
    assert "'great' is not one of" in err["wrong"]["error"]["message"]
    assert "label" in err["wrong"]["error"]["message"]
    after = sim_stats(sim)
    assert after["requests"] - before["requests"] == 4 + 3 * 3 + 2  # 1 send each; 2 retries; 1
    assert after["max_per_body"] == 3
    # Every answer was paid for, those asked again included: usage counts them all.
    assert batch.usage.input_tokens == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert (
        batch.usage.output_tokens
        == after["completion_tokens_total"] - before["completion_tokens_total"]
    )
