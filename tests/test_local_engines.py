"""The embedded models, for real: SmolLM2 on llama.cpp and MiniLM in numpy, through the server."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from support import LowtideServer, chat_line, jsonl, make_config, wait_for_batch

CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBED_MODEL = "all-MiniLM-L6-v2"

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A server with no model configuration at all: only the built-in routes."""
    srv = LowtideServer(tmp_path_factory.mktemp("local") / "data", make_config(models="")).start()
    yield srv.client(timeout=120)
    srv.stop()


def _run(client, lines: list[dict], endpoint: str = "/v1/chat/completions", timeout: float = 300):
    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    b = wait_for_batch(client, b.id, timeout=timeout)
    assert b.status == "completed", b
    out = (
        [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
        if b.output_file_id
        else []
    )
    err = (
        [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
        if b.error_file_id
        else []
    )
    return b, {o["custom_id"]: o for o in out}, {e["custom_id"]: e for e in err}


def _ask(custom_id: str, question: str, max_tokens: int = 24, **body) -> dict:
    return chat_line(
        custom_id, question, model=CHAT_MODEL, max_tokens=max_tokens, temperature=0, **body
    )


QUESTION = "What is the capital of France? Answer in one word."


def test_chat_is_deterministic_and_batch_invariant(local):
    _, alone, _ = _run(local, [_ask("q", QUESTION)])
    _, again, _ = _run(local, [_ask("q", QUESTION)])
    others = [_ask(f"o{i}", f"Write a short sentence about the number {i}.") for i in range(23)]
    b, crowd, _ = _run(local, [*others[:11], _ask("q", QUESTION), *others[11:]])
    answer = alone["q"]["response"]["body"]["choices"][0]["message"]["content"]
    assert answer and "Paris" in answer
    assert again["q"]["response"]["body"]["choices"][0]["message"]["content"] == answer
    assert crowd["q"]["response"]["body"]["choices"][0]["message"]["content"] == answer
    body = crowd["o3"]["response"]["body"]
    assert body["model"] == CHAT_MODEL and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and 0 < usage["completion_tokens"] <= 24
    assert b.usage.output_tokens == sum(
        o["response"]["body"]["usage"]["completion_tokens"] for o in crowd.values()
    )


def test_max_tokens_stop_and_sampling_params(local):
    lines = [
        _ask("short", "Count from one to twenty in words.", max_tokens=5),
        _ask(
            "stopped",
            "Count from one to twenty in words, separated by commas.",
            max_tokens=40,
            stop=[","],
        ),
    ]
    _, out, err = _run(local, lines)
    assert not err
    short = out["short"]["response"]["body"]
    assert (
        short["choices"][0]["finish_reason"] == "length"
        and short["usage"]["completion_tokens"] == 5
    )
    stopped = out["stopped"]["response"]["body"]["choices"][0]
    assert stopped["finish_reason"] == "stop" and "," not in stopped["message"]["content"]


def test_seeded_sampling_repeats(local):
    # Sampling reads the logits' low bits, which depend on what else shares the decode step, so
    # a seed reproduces its samples for the same batch composition (here: the line alone).
    sampled = chat_line(
        "s",
        "Tell me a story.",
        model=CHAT_MODEL,
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        n=2,
    )
    runs = []
    for _ in range(2):
        _, out, _ = _run(local, [sampled])
        runs.append([c["message"]["content"] for c in out["s"]["response"]["body"]["choices"]])
    assert len(runs[0]) == 2 and runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # n=2 draws with seed and seed+1


def test_completions_endpoint(local):
    line = {
        "custom_id": "c",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "model": CHAT_MODEL,
            "prompt": "The capital of France is",
            "max_tokens": 8,
            "temperature": 0,
        },
    }
    _, out, _ = _run(local, [line], endpoint="/v1/completions")
    body = out["c"]["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] <= 8


def test_prompt_longer_than_context_is_a_line_error(local):
    long = "lorem ipsum " * 1200
    _, out, err = _run(local, [_ask("long", long), _ask("fine", QUESTION)])
    assert "fine" in out
    assert err["long"]["response"]["status_code"] == 400
    assert err["long"]["error"]["code"] == "context_length_exceeded"


def test_embeddings(local):
    texts = {
        "a": "A man is eating food.",
        "b": "A man is eating a piece of bread.",
        "c": "The stock market fell sharply today.",
    }
    lines = [
        {
            "custom_id": k,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": EMBED_MODEL, "input": v},
        }
        for k, v in texts.items()
    ]
    lines.append(
        {
            "custom_id": "pair",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {
                "model": EMBED_MODEL,
                "input": [texts["a"], texts["c"]],
                "encoding_format": "base64",
            },
        }
    )
    b, out, err = _run(local, lines, endpoint="/v1/embeddings")
    assert not err
    vec = {k: np.array(out[k]["response"]["body"]["data"][0]["embedding"]) for k in texts}
    for v in vec.values():
        assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-4
    assert vec["a"] @ vec["b"] > 0.6 > vec["a"] @ vec["c"]
    pair = out["pair"]["response"]["body"]["data"]
    decoded = np.frombuffer(base64.b64decode(pair[0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vec["a"], atol=1e-6)
    assert out["a"]["response"]["body"]["usage"]["prompt_tokens"] > 0 and b.usage.input_tokens > 0


def test_unknown_model_lists_served_models(local):
    f = local.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([chat_line("x", "y", model="gpt-4o")]))), purpose="batch"
    )
    b = wait_for_batch(
        local,
        local.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert b.status == "failed"
    error = b.errors.data[0]
    assert error.code == "model_not_found" and error.param == "body.model"
    assert CHAT_MODEL in error.message and EMBED_MODEL in error.message


def test_model_that_fails_to_load_fails_only_its_lines(make_server):
    config = make_config(
        models="""
[[models]]
name = "broken"
engine = "llamacpp"
model_path = "/nonexistent/model.gguf"
weights = "as-is"
"""
    )
    srv = make_server(config).start()
    client = srv.client()
    _, out, err = _run(
        client,
        [chat_line("bad", "hi", model="broken"), chat_line("good", "hi", model="lowtide-echo")],
    )
    assert "good" in out
    assert err["bad"]["error"]["code"] == "engine_error"
    assert "could not be loaded" in err["bad"]["error"]["message"]
