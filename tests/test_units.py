"""Mechanisms that deserve direct tests: durations, retry hints, shard cutting, result lines."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import chat_line, jsonl

from lowtide.config import BatchLimits, ModelRoute, parse_duration
from lowtide.engines.base import EngineResponse
from lowtide.engines.openai_http import answer_body, parse_retry_after
from lowtide.engines.router import Router, build_engine
from lowtide.engines.usage import read_tokens, tokens_of
from lowtide.runner import segment_lines
from lowtide.runner.duplicates import DuplicateFinder
from lowtide.runner.results import error_line, response_line, usage_of
from lowtide.runner.retry import backoff_seconds, is_retryable_status
from lowtide.runner.segment_lines import ResultLine
from lowtide.runner.validation import FileValidator, confirm_duplicates, iter_request_lines
from lowtide.vocabulary import ENDPOINTS


def test_parse_duration():
    assert parse_duration("24h") == 86400
    assert parse_duration("90m") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1.5s") == 1.5
    for bad in ("", "24", "h", "3w", "-1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": future}) <= 31
    assert parse_retry_after({"retry-after": "garbage"}) is None
    assert parse_retry_after({}) is None


def test_retry_policy():
    assert all(is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable_status(s) for s in (400, 401, 403, 404, 422))
    for attempt in range(10):
        assert 0 <= backoff_seconds(attempt, 0.5, 30, None) <= 30
    assert backoff_seconds(0, 0.5, 30, retry_after=7) >= 7  # Retry-After is a floor


def _validate(raw: bytes, endpoint: str = "/v1/chat/completions", **limits):
    v = FileValidator(
        endpoint, lambda m: ENDPOINTS if m in ("m", "sim-model") else None, BatchLimits(**limits)
    )
    for i in range(0, len(raw), 7):  # tiny chunks: lines split across chunk borders
        v.feed(raw[i : i + 7])
    return v.finish()


def test_shards_cover_every_request_exactly_once():
    lines = [chat_line(f"c{i}", "x" * (i % 13), model="m") for i in range(23)]
    raw = jsonl(lines[:10]) + b"\n\n" + jsonl(lines[10:])
    result = _validate(raw, shard_lines=4)
    assert result.total == 23 and not result.errors
    seen = []
    for shard in result.shards:
        requests = iter_request_lines(raw[shard["byte_start"] : shard["byte_end"]])
        assert len(requests) == shard["request_count"] <= 4
        assert shard["first_request"] == len(seen)
        seen += [orjson.loads(r)["custom_id"] for r in requests]
    assert seen == [f"c{i}" for i in range(23)]
    assert result.shards[3]["first_line"] == 15  # two blank lines before line 13


def test_shards_cut_on_bytes_too():
    lines = [chat_line(f"c{i}", "y" * 600, model="m") for i in range(10)]
    result = _validate(jsonl(lines), shard_lines=1000, shard_bytes=2048)
    assert len(result.shards) >= 3
    assert sum(s["request_count"] for s in result.shards) == 10


def test_file_without_final_newline():
    raw = jsonl([chat_line("a", "x", model="m"), chat_line("b", "y", model="m")]).rstrip(b"\n")
    result = _validate(raw)
    assert result.total == 2 and result.shards[-1]["byte_end"] == len(raw)


def test_duplicates_found_by_hash_then_named_by_line():
    raw = jsonl([chat_line(i, "x", model="m") for i in ("a", "b", "a", "c", "b", "a")])
    result = _validate(raw)
    assert result.possible_duplicates == [(3, 1), (5, 2), (6, 1)]

    async def chunks():
        yield raw

    found = asyncio.run(confirm_duplicates(chunks(), result.possible_duplicates))
    assert [(e["line"], e["code"]) for e in found] == [
        (3, "duplicate_custom_id"),
        (5, "duplicate_custom_id"),
        (6, "duplicate_custom_id"),
    ]
    assert "already used on line 1" in found[0]["message"]
    # A hash collision between different ids is not reported.
    assert asyncio.run(confirm_duplicates(chunks(), [(4, 2)])) == []


@pytest.mark.parametrize("memory_entries", [1 << 18, 1000])
def test_duplicate_finder_spills_to_disk_and_agrees_with_brute_force(tmp_path, memory_entries):
    """Small ids repeat often; with 1000 entries in memory the finder spills 50 times."""
    import random

    rng = random.Random(7)
    ids = [hash(f"id-{rng.randrange(40_000)}") for _ in range(50_000)]
    finder = DuplicateFinder(memory_entries=memory_entries, spill_root=str(tmp_path))
    for line, value in enumerate(ids, start=1):
        finder.add(value, line)
    first_seen: dict[int, int] = {}
    expected = []
    for line, value in enumerate(ids, start=1):
        if value in first_seen:
            expected.append((line, first_seen[value]))
        else:
            first_seen[value] = line
    assert len(expected) > 5000
    assert finder.repeats(100_000) == expected
    assert finder.repeats(25) == expected[:25]
    finder.close()
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone


def test_error_cap_and_empty():
    result = _validate(b"{bad\n" * 50, max_errors_reported=10)
    assert len(result.errors) == 10 and result.error_count == 50
    assert _validate(b"\n \n").errors[0]["code"] == "empty_batch"


def test_usage_from_every_endpoint_shape():
    chat = {
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 3},
        }
    }
    u = usage_of(chat)
    assert (u.input_tokens, u.output_tokens, u.cached_tokens, u.reasoning_tokens) == (5, 7, 2, 3)
    responses = {
        "usage": {
            "input_tokens": 4,
            "output_tokens": 6,
            "input_tokens_details": {"cached_tokens": 1},
        }
    }
    u = usage_of(responses)
    assert (u.input_tokens, u.output_tokens, u.cached_tokens) == (4, 6, 1)
    assert usage_of({"usage": {"prompt_tokens": 9, "total_tokens": 9}}).input_tokens == 9
    assert usage_of(None).input_tokens == 0 and usage_of({"usage": "weird"}).output_tokens == 0


def test_token_counts_read_from_bytes_match_the_parsed_reading():
    """An answer's counts read straight from its bytes are the parsed body's, or not read there
    at all (None: the body is parsed), whatever the usage holds."""
    usages: list[Any] = [
        None,
        "weird",
        [],
        {},
        {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        {"input_tokens": 4, "output_tokens": 6, "input_tokens_details": {"cached_tokens": 1}},
        {"input_tokens": None, "prompt_tokens": 9, "output_tokens": 2},
        {"prompt_tokens": -3, "completion_tokens": 0},
        {"prompt_tokens": 2.0, "completion_tokens": True},
        {"prompt_tokens": 2**63, "completion_tokens": 2**64 + 5},
        {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": None}},
        {"prompt_tokens": 1, "prompt_tokens_details": {}, "input_tokens_details": {}},
        {"prompt_tokens": 8, "prompt_tokens_details": {"cached_tokens": 3}},
        {"input_tokens_details": {}, "prompt_tokens_details": {"cached_tokens": 3}},
        {"input_tokens_details": None, "prompt_tokens_details": {"cached_tokens": 3}},
        {"prompt_tokens_details": "x", "completion_tokens_details": [1]},
        {"completion_tokens_details": {"reasoning_tokens": 4, "audio_tokens": 1}},
        {"output_tokens_details": {"reasoning_tokens": -1}, "output_tokens": 3},
    ]
    read_here = 0
    for usage in usages:
        for body in ({"id": "x", "choices": [{"text": "é ✓"}], "usage": usage}, {"usage": usage}):
            raw = json.dumps(body, ensure_ascii=False).encode()  # orjson refuses 2**64
            tokens = read_tokens(raw)
            if tokens is not None:
                read_here += 1
                assert tokens == tokens_of(orjson.loads(raw)), raw
    assert read_here >= 16  # the usual shapes are read from the bytes
    assert read_tokens(b'{"usage": {"prompt_tokens": 3}}') == (3, 0, 0, 0)
    hosted = {
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 5, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0},
    }
    assert read_tokens(orjson.dumps({"usage": hosted})) == (9, 4, 5, 2)
    for not_an_object in (b"[1]", b"null", b'"ok"', b"", b'{"a":1,}'):
        assert read_tokens(not_an_object) is None


def test_answers_are_parsed_as_orjson_reads_them_and_small_ones_count_from_bytes():
    raw = orjson.dumps({"id": "c", "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    kept = answer_body(200, raw + b"\n", "req_1")
    assert kept.body == orjson.loads(raw) and kept.body_json == raw and kept.tokens == (3, 1, 0, 0)
    kept.body = {"replaced": True}  # a translation replaces it: its bytes and counts go too
    assert kept.body_json is None and kept.tokens is None
    pretty = answer_body(200, b'{\n  "id": "c"\n}', None)  # spans lines: parsed, encoded again
    assert pretty.parsed == {"id": "c"} and pretty.body_json is None
    # What orjson refuses is no answer, whatever msgspec would skip: a number past a double's
    # range, invalid UTF-8, a cut-off body.
    for broken in (b'{"id": "c"', b'{"x": 1e400, "usage": {}}', b'{"x": "\xff", "usage": {}}'):
        answered = answer_body(200, broken, None)
        assert answered.status_code == 502 and answered.body["error"]["type"] == "upstream_error"
    deep = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b',"usage":{"prompt_tokens":1}}'
    nested = answer_body(200, deep, None)  # deeper than msgspec reads: counted from the dicts
    assert nested.status_code == 200 and nested.tokens is None and nested.body["usage"]
    refused = answer_body(429, b'{"error": {"message": "slow down"}}', None)
    assert refused.parsed == {"error": {"message": "slow down"}} and refused.tokens == (0, 0, 0, 0)


def test_result_line_shapes():
    ok = response_line("batch_req_1", "c1", EngineResponse(200, {"x": 1}, "req_9"))
    assert ok.ok
    assert orjson.loads(ok.line) == {
        "id": "batch_req_1",
        "custom_id": "c1",
        "error": None,
        "response": {"status_code": 200, "request_id": "req_9", "body": {"x": 1}},
    }
    bad = orjson.loads(
        response_line(
            "i", "c", EngineResponse(400, {"error": {"message": "no", "code": "bad_thing"}})
        ).line
    )
    assert bad["response"]["status_code"] == 400 and bad["error"] == {
        "code": "bad_thing",
        "message": "no",
    }
    # An answer kept as the upstream's bytes is written into the same shape, byte for byte,
    # whatever the custom_id holds.
    body = {"id": "c", "choices": [{"message": {"content": 'say "hi"\n'}}]}
    for custom_id in ('a"b\\c', "ünï\u2028code ✓", "x" * 300):
        kept = EngineResponse(200, body, "req_9", body_json=orjson.dumps(body))
        decoded = EngineResponse(200, body, "req_9")
        assert response_line("batch_req_1", custom_id, kept) == response_line(
            "batch_req_1", custom_id, decoded
        )
    odd = orjson.loads(response_line("i", "c", EngineResponse(503, "text")).line)
    assert odd["error"]["code"] == "http_503"
    gone_line = error_line("i", "c", "batch_expired", "late")
    gone = orjson.loads(gone_line.line)
    assert (
        not gone_line.ok and gone["response"] is None and gone["error"]["code"] == "batch_expired"
    )


def test_segment_lines_round_trip():
    lines = [ResultLine(True, b'{"a":1}'), ResultLine(False, b'{"b":2}'), ResultLine(True, b"{}")]
    assert list(segment_lines.decode(segment_lines.encode(lines))) == lines
    views = segment_lines.decode_views(segment_lines.encode(lines))
    assert [ResultLine(ok, bytes(view)) for ok, view in views] == lines
    assert list(segment_lines.decode(b"")) == []


def test_router_exact_then_glob():
    router = Router(
        [
            ModelRoute(name="gpt-*", engine="echo"),
            ModelRoute(name="gpt-4o-mini", engine="echo"),
            ModelRoute(name="*", engine="echo", max_concurrency=3),
        ]
    )
    assert router.route_for("gpt-4o-mini").name == "gpt-4o-mini"
    assert router.route_for("gpt-5").name == "gpt-*"
    assert router.route_for("llama").name == "*"
    assert Router([ModelRoute(name="a", engine="echo")]).route_for("b") is None


def test_local_blob_listing_and_dead_writes(tmp_path):
    from lowtide.blobs.local import LocalBlobStore

    store = LocalBlobStore(tmp_path)

    async def scenario():
        await store.put("segments/b2/0.jsonl", b"y")
        await store.put("segments/b1/1.jsonl", b"x")
        await store.put("files/f1", b"z")
        assert [k async for k, _ in store.list_keys("segments/")] == [
            "segments/b1/1.jsonl",
            "segments/b2/0.jsonl",
        ]
        assert [k async for k, _ in store.list_keys("nothing-here/")] == []
        dead = await store.writer("files/f2")
        await dead.write(b"half")  # the process "dies" here: a temp file stays behind
        assert await store.sweep_incomplete(3600) == 0
        assert await store.sweep_incomplete(0) == 1
        assert not await store.exists("files/f2")
        assert [k async for k, _ in store.list_keys("files/")] == ["files/f1"]

    asyncio.run(scenario())


def test_local_blob_keys_stay_inside_the_store(tmp_path):
    """A key is checked lexically (no stat per folder): ".." that walks out, an absolute path or
    the root itself is refused before any file is touched; ".." that stays inside is fine."""
    from lowtide.blobs.local import LocalBlobStore

    store = LocalBlobStore(tmp_path / "blobs")
    (tmp_path / "secret").write_bytes(b"operator's")

    async def scenario() -> None:
        for key in ("../secret", "files/../../secret", "/etc/passwd", "", ".", "files/.."):
            with pytest.raises(ValueError, match="escapes the store"):
                await store.read(key)
        await store.put("files/a/../b", b"inside")
        assert await store.read("files/b") == b"inside"

    asyncio.run(scenario())


def test_local_blobs_under_a_relative_folder(tmp_path, monkeypatch):
    """`make run` passes a relative --data-dir: listing must still work (the sweeper uses it)."""
    from lowtide.blobs.local import LocalBlobStore

    monkeypatch.chdir(tmp_path)
    store = LocalBlobStore(Path("data/blobs"))

    async def scenario() -> list[str]:
        await store.put("segments/b1/0000000-0000000-x.jsonl", b"o{}\n")
        return [key async for key, _ in store.list_keys("segments/")]

    assert asyncio.run(scenario()) == ["segments/b1/0000000-0000000-x.jsonl"]


def test_answer_headers_read_in_one_pass_match_a_case_insensitive_lookup():
    """Rate limits, retry hints and the request id come out of the raw header bytes lowercased,
    the first of a repeated name kept (as a lookup in the parsed headers gives it)."""
    from lowtide.engines.openai_http import parse_retry_after, read_answer_headers

    raw = (
        (b"Content-Type", b"application/json"),
        (b"X-RateLimit-Limit-Requests", b"600"),
        (b"x-ratelimit-remaining-tokens", b"9000"),
        (b"Anthropic-RateLimit-Tokens-Remaining", b"12"),
        (b"Retry-After", b"7"),
        (b"retry-after", b"99"),
        (b"X-Request-ID", b"req_abc"),
        (b"Server", b"x-ratelimit-not-a-header-name"),
    )
    limits, hints = read_answer_headers(raw)
    assert limits == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-tokens": "9000",
        "anthropic-ratelimit-tokens-remaining": "12",
    }
    assert hints == {"retry-after": "7", "x-request-id": "req_abc"}
    assert parse_retry_after(hints) == 7.0
    assert read_answer_headers(((b"Retry-After-Ms", b"250"),))[1] == {"retry-after-ms": "250"}
    assert read_answer_headers(()) == ({}, {})


async def _upstream(handler: Any) -> tuple[Any, str]:
    """A one-route upstream (POST /v1/chat/completions) on a free port: (runner, base URL)."""
    from aiohttp import web

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1"


def test_deadlines_time_out_late_requests_and_leave_other_cancels_alone():
    """The one sweep that keeps a route's timeout: a request past its time is cancelled and
    reported as timed out; one also cancelled from elsewhere at the same time stays a cancel
    (a shard stopping must stop it); one that ended in time is never touched; a cancel that
    something inside the request swallowed is sent again, and the task (a lane runs many
    requests) is left with no cancel pending either way."""
    from lowtide.engines.deadlines import Deadlines

    async def request(deadlines: Deadlines, seconds: float, swallow: bool = False) -> str:
        task = deadlines.enter()
        try:
            if swallow:  # as a happy-eyeballs race awaiting its losers under suppress()
                try:
                    await asyncio.sleep(seconds)
                except asyncio.CancelledError:
                    pass
            await asyncio.sleep(seconds)
            return "answered"
        except asyncio.CancelledError:
            if deadlines.timed_out(task):
                return "timed out"
            raise
        finally:
            deadlines.leave(task)

    async def lane(deadlines: Deadlines) -> list[str]:
        """Requests one after another in one task, as a shard's lane sends them."""
        said = [await request(deadlines, 5, swallow=True), await request(deadlines, 5)]
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        return said + [await request(deadlines, 0)]

    async def scenario() -> None:
        deadlines = Deadlines(0.2)
        deadlines.start()
        try:
            fast = asyncio.create_task(request(deadlines, 0.05))
            slow = asyncio.create_task(request(deadlines, 5))
            assert await fast == "answered"
            started = time.monotonic()
            assert await slow == "timed out"
            assert time.monotonic() - started < 1.0
            assert await lane(deadlines) == ["timed out", "timed out", "answered"]
            both = asyncio.create_task(request(deadlines, 5))
            await asyncio.sleep(0)  # it has started its request
            deadlines.cancel_late(time.monotonic() + 10)  # a sweep cancels it...
            both.cancel()  # ...and so does a stop, before it runs again
            with pytest.raises(asyncio.CancelledError):
                await both
            assert not deadlines._due and not deadlines._expired
            assert await request(deadlines, 0) == "answered"
        finally:
            await deadlines.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("client", ["aiohttp", "pyreqwest"])
