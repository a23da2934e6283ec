"""The aiohttp app: OpenAI's /v1 endpoints and Anthropic's /v1/messages, answered after limits,
latency and faults (messages.py has what differs on Anthropic's wire)."""

from __future__ import annotations

import asyncio
import math
import random
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from lowtide_sim import messages as anthropic
from lowtide_sim.batches import add_batch_routes
from lowtide_sim.config import SimConfig
from lowtide_sim.control import add_control_routes
from lowtide_sim.errors import error_body, error_response, json_response
from lowtide_sim.faults import DROP, HANG, MISSING_MODEL, delay_ms, draw_fault, requested_status
from lowtide_sim.limits import limits_on
from lowtide_sim.responses import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MESSAGES,
    RESPONSES,
    Endpoint,
    note_cached,
)
from lowtide_sim.state import STATE, SimState

__all__ = ["build_app", "serve"]


def _new_hex() -> str:
    # Module-level RNG on purpose: ids must not disturb the seeded fault sequence.
    return f"{random.getrandbits(96):024x}"


def _unauthorized(request: web.Request, cfg: SimConfig) -> bool:
    key = cfg.require_key
    return bool(key) and request.headers.get("Authorization") != f"Bearer {key}"


def _api_key(request: web.Request, endpoint: Endpoint | None = None) -> str:
    """The key rate limits are kept under: the bearer token (on /v1/messages x-api-key first)."""
    if endpoint is not None and endpoint.anthropic:
        return anthropic.api_key(request)
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _handle_v1(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """Shared path for every POST /v1/* endpoint: count, limit, fault-inject, answer."""
    state = request.app[STATE]
    stats = state.stats
    raw = await request.read()
    seen = stats.note_body(raw)
    request["rid"] = rid = _new_hex()
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        label, response = await _answer(request, state, raw, seen, rid, endpoint)
    finally:
        stats.in_flight -= 1
    if label is not None:
        stats.by_status[label] += 1
    cfg = state.config
    if limits_on(cfg) and not cfg.no_ratelimit_headers:
        headers = request.get("ratelimit")
        if headers is None:  # refused before admission (401): report without charging
            headers = state.limiter.peek(_api_key(request, endpoint), cfg, endpoint.anthropic)
        response.headers.update(headers)
    return response


def _rate_limited(
    request: web.Request, state: SimState, body: Any, endpoint: Endpoint
) -> web.Response | None:
    """Charge the request against its key's buckets; a 429 response when it does not fit."""
    cfg = state.config
    if isinstance(body, dict):
        try:
            cost = endpoint.prompt(body) + endpoint.max_out(body)
        except (TypeError, ValueError, AttributeError):
            cost = 1
        model = body.get("model")
    else:
        cost, model = 1, None
    if not isinstance(model, str):
        model = cfg.models[0]
    headers, refusal = state.limiter.admit(
        _api_key(request, endpoint), cost, cfg, model, endpoint.anthropic
    )
    request["ratelimit"] = headers
    if refusal is None:
        return None
    kind, message, wait = refusal
    state.stats.rate_limited += 1
    if endpoint.anthropic:
        return anthropic.rate_limited(kind, model, wait, cfg, request["rid"])
    retry = {
        "retry-after": str(max(1, math.ceil(wait - 1e-9))),
        "retry-after-ms": str(max(1, math.ceil(wait * 1000 - 1e-6))),
    }
    return json_response(error_body(message, kind, "rate_limit_exceeded"), 429, retry)


def _error(
    endpoint: Endpoint, status: int, message: str, code: str | None, cfg: SimConfig, rid: str
) -> web.Response:
    """An error in the endpoint's envelope: OpenAI's, or Anthropic's for /v1/messages."""
    if not endpoint.anthropic:
        return error_response(status, message, code, cfg)
    headers = {"retry-after": cfg.retry_after} if status == 429 else None
    return anthropic.error_response(status, message, rid, headers)


async def _answer(
    request: web.Request,
    state: SimState,
    raw: bytes,
    seen: int,
    rid: str,
    endpoint: Endpoint,
) -> tuple[str | None, web.StreamResponse]:
    """Decide the outcome of one request; returns (stats label, response).

    The label is None when the outcome was already counted (a hang is counted
    as "timeout" when it starts, so stats show it while the client waits).
    """
    cfg = state.config
    if endpoint.anthropic:
        if anthropic.unauthorized(request, cfg):
            return "401", anthropic.error_response(401, "invalid x-api-key", rid)
        if anthropic.missing_version(request):
            msg = "anthropic-version: header is required"
            return "400", anthropic.error_response(400, msg, rid)
    elif _unauthorized(request, cfg):
        return "401", error_response(401, "Incorrect API key provided.", "invalid_api_key", cfg)

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None

    if limits_on(cfg):
        refused = _rate_limited(request, state, body, endpoint)
        if refused is not None:
            return "429", refused

    delay = delay_ms(cfg, state.rng)
    if delay > 0:
        await asyncio.sleep(delay / 1000)

    if not isinstance(body, dict):
        msg = "We could not parse the JSON body of your request."
        return "400", _error(endpoint, 400, msg, None, cfg, rid)

    # Deterministic faults first, so they happen every time regardless of rates.
    if body.get("model") == MISSING_MODEL:
        if endpoint.anthropic:
            msg = f"model: {MISSING_MODEL}"
        else:
            msg = f"The model `{MISSING_MODEL}` does not exist or you do not have access to it."
        return "404", _error(endpoint, 404, msg, "model_not_found", cfg, rid)
    status = requested_status(body, seen)
    if status is not None:
        msg = f"Simulated failure with status {status}."
        return str(status), _error(endpoint, status, msg, "sim_fault", cfg, rid)
    if body.get("stream"):
        msg = "Streaming is not supported by the simulator."
        return "400", _error(endpoint, 400, msg, None, cfg, rid)
    if endpoint.anthropic:
        problem = anthropic.validate(body)
        if problem is not None:
            return "400", anthropic.error_response(400, problem, rid)

    label: str | None = "200"
    fault = draw_fault(cfg, state.rng)
    if fault == DROP:
        if request.transport is not None:
            request.transport.close()  # real FIN, no HTTP response at all
        # aiohttp tries to write this, sees the closed transport and gives up quietly.
        return "drop", web.Response(status=499)
    if fault == HANG:
        label = None
        state.stats.by_status["timeout"] += 1
        await asyncio.sleep(cfg.hang_seconds)
    elif fault == 429:
        msg = "Rate limit reached for requests (simulated)."
        return "429", _error(endpoint, 429, msg, "rate_limit_exceeded", cfg, rid)
    elif isinstance(fault, int):
        if endpoint.anthropic:
            fault = anthropic.fault_status(fault)
            msg = (
                "Overloaded (simulated)." if fault == 529 else "Internal server error (simulated)."
            )
        else:
            msg = "The server had an error while processing your request (simulated)."
        return str(fault), _error(endpoint, fault, msg, None, cfg, rid)

    cached = 0
    if endpoint.prompt_words is not None and state.prefill.active:
        words = endpoint.prompt_words(body)
        cached = await state.prefill.prefill(words)
        state.metrics.prefix_cache_queries += len(words)
        state.metrics.prefix_cache_hits += cached
        state.stats.cached_tokens_total += cached

    n_out: int | None = None
    engine = state.engine
    if endpoint.out_fields and engine.active:
        n_out = endpoint.max_out(body)
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            priority = 0
        n_seq = max(1, endpoint.sequences(body))
        if n_seq == 1:
            await engine.generate(n_out, priority)
        else:
            await asyncio.gather(*(engine.generate(n_out, priority) for _ in range(n_seq)))

    try:
        payload = endpoint.build(body, rid, cfg, n_out)
    except (TypeError, ValueError, AttributeError, struct.error) as exc:
        msg = f"Invalid request body: {exc}"
        return "400", _error(endpoint, 400, msg, None, cfg, rid)
    note_cached(payload, cached)
    _count_success(state, payload)
    return label, json_response(payload)


def _count_success(state: SimState, payload: dict[str, Any]) -> None:
    usage = payload.get("usage") or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    state.stats.prompt_tokens_total += prompt
    state.stats.completion_tokens_total += completion
    metrics = state.metrics
    metrics.prompt_tokens += prompt
    metrics.generation_tokens += completion
    choices = payload.get("choices")
    if choices:
        finish = choices[0].get("finish_reason", "stop")
    else:  # Anthropic's stop_reason, named as vLLM's finished_reason
        finish = "length" if payload.get("stop_reason") == "max_tokens" else "stop"
    metrics.success[finish or "stop"] += 1


def _v1_route(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle_v1(request, endpoint)

    return handler


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[STATE].config
    if _unauthorized(request, cfg):
        return error_response(401, "Incorrect API key provided.", "invalid_api_key", cfg)
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "lowtide-sim"} for m in cfg.models
    ]
    return json_response({"object": "list", "data": data})


