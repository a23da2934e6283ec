"""Everything one running simulator holds; it lives on the aiohttp app so several can coexist."""

from __future__ import annotations

import random

from aiohttp import web

from lowtide_sim.capacity import DecodeEngine
from lowtide_sim.config import SimConfig
from lowtide_sim.limits import RateLimiter
from lowtide_sim.prefill import PrefillEngine
from lowtide_sim.stats import Metrics, Stats

__all__ = ["STATE", "SimState"]


class SimState:
    """Mutable per-app state: live config, seeded RNG for faults, stats, limits, prefill and decode engines."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.stats = Stats()
        self.metrics = Metrics()
        self.limiter = RateLimiter()
        self.engine = DecodeEngine(config)
        self.prefill = PrefillEngine(config)


STATE = web.AppKey("lowtide_sim_state", SimState)
