"""Prefill and a prefix cache (``--prefill-tokens-per-s P``, ``--prefix-cache-tokens C``).

vLLM and SGLang keep the KV blocks of recent prompts and skip the prefill of a prompt's
longest cached prefix (automatic prefix caching, least recently used blocks evicted first).
With P > 0 the simulator does the same with its own tokens (whitespace-separated words): a
prompt is cut into blocks of ``BLOCK`` tokens, each block's key chained to the one before, so
a block matches only when the whole prompt up to it matches. The cached prefix is the longest
run of leading blocks found in the cache, which holds at most C tokens. What is not cached is
prefilled at P tokens per second, one request after another (prefill is compute-bound: requests
queue for it), before decoding starts. The cached count goes into the answer's usage.

Blocks enter the cache when their request is admitted to prefill (a request queued behind one
with the same prefix finds it cached, as it would once the first one's prefill is done).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from lowtide_sim.config import SimConfig

__all__ = ["BLOCK", "PrefillEngine"]

BLOCK = 16  # tokens per cached block (vLLM's default block size)


class PrefillEngine:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._free_at = 0.0  # loop time when the prefill queue is empty again

    @property
    def active(self) -> bool:
        return self.cfg.prefill_tokens_per_s > 0

    def lookup(self, words: list[str]) -> int:
        """Tokens of the longest cached prefix of ``words``; the prompt's blocks become the most
        recently used (new ones are added, the oldest evicted past the capacity)."""
        capacity = self.cfg.prefix_cache_tokens // BLOCK
        if capacity <= 0:
            self._blocks.clear()
            return 0
        blocks = self._blocks
        key = 0
        cached = 0
        matching = True
        for start in range(0, len(words) - BLOCK + 1, BLOCK):
            key = hash((key, *words[start : start + BLOCK]))
            if key in blocks:
                blocks.move_to_end(key)
                if matching:
                    cached += BLOCK
            else:
                matching = False
                blocks[key] = None
        while len(blocks) > capacity:
            blocks.popitem(last=False)
        return cached

    async def prefill(self, words: list[str]) -> int:
        """Wait for the prefill of the uncached part of the prompt; returns the cached tokens."""
        cached = self.lookup(words)
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._free_at)
        self._free_at = start + (len(words) - cached) / self.cfg.prefill_tokens_per_s
        await asyncio.sleep(self._free_at - now)
        return cached

    def reset(self) -> None:
        self._blocks.clear()
