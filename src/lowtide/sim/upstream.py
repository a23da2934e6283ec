"""A simulated OpenAI-compatible upstream (stand-in for vLLM or a hosted provider).

Tests and benchmarks need a real HTTP server that answers like OpenAI, is fast,
deterministic, and can inject the failures a batch engine must survive (429s,
5xx, hung requests, dropped connections). It also counts how often each exact
request body arrived, so callers can check "at most N attempts per line".

Run it with ``python -m lowtide.sim.upstream --port 0``; once listening it prints
exactly one line ``READY http://HOST:PORT/v1`` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import random
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

__all__ = ["RUNTIME_FIELDS", "SimConfig", "build_app", "main", "serve"]


@dataclass
class SimConfig:
    """Every option of the simulator; CLI flags map 1:1 onto these fields."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    rate_drop: float = 0.0
    hang_seconds: float = 30.0
    retry_after: str = "0"
    require_key: str | None = None
    embedding_dim: int = 8
    models: list[str] = field(default_factory=lambda: ["sim-model"])


# Options that POST /sim/config may change while the server runs.
RUNTIME_FIELDS = frozenset(
    {
        "latency_ms",
        "latency_jitter_ms",
        "seed",
        "rate_429",
        "rate_500",
        "rate_timeout",
        "rate_drop",
        "hang_seconds",
        "retry_after",
    }
)
_RATE_FIELDS = ("rate_429", "rate_500", "rate_timeout", "rate_drop")

# Thresholds reported as "bodies_over" in /sim/stats.
_OVER_THRESHOLDS = (1, 2, 3)


class _Stats:
    """Counters for /sim/stats; bodies are kept as hash -> count to stay small."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.body_counts: dict[int, int] = {}
        self.max_per_body = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def note_body(self, raw: bytes) -> int:
        """Record one received body and return how often it has been seen so far."""
        self.requests += 1
        key = hash(raw)
        seen = self.body_counts.get(key, 0) + 1
        self.body_counts[key] = seen
        if seen > self.max_per_body:
            self.max_per_body = seen
        return seen

    def snapshot(self) -> dict[str, Any]:
        counts = self.body_counts.values()
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "distinct_bodies": len(self.body_counts),
            "max_per_body": self.max_per_body,
            "bodies_over": {str(k): sum(1 for c in counts if c > k) for k in _OVER_THRESHOLDS},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


class _State:
    """Mutable per-app state: live config, seeded RNG for faults, stats."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = _Stats()


STATE = web.AppKey("lowtide_sim_state", _State)

Builder = Callable[[dict[str, Any], str, SimConfig], dict[str, Any]]


# ---------------------------------------------------------------- helpers


def _new_hex() -> str:
    # Module-level RNG on purpose: ids must not disturb the seeded fault sequence.
    return f"{random.getrandbits(96):024x}"


def _tokens(text: str) -> int:
    """Cheap deterministic token estimate: whitespace-separated words, min 1."""
    return max(1, len(text.split()))