def test_upstream_requests_time_out_at_the_routes_timeout_and_cancels_stay_cancels(client):
    """The HTTP engine keeps each request to the route's `timeout`: a request still unanswered
    then fails as `request_timeout` (retried like any transient failure), one answered in time
    is untouched, a cancel from elsewhere (a shard stopping) stays a cancel, and an upstream
    that is not there fails as `connection_error`; on either HTTP client."""
    from aiohttp import web

    from lowtide.engines.base import TransientEngineError

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(body.get("sleep", 0))
        return web.json_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def scenario() -> None:
        runner, base_url = await _upstream(answer)
        route = ModelRoute(
            name="m",
            engine="openai",
            base_url=base_url,
            timeout=0.4,
            http_client=client,
        )
        engine = build_engine(route, Path("."))
        used = {"aiohttp": "OpenAIHttpEngine", "pyreqwest": "PyreqwestEngine"}[client]
        assert type(engine.inner).__name__ == used  # type: ignore[attr-defined]
        try:
            started = time.monotonic()
            slow = asyncio.create_task(engine.execute("/v1/chat/completions", {"sleep": 2}))
            fast = await engine.execute("/v1/chat/completions", {"sleep": 0.1})
            assert fast.status_code == 200 and fast.body["usage"]["prompt_tokens"] == 1
            with pytest.raises(TransientEngineError) as err:
                await slow
            assert err.value.code == "request_timeout"
            assert 0.4 <= time.monotonic() - started < 2.0
            stopped = asyncio.create_task(engine.execute("/v1/chat/completions", {"sleep": 2}))
            await asyncio.sleep(0.1)
            stopped.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopped
            again = await engine.execute("/v1/chat/completions", {})
            assert again.status_code == 200
            gone = build_engine(
                route.model_copy(update={"base_url": "http://127.0.0.1:9"}), Path(".")
            )
            with pytest.raises(TransientEngineError) as err:
                await gone.execute("/v1/chat/completions", {})
            assert err.value.code == "connection_error"
            await gone.close()
        finally:
            await engine.close()
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize("client", ["aiohttp", "pyreqwest"])
def test_result_lines_carry_the_upstreams_answer_bytes_unless_they_span_lines(client):
    """An answer that parsed goes into its result line as the upstream sent it (not decoded and
    encoded again: an embedding's floats keep their digits), without a trailing newline; a
    pretty-printed answer is encoded again as one line; a body replaced here (the Messages
    translation) is written as replaced."""
    from aiohttp import web

    compact = b'{"object":"list","data":[{"embedding":[0.1000000000000000055511151231257827]}]}'
    pretty = b'{\n  "usage": {"prompt_tokens": 3}\n}\n'
    chat = (
        b'{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1}}'
    )
    answers = {"compact": compact + b"\n", "pretty": pretty, "chat": chat, "bad": b'{"a":'}

    async def answer(request: web.Request) -> web.Response:
        kind = (await request.json())["model"]
        status = 500 if kind == "bad" else 200
        return web.Response(body=answers[kind], status=status, content_type="application/json")

    async def scenario() -> None:
        runner, base_url = await _upstream(answer)
        route = ModelRoute(name="m", engine="openai", base_url=base_url, http_client=client)
        engine = build_engine(route, Path("."))
        try:

            async def line(kind: str, endpoint: str = "/v1/chat/completions") -> bytes:
                body = {"model": kind, "max_tokens": 8}
                body["messages"] = [{"role": "user", "content": "hello"}]
                response = await engine.execute(endpoint, body)  # Messages: translated
                result = response_line("i", "c", response).line
                assert b"\n" not in result and orjson.loads(result)["custom_id"] == "c"
                return result

            spliced = await line("compact")
            assert b'"body":' + compact + b"}" in spliced  # the upstream's digits, as sent
            assert orjson.loads(spliced)["response"]["body"] == orjson.loads(compact)
            again = orjson.loads(await line("pretty"))
            assert again["response"]["body"] == {"usage": {"prompt_tokens": 3}}
            broken = orjson.loads(await line("bad"))
            assert broken["response"]["status_code"] == 500
            assert "non-JSON body" in broken["error"]["message"]
            message = orjson.loads(await line("chat", "/v1/messages"))["response"]["body"]
            assert message["type"] == "message" and message["content"][0]["text"] == "hi"
        finally:
            await engine.close()
            await runner.cleanup()

    asyncio.run(scenario())
