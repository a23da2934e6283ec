"""The simulator's Anthropic face: POST /v1/messages, Anthropic's headers and errors.

Also the admission side: parse_rate_limit_headers reads anthropic-ratelimit-* as it reads
x-ratelimit-*.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from multidict import CIMultiDict

from lowtide.admission.headers import parse_rate_limit_headers, parse_reset_time
from lowtide_sim.launch import Simulator, start_simulator
from lowtide_sim.limits import format_rfc3339

VERSION = {"anthropic-version": "2023-06-01"}
BODY: dict[str, Any] = {
    "model": "sim-model",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hello there"}],
}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with start_simulator() as s:
        yield s


@pytest.fixture
def start_sim() -> Iterator[Any]:
    """Factory: ``start_sim("--rpm", "3")`` -> a running Simulator; stopped at teardown."""
    sims: list[Simulator] = []

    def start(*flags: str) -> Simulator:
        sims.append(start_simulator(*flags))
        return sims[-1]

    yield start
    for s in sims:
        s.stop()


def post(
    root: str,
    body: Any,
    *,
    key: str | None = "sk-test",
    headers: dict[str, str] | None = None,
    version: bool = True,
) -> httpx.Response:
    sent = dict(VERSION) if version else {}
    if key is not None:
        sent["x-api-key"] = key
    sent.update(headers or {})
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.post(f"{root}/v1/messages", json=body, headers=sent)


def error_of(resp: httpx.Response) -> tuple[str, str]:
    body = resp.json()
    assert body["type"] == "error"
    assert body["request_id"] == resp.headers["request-id"]
    assert resp.headers["request-id"].startswith("req_")
    return body["error"]["type"], body["error"]["message"]


# ---------------------------------------------------------------- answers


def test_message_answer_has_anthropics_shape(sim):
    body = {
        **BODY,
        "system": "be brief",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}],
            },
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "metadata": {"user_id": "u-1"},
        "stop_sequences": ["never-said"],
    }
    resp = post(sim.root, body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["request-id"].startswith("req_")
    message = resp.json()
    assert message["id"].startswith("msg_")
    assert message["id"][4:] == resp.headers["request-id"][4:]
    assert message == {
        "id": message["id"],
        "type": "message",
        "role": "assistant",
        "model": "sim-model",
        "content": [{"type": "text", "text": "echo: hello there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            # words of the system prompt and every message: 2 + 2 + 2 + 2
            "input_tokens": 8,
            "output_tokens": 3,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    # No rate limits configured: no rate-limit headers of either family.
    assert not [h for h in resp.headers if "ratelimit" in h.lower()]


def test_stop_sequences_cut_the_answer(sim):
    body = {**BODY, "messages": [{"role": "user", "content": "one two STOP three"}]}
    message = post(sim.root, {**body, "stop_sequences": ["three", "STOP"]}).json()
    assert message["content"] == [{"type": "text", "text": "echo: one two "}]
    assert message["stop_reason"] == "stop_sequence"
    assert message["stop_sequence"] == "STOP"
    assert message["usage"]["output_tokens"] == 3


def test_sim_content_and_bearer_and_beta_are_accepted(sim):
    headers = {"Authorization": "Bearer sk-test", "anthropic-beta": "message-batches-2024-09-24"}
    with httpx.Client(trust_env=False, timeout=10) as client:
        resp = client.post(
            f"{sim.root}/v1/messages?beta=true",
            json={**BODY, "sim_content": '{"broken": '},
            headers={**VERSION, **headers},
        )
    assert resp.status_code == 200, resp.text
    message = resp.json()
    assert message["content"][0]["text"] == '{"broken": '
    assert message["stop_reason"] == "end_turn"


def test_engine_on_answers_exactly_max_tokens(start_sim):
    s = start_sim("--max-running", "4", "--max-tokens-per-s-per-request", "1000")
    message = post(s.root, {**BODY, "max_tokens": 7}).json()
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 7
    assert len(message["content"][0]["text"].split()) == 7
    metrics = httpx.get(f"{s.root}/metrics", trust_env=False).text
    assert 'vllm:request_success_total{finished_reason="length",model_name="sim-model"} 1.0' in (
        metrics
    )


def test_requests_are_counted_in_stats(start_sim):
    s = start_sim()
    assert post(s.root, BODY).status_code == 200
    assert post(s.root, BODY).status_code == 200
    assert post(s.root, {**BODY, "sim_fault": 500}).status_code == 500
    assert post(s.root, BODY, version=False).status_code == 400
    stats = s.stats()
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 2, "500": 1, "400": 1}
    assert stats["max_per_body"] == 3  # the same body, the last time without a version
    assert stats["prompt_tokens_total"] == 4  # "hello there", twice
    assert stats["completion_tokens_total"] == 6


# ---------------------------------------------------------------- errors


def test_anthropic_version_is_required(sim):
    resp = post(sim.root, BODY, version=False)
    assert resp.status_code == 400
    assert error_of(resp) == ("invalid_request_error", "anthropic-version: header is required")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": 0}, "max_tokens: Input should be an integer greater than or equal to 1"),
        ({"model": None}, "model: Field required"),
        ({"messages": []}, "messages: at least one message is required"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
        ),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"temperature": 1.5}, "temperature: Input should be a number between 0 and 1"),
        ({"top_k": -1}, "top_k:"),
        ({"stop_sequences": "STOP"}, "stop_sequences:"),
        ({"metadata": {"user": "x"}}, "metadata.user: Extra inputs are not permitted"),
        ({"max_completion_tokens": 5}, "max_completion_tokens: Extra inputs are not permitted"),
        ({"stream": True}, "Streaming is not supported"),
    ],
)
def test_invalid_params_answer_invalid_request_error(sim, change, message):
    body = {**BODY, **change}
    body = {k: v for k, v in body.items() if v is not None}
    resp = post(sim.root, body)
    assert resp.status_code == 400
    kind, text = error_of(resp)
    assert kind == "invalid_request_error"
    assert message in text


def test_unparsable_body_and_unknown_path(sim):
    with httpx.Client(trust_env=False, timeout=10) as client:
        resp = client.post(f"{sim.root}/v1/messages", content=b"{nope", headers=VERSION)
        assert resp.status_code == 400 and error_of(resp)[0] == "invalid_request_error"
        resp = client.get(f"{sim.root}/v1/messages/batches", headers=VERSION)
        assert resp.status_code == 404 and error_of(resp)[0] == "not_found_error"


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_sim_fault_uses_anthropics_error_types(sim, fault, kind):
    resp = post(sim.root, {**BODY, "sim_fault": fault})
    assert resp.status_code == fault
    assert error_of(resp)[0] == kind
    if fault == 429:
        assert resp.headers["retry-after"] == "0"  # --retry-after's default


def test_missing_model_and_fail_first(sim):
    resp = post(sim.root, {**BODY, "model": "sim-missing"})
    assert resp.status_code == 404 and error_of(resp)[0] == "not_found_error"
    body = {**BODY, "sim_fail_first": 1, "sim_fault": 529, "metadata": {"user_id": "ff"}}
    assert post(sim.root, body).status_code == 529
    assert post(sim.root, body).status_code == 200


def test_require_key_takes_x_api_key_or_bearer(start_sim):
    s = start_sim("--require-key", "sekret")
    assert post(s.root, BODY, key="sekret").status_code == 200
    assert (
        post(s.root, BODY, key=None, headers={"Authorization": "Bearer sekret"}).status_code == 200
    )
    for key in ("wrong", None):
        resp = post(s.root, BODY, key=key)
        assert resp.status_code == 401
        assert error_of(resp) == ("authentication_error", "invalid x-api-key")


def test_random_faults_in_anthropic_shapes(start_sim):
    s = start_sim("--rate-500", "1", "--seed", "7")
    seen = {}
    for _ in range(30):
        resp = post(s.root, BODY)
        seen[resp.status_code] = error_of(resp)[0]
    # a random 503 is Anthropic's 529 overloaded_error
    assert seen == {500: "api_error", 502: "api_error", 529: "overloaded_error"}
    s.configure(rate_500=0.0, rate_429=1.0, retry_after="1.5")
    resp = post(s.root, BODY)
    assert resp.status_code == 429 and error_of(resp)[0] == "rate_limit_error"
    assert resp.headers["retry-after"] == "1.5"
    assert "retry-after-ms" not in resp.headers


# ---------------------------------------------------------------- rate limits


def test_rate_limit_headers_and_429(start_sim):
    s = start_sim("--rpm", "3", "--tpm", "1000")
    remaining = []
    for _ in range(3):
        resp = post(s.root, BODY, key="alice")
        assert resp.status_code == 200
        h = resp.headers
        assert not [name for name in h if name.lower().startswith("x-ratelimit")]
        assert h["anthropic-ratelimit-requests-limit"] == "3"
        remaining.append(h["anthropic-ratelimit-requests-remaining"])
        for family in ("tokens", "input-tokens", "output-tokens"):
            assert h[f"anthropic-ratelimit-{family}-limit"] == "1000"
    assert remaining == ["2", "1", "0"]
    # each request costs its 2 input words + max_tokens 64 (the bucket refills 1000/60 a second)
    tokens_left = int(h["anthropic-ratelimit-tokens-remaining"])
    assert 1000 - 3 * 66 <= tokens_left < 1000 - 3 * 66 + 50
    assert h["anthropic-ratelimit-input-tokens-remaining"] == str(tokens_left)
    assert h["anthropic-ratelimit-output-tokens-remaining"] == str(tokens_left)
    reset = h["anthropic-ratelimit-requests-reset"]
    assert datetime.strptime(reset, "%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, whole seconds, UTC
    assert parse_reset_time(reset) == pytest.approx(60, abs=2)

    info = parse_rate_limit_headers(h)
    assert (info.limit_requests, info.remaining_requests) == (3, 0)
    assert (info.limit_tokens, info.remaining_tokens) == (1000, tokens_left)
    assert info.reset_requests == pytest.approx(60, abs=2)

    resp = post(s.root, BODY, key="alice")
    assert resp.status_code == 429
    kind, message = error_of(resp)
    assert kind == "rate_limit_error" and "3 requests per minute" in message
    assert resp.headers["retry-after"] == "20"  # one request refills in 60/3 s
    assert resp.headers["anthropic-ratelimit-requests-remaining"] == "0"

    # Per key: bob still has his minute; a 401-free request without a key shares "".
    resp = post(s.root, BODY, key="bob")
    assert resp.headers["anthropic-ratelimit-requests-remaining"] == "2"
    stats = s.stats()
    assert stats["rate_limited"] == 1
    assert stats["by_status"] == {"200": 4, "429": 1}


def test_no_ratelimit_headers_flag(start_sim):
    s = start_sim("--rpm", "1", "--no-ratelimit-headers")
    assert not [h for h in post(s.root, BODY).headers if "ratelimit" in h.lower()]
    resp = post(s.root, BODY)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "60"
    assert not [h for h in resp.headers if "ratelimit" in h.lower()]


def test_format_rfc3339_rounds_up_to_whole_seconds():
    now = datetime(2025, 8, 21, 12, 40, 59, tzinfo=UTC).timestamp()
    assert format_rfc3339(0, now) == "2025-08-21T12:40:59Z"
    assert format_rfc3339(0.2, now) == "2025-08-21T12:41:00Z"
    assert format_rfc3339(61, now) == "2025-08-21T12:42:00Z"
    assert format_rfc3339(-5, now) == "2025-08-21T12:40:59Z"


# ---------------------------------------------------------------- the official SDK


def test_official_anthropic_sdk(start_sim):
    anthropic = pytest.importorskip("anthropic")
    s = start_sim("--rpm", "100", "--tpm", "100000")
    client = anthropic.Anthropic(base_url=s.root, api_key="sk-sdk", max_retries=0)

    raw = client.messages.with_raw_response.create(
        model="sim-model",
        max_tokens=32,
        system=[{"type": "text", "text": "you are a test"}],
        messages=[{"role": "user", "content": "say something"}],
        stop_sequences=["nothing-matches"],
        metadata={"user_id": "someone"},
        extra_body={"temperature": 0.2, "top_p": 0.5, "top_k": 3},
    )
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "100"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "99"
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: say something"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 6 and message.usage.output_tokens == 3

    cut = client.messages.create(
        model="sim-model",
        max_tokens=32,
        messages=[{"role": "user", "content": [{"type": "text", "text": "a b END c"}]}],
        stop_sequences=["END"],
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "END"

    cases = [
        ({"sim_fault": 529}, anthropic.OverloadedError),
        ({"sim_fault": 500}, anthropic.InternalServerError),
        ({"sim_fault": 429}, anthropic.RateLimitError),
        ({"sim_fault": 400}, anthropic.BadRequestError),
    ]
    for extra, error in cases:
        with pytest.raises(error) as caught:
            client.messages.create(
                model="sim-model",
                max_tokens=8,
                messages=[{"role": "user", "content": "x"}],
                extra_body=extra,
            )
        assert caught.value.body["type"] == "error"  # the SDK keeps the whole envelope
        assert caught.value.request_id.startswith("req_")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="sim-missing", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )

    s.configure(require_key="other")
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(
            model="sim-model", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )


# ---------------------------------------------------------------- admission's parser


def test_parse_anthropic_rate_limit_headers():
    now = time.time()
    later = datetime.fromtimestamp(now + 30, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    headers = CIMultiDict(
        {
            "Anthropic-RateLimit-Requests-Limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2020-01-01T00:00:00Z",  # past: 0
            "anthropic-ratelimit-tokens-limit": "96000",
            "anthropic-ratelimit-tokens-remaining": "95000",
            "anthropic-ratelimit-tokens-reset": later,
            "anthropic-ratelimit-input-tokens-limit": "80000",
            "retry-after": "7",
        }
    )
    info = parse_rate_limit_headers(headers)
    assert not info.empty
    assert (info.limit_requests, info.remaining_requests) == (50, 49)
    assert (info.limit_tokens, info.remaining_tokens) == (96000, 95000)
    assert info.reset_requests == 0.0
    assert info.reset_tokens == pytest.approx(30, abs=1.5)


def test_openai_headers_win_and_bad_resets_are_ignored():
    headers = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-reset-requests": "6s",
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-reset": "2020-01-01T00:00:00Z",
        "anthropic-ratelimit-tokens-reset": "soon",
    }
    info = parse_rate_limit_headers(headers)
    assert info.limit_requests == 10 and info.reset_requests == 6.0
    assert info.reset_tokens is None
    assert parse_rate_limit_headers({}).empty


def test_parse_reset_time_formats():
    now = datetime(2025, 8, 21, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_reset_time("2025-08-21T12:00:30Z", now) == 30
    assert parse_reset_time("2025-08-21T12:00:30.500Z", now) == 30.5
    assert parse_reset_time("2025-08-21T14:00:30+02:00", now) == 30
    assert parse_reset_time("2025-08-21T12:00:30", now) == 30  # no zone: UTC
    assert parse_reset_time("2025-08-21T11:00:00Z", now) == 0.0
    assert parse_reset_time("not a time", now) is None
    assert parse_reset_time("", now) is None