def _text(content: Any) -> str:
    """Flatten OpenAI message content (string or list of parts) to plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _retry_after_headers(value: str) -> dict[str, str]:
    headers = {"Retry-After": value}
    try:
        seconds = float(value)
    except ValueError:
        return headers  # e.g. an HTTP date: send it as-is
    if math.isfinite(seconds):
        headers["retry-after-ms"] = f"{seconds * 1000:g}"
    return headers


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------- endpoint bodies


def _chat(body: dict[str, Any], rid: str, cfg: SimConfig) -> dict[str, Any]:
    messages = body.get("messages")
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    user = [m for m in messages if m.get("role") == "user"] or messages
    answer = "echo: " + (_text(user[-1].get("content")) if user else "")
    prompt = max(1, sum(len(_text(m.get("content")).split()) for m in messages))
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt, _tokens(answer)),
        "system_fingerprint": "fp_lowtide_sim",
    }


def _completion(body: dict[str, Any], rid: str, cfg: SimConfig) -> dict[str, Any]:
    prompt = body.get("prompt", "")
    prompts = (
        prompt if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) else [prompt]
    )
    texts = ["echo: " + (p if isinstance(p, str) else orjson.dumps(p).decode()) for p in prompts]
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ],
        "usage": _usage(
            sum(_tokens(t) - 1 for t in texts) or 1,  # minus the "echo:" word
            sum(_tokens(t) for t in texts),
        ),
    }


def _vector(item: Any, dim: int) -> list[float]:
    """Unit vector seeded by a stable hash of the input (same input, same vector)."""
    data = item.encode() if isinstance(item, str) else orjson.dumps(item)
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    rng = random.Random(seed)
    vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _embedding(body: dict[str, Any], rid: str, cfg: SimConfig) -> dict[str, Any]:
    raw = body.get("input", "")
    if isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        inputs: list[Any] = [raw]  # a single pre-tokenized input
    elif isinstance(raw, list):
        inputs = raw
    else:
        inputs = [raw]
    dim = body.get("dimensions")
    if not isinstance(dim, int) or dim < 1:
        dim = cfg.embedding_dim
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    prompt = 0
    for i, item in enumerate(inputs):
        vec = _vector(item, dim)
        prompt += _tokens(item) if isinstance(item, str) else max(1, len(item))
        embedding: Any = vec
        if as_base64:  # what the openai SDK asks for by default
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", cfg.models[0]),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


def _response(body: dict[str, Any], rid: str, cfg: SimConfig) -> dict[str, Any]:
    raw = body.get("input", "")
    if isinstance(raw, list):
        items = [m for m in raw if isinstance(m, dict)]
        user = [m for m in items if m.get("role") == "user"] or items
        last = _text(user[-1].get("content")) if user else ""
        seen = " ".join(_text(m.get("content")) for m in items)
    else:
        last = seen = _text(raw)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        seen = instructions + " " + seen
    answer = "echo: " + last
    input_tokens, output_tokens = _tokens(seen), _tokens(answer)
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": instructions,
        "model": body.get("model", cfg.models[0]),
        "output": [
            {
                "type": "message",
                "id": f"msg_{rid}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


# ---------------------------------------------------------------- request handling


def _unauthorized(request: web.Request, cfg: SimConfig) -> bool:
    key = cfg.require_key
    return bool(key) and request.headers.get("Authorization") != f"Bearer {key}"


def _error_for_status(status: int, message: str, code: str | None, cfg: SimConfig):
    """Build an OpenAI-style error response; 429s carry Retry-After."""
    if status == 429:
        return _json(
            _error_body(message, "rate_limit_exceeded", code or "rate_limit_exceeded"),
            429,
            _retry_after_headers(cfg.retry_after),
        )
    if status >= 500:
        return _json(_error_body(message, "server_error", code), status)
    type_ = {401: "authentication_error", 403: "permission_error"}.get(
        status, "invalid_request_error"
    )
    return _json(_error_body(message, type_, code), status)


async def _handle_v1(request: web.Request, build: Builder) -> web.StreamResponse:
    """Shared path for every POST /v1/* endpoint: count, fault-inject, answer."""
    state = request.app[STATE]
    stats = state.stats
    raw = await request.read()
    seen = stats.note_body(raw)
    request["rid"] = rid = _new_hex()
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        label, response = await _answer(request, state, raw, seen, rid, build)
    finally:
        stats.in_flight -= 1
    if label is not None:
        stats.by_status[label] += 1
    return response


async def _answer(
    request: web.Request,
    state: _State,
    raw: bytes,
    seen: int,
    rid: str,
    build: Builder,
) -> tuple[str | None, web.StreamResponse]:
    """Decide the outcome of one request; returns (stats label, response).

    The label is None when the outcome was already counted (a hang is counted
    as "timeout" when it starts, so stats show it while the client waits).
    """
    cfg = state.config
    if _unauthorized(request, cfg):
        return "401", _error_for_status(401, "Incorrect API key provided.", "invalid_api_key", cfg)

    delay_ms = cfg.latency_ms
    if cfg.latency_jitter_ms:
        delay_ms += state.rng.uniform(0.0, cfg.latency_jitter_ms)
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)

    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        msg = "We could not parse the JSON body of your request."
        return "400", _error_for_status(400, msg, None, cfg)

    # Deterministic faults first, so they happen every time regardless of rates.
    if body.get("model") == "sim-missing":
        msg = "The model `sim-missing` does not exist or you do not have access to it."
        return "404", _error_for_status(404, msg, "model_not_found", cfg)
    fault = body.get("sim_fault")
    fail_first = body.get("sim_fail_first")
    if isinstance(fail_first, int):
        # Fail only the first N receipts of this exact body (default 500), so
        # retry paths can be tested without randomness.
        fault = (fault if isinstance(fault, int) else 500) if seen <= fail_first else None
    if isinstance(fault, int) and 400 <= fault <= 599:
        msg = f"Simulated failure with status {fault}."
        return str(fault), _error_for_status(fault, msg, "sim_fault", cfg)
    if body.get("stream"):
        msg = "Streaming is not supported by the simulator."
        return "400", _error_for_status(400, msg, None, cfg)

    # Random faults: one draw, mutually exclusive bands of width rate_*.
    label: str | None = "200"
    r = state.rng.random()
    if r < cfg.rate_drop:
        if request.transport is not None:
            request.transport.close()  # real FIN, no HTTP response at all
        # aiohttp tries to write this, sees the closed transport and gives up quietly.
        return "drop", web.Response(status=499)
    r -= cfg.rate_drop
    if r < cfg.rate_timeout:
        label = None
        state.stats.by_status["timeout"] += 1
        await asyncio.sleep(cfg.hang_seconds)
    else:
        r -= cfg.rate_timeout
        if r < cfg.rate_429:
            msg = "Rate limit reached for requests (simulated)."
            return "429", _error_for_status(429, msg, "rate_limit_exceeded", cfg)
        r -= cfg.rate_429
        if r < cfg.rate_500:
            status = state.rng.choice((500, 502, 503))
            msg = "The server had an error while processing your request (simulated)."
            return str(status), _error_for_status(status, msg, None, cfg)

    try:
        payload = build(body, rid, cfg)
    except (TypeError, ValueError, AttributeError, struct.error) as exc:
        msg = f"Invalid request body: {exc}"
        return "400", _error_for_status(400, msg, None, cfg)
    return label, _json(payload)


def _v1_route(build: Builder) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _handle_v1(request, build)

    return handler


async def _models(request: web.Request) -> web.Response:
    cfg = request.app[STATE].config
    if _unauthorized(request, cfg):
        return _error_for_status(401, "Incorrect API key provided.", "invalid_api_key", cfg)
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "lowtide-sim"} for m in cfg.models
    ]
    return _json({"object": "list", "data": data})


async def _unknown_v1(request: web.Request) -> web.Response:
    msg = f"Invalid URL ({request.method} {request.path})"
    return _error_for_status(404, msg, "unknown_url", request.app[STATE].config)


# ---------------------------------------------------------------- admin


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[STATE].stats.snapshot())


async def _reset(request: web.Request) -> web.Response:
    """Clear stats and reseed the RNG so a seeded run can be repeated."""
    state = request.app[STATE]
    state.stats = _Stats()
    state.rng.seed(state.config.seed)
    return _json({"ok": True})


def _apply_config(cfg: SimConfig, updates: dict[str, Any]) -> None:
    """Validate and apply runtime updates; raises ValueError on bad input."""
    unknown = set(updates) - RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"not changeable at runtime: {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name, value in updates.items():
        if name == "retry_after":
            checked[name] = str(value)
        elif name == "seed":
            checked[name] = None if value is None else int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number")
            if value < 0 or (name in _RATE_FIELDS and value > 1):
                raise ValueError(f"{name} out of range: {value}")
            checked[name] = float(value)
    for name, value in checked.items():
        setattr(cfg, name, value)


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        updates = orjson.loads(await request.read())
        if not isinstance(updates, dict):
            raise ValueError("body must be a JSON object")
        _apply_config(state.config, updates)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        return _json(_error_body(str(exc), "invalid_request_error", None), 400)
    if "seed" in updates:
        state.rng.seed(state.config.seed)
    return _json(asdict(state.config))


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get("rid") or _new_hex()
    response.headers.setdefault("x-request-id", f"req_{rid}")


def build_app(config: SimConfig | None = None) -> web.Application:
    """Create the aiohttp app; state lives on the app so several can coexist."""
    app = web.Application(client_max_size=64 * 1024**2)
    app[STATE] = _State(config or SimConfig())
    app.on_response_prepare.append(_add_request_id)
    app.router.add_post("/v1/chat/completions", _v1_route(_chat))
    app.router.add_post("/v1/completions", _v1_route(_completion))
    app.router.add_post("/v1/embeddings", _v1_route(_embedding))
    app.router.add_post("/v1/responses", _v1_route(_response))
    app.router.add_get("/v1/models", _models)
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_v1)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/config", _config)
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


# ---------------------------------------------------------------- CLI


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must be within 0..1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> SimConfig:
    defaults = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m lowtide.sim.upstream",
        description="Simulated OpenAI-compatible upstream with fault injection.",
    )
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--latency-jitter-ms", type=float, default=defaults.latency_jitter_ms)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--rate-429", type=_rate, default=0.0)
    p.add_argument("--rate-500", type=_rate, default=0.0, help="500/502/503 at random")
    p.add_argument("--rate-timeout", type=_rate, default=0.0, help="hang, then answer")
    p.add_argument("--rate-drop", type=_rate, default=0.0, help="close the TCP connection")
    p.add_argument("--hang-seconds", type=float, default=defaults.hang_seconds)
    p.add_argument("--retry-after", default=defaults.retry_after, help="seconds, may be fractional")
    p.add_argument("--require-key", default=None, help="demand 'Authorization: Bearer KEY'")
    p.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    p.add_argument(
        "--models", default=",".join(defaults.models), help="comma-separated ids for /v1/models"
    )
    args = p.parse_args(argv)
    values = vars(args)
    values["models"] = [m for m in args.models.split(",") if m] or defaults.models
    known = {f.name for f in fields(SimConfig)}
    return SimConfig(**{k: v for k, v in values.items() if k in known})


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import uvloop  # optional: roughly doubles throughput
    except ImportError:
        uvloop = None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    if uvloop is not None:
        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
