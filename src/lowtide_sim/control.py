"""Endpoints for whoever drives the simulator: /sim/stats, /sim/reset, /sim/config, /metrics."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from aiohttp import web

from lowtide_sim.config import ENGINE_FIELDS, apply_updates
from lowtide_sim.errors import error_body, json_response
from lowtide_sim.state import STATE
from lowtide_sim.stats import Stats, render_metrics

__all__ = ["add_control_routes"]


async def _stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snapshot = state.stats.snapshot()
    snapshot["running"] = len(state.engine.running)
    snapshot["waiting"] = len(state.engine.waiting)
    return json_response(snapshot)


async def _reset(request: web.Request) -> web.Response:
    """Clear stats, rate-limit buckets and the prefix cache, and reseed the RNG so a seeded run
    can be repeated."""
    state = request.app[STATE]
    state.stats = Stats()
    state.limiter.clear()
    state.prefill.reset()
    state.rng.seed(state.config.seed)
    return json_response({"ok": True})


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        updates = orjson.loads(await request.read())
        if not isinstance(updates, dict):
            raise ValueError("body must be a JSON object")
        state.engine.step()  # account decode progress at the old rates first
        apply_updates(state.config, updates)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        return json_response(error_body(str(exc), "invalid_request_error", None), 400)
    if "seed" in updates:
        state.rng.seed(state.config.seed)
    if "rpm" in updates or "tpm" in updates:
        state.limiter.clear()
    if any(name in updates for name in ENGINE_FIELDS):
        state.engine.step()
    return json_response(asdict(state.config))


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = state.engine
    engine.step()
    text = render_metrics(
        state.metrics, state.config.models[0], len(engine.running), len(engine.waiting)
    )
    return web.Response(
        body=text.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/config", _config)
    app.router.add_get("/metrics", _metrics)
