"""Map body.model to an engine, by exact name first and then by glob ('*' matches any)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from lowtide.config import ModelRoute
from lowtide.engines.base import Engine


def build_engine(route: ModelRoute, cache_dir: Path) -> Engine:
    """The route's engine; one that speaks Chat Completions serves Messages lines through a
    translation, unless the route passes them through to an Anthropic-speaking upstream."""
    engine = _engine(route, cache_dir)
    if route.api == "anthropic" or route.engine == "embeddings":
        return engine
    from lowtide.engines.anthropic_messages import MessagesOverChat

    return MessagesOverChat(engine)


def _engine(route: ModelRoute, cache_dir: Path) -> Engine:
    if route.engine == "echo":
        from lowtide.engines.echo import EchoEngine

        return EchoEngine(route.name, route.max_concurrency, route.latency_ms)
    if route.engine == "embeddings":
        from lowtide.engines.embeddings import EmbeddingsEngine

        return EmbeddingsEngine(
            route.name,
            route.max_concurrency,
            route.model_path,
            route.batch_size,
            cache_dir=cache_dir,
        )
    if route.engine == "llamacpp":
        from lowtide.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(route, cache_dir)
    if route.http_client == "pyreqwest":
        from lowtide.engines.pyreqwest_http import PyreqwestEngine

        return PyreqwestEngine(route)
    from lowtide.engines.openai_http import OpenAIHttpEngine

    return OpenAIHttpEngine(route)


class Router:
    """Engines are built lazily, once per route, on first use."""

    def __init__(self, routes: list[ModelRoute], cache_dir: Path | None = None) -> None:
        self._cache_dir = cache_dir or Path(".")
        self._exact = {r.name: r for r in routes if not _is_pattern(r.name)}
        self._patterns = [r for r in routes if _is_pattern(r.name)]
        self._engines: dict[str, Engine] = {}

    def route_for(self, model: str) -> ModelRoute | None:
        route = self._exact.get(model)
        if route is not None:
            return route
        for candidate in self._patterns:
            if fnmatch.fnmatchcase(model, candidate.name):
                return candidate
        return None

    def route_named(self, name: str) -> ModelRoute | None:
        """The route configured under exactly this name (a pattern's name included)."""
        route = self._exact.get(name)
        if route is not None:
            return route
        return next((r for r in self._patterns if r.name == name), None)

    def config_problems(self) -> dict[str, str]:
        """Routes that cannot work as configured, by name: said at start and on /healthz."""
        problems = {}
        for route in [*self._exact.values(), *self._patterns]:
            if route.api_key_env and not os.environ.get(route.api_key_env):
                problems[route.name] = (
                    f"api_key_env names {route.api_key_env}, which is not set: requests would "
                    "go without a key"
                )
        return problems

    def served_models(self) -> list[str]:
        return [*self._exact, *(r.name for r in self._patterns)]

    def engine_for(self, route: ModelRoute) -> Engine:
        engine = self._engines.get(route.name)
        if engine is None:
            engine = self._engines[route.name] = build_engine(route, self._cache_dir)
        return engine

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()
        self._engines.clear()


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")