def _anthropic_path(request: web.Request) -> bool:
    return request.path == "/v1/messages" or request.path.startswith("/v1/messages/")


async def _unknown_v1(request: web.Request) -> web.Response:
    msg = f"Invalid URL ({request.method} {request.path})"
    if _anthropic_path(request):
        request["rid"] = rid = request.get("rid") or _new_hex()
        return anthropic.error_response(404, f"Not found: {request.method} {request.path}", rid)
    return error_response(404, msg, "unknown_url", request.app[STATE].config)


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get("rid") or _new_hex()
    response.headers.setdefault("x-request-id", f"req_{rid}")
    if _anthropic_path(request):
        response.headers.setdefault("request-id", f"req_{rid}")


def build_app(config: SimConfig | None = None) -> web.Application:
    """Create the aiohttp app; state lives on the app so several can coexist."""
    app = web.Application(client_max_size=64 * 1024**2)
    app[STATE] = SimState(config or SimConfig())
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", _v1_route(CHAT))
    app.router.add_post("/v1/completions", _v1_route(COMPLETIONS))
    app.router.add_post("/v1/embeddings", _v1_route(EMBEDDINGS))
    app.router.add_post("/v1/responses", _v1_route(RESPONSES))
    app.router.add_post("/v1/messages", _v1_route(MESSAGES))
    app.router.add_get("/v1/models", _models)
    add_batch_routes(app)  # /v1/files, /v1/batches: before the catch-all below
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_v1)
    add_control_routes(app)
    return app


async def serve(config: SimConfig, stop: asyncio.Event | None = None) -> None:
    """Listen, print the READY line, and run until ``stop`` is set or cancelled."""
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        if ":" in host:
            host = f"[{host}]"
        sys.stdout.write(f"READY http://{host}:{port}/v1\n")
        sys.stdout.flush()
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
