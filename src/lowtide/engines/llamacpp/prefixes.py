"""Shared prompt prefixes: which slot's KV cells a new sequence can start from.

Classification and extraction batches repeat one long instruction before a short document. Each
slot of the decoder keeps the KV cells of its last prompt after that sequence ends, so a new
sequence whose prompt starts the same way decodes only what differs: in its own slot (the cells
are already there: drop the rest) or, when another slot holds a longer common prefix, in a copy
of that slot's cells (llama.cpp's `llama_memory_seq_cp`: with one KV stream per slot, a copy of
the whole stream, then the tail is dropped).

Prompts are indexed in blocks of `BLOCK` tokens: a block's key is a hash of the whole prefix up
to its end (a chain, as vLLM's prefix cache does), so "some slot holds the first k blocks of this
prompt" is one dictionary lookup and the longest such k is a binary search. The exact common
length is then counted token by token against the slot's own tokens (and checked, so a hash
collision can never reuse the wrong cells).

This module is bookkeeping only (no llama.cpp calls): the decoder thread owns it and acts on
its answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

BLOCK = 16  # tokens per indexed block

__all__ = ["BLOCK", "PrefixCache", "Plan", "block_chain"]


def block_chain(tokens: Sequence[int]) -> list[int]:
    """The key of every full block of `tokens`: a hash of all the tokens up to the block's end."""
    keys: list[int] = []
    key = 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        key = hash((key, *tokens[end - BLOCK : end]))
        keys.append(key)
    return keys


class Plan:
    """Where a sequence goes: `slot`, starting from `reuse` tokens of `source`'s cells
    (`source == slot`: its own cells; otherwise copy `source`'s stream into `slot` first)."""

    __slots__ = ("reuse", "slot", "source")

    def __init__(self, slot: int, source: int, reuse: int) -> None:
        self.slot, self.source, self.reuse = slot, source, reuse

    def __repr__(self) -> str:
        return f"Plan(slot={self.slot}, source={self.source}, reuse={self.reuse})"


class PrefixCache:
    """What each slot's KV cells hold, and which prompt prefixes are being computed now."""

    def __init__(self, slots: int, *, min_copy: int) -> None:
        self.slots = slots
        self.min_copy = min_copy  # tokens a copy must save over the slot's own cells
        self._holders: dict[int, set[int]] = {}  # block key -> slots whose cells hold it
        self._filling: dict[int, int] = {}  # block key -> sequences computing it now
        self._tokens: list[Sequence[int]] = [() for _ in range(slots)]  # the slot's prompt
        self._chains: list[list[int]] = [[] for _ in range(slots)]  # block_chain(its prompt)
        self._length = [0] * slots  # tokens of _tokens[slot] whose cells are computed
        self._held = [0] * slots  # blocks of _chains[slot] registered in _holders
        self._busy = [False] * slots  # its sequence still registers blocks in _filling

    # -- questions --------------------------------------------------------------------------
    def held(self, chain: list[int]) -> int:
        """Blocks of this prompt that some slot's cells hold."""
        return _longest(chain, self._holders.__contains__)

    def coming(self, chain: list[int]) -> int:
        """Blocks of this prompt held, or being computed by a running sequence now."""
        return _longest(chain, lambda key: key in self._holders or key in self._filling)

    def should_wait(self, chain: list[int]) -> bool:
        """A running sequence is computing a good part of this prompt: start from its cells
        when they are done (a step or two) rather than computing the same prefix again."""
        return (self.coming(chain) - self.held(chain)) * BLOCK >= self.min_copy

    def plan(self, prompt: Sequence[int], chain: list[int], free: list[int]) -> Plan:
        """The free slot to run this prompt in, and the cells to start from. At least the last
        prompt token is always decoded again (its logits choose the first new token)."""
        limit = len(prompt) - 1
        own_slot, own = free[0], -1
        for slot in free:
            n = self._common(slot, prompt, chain, limit)
            if n > own or (n == own and slot < own_slot):
                own_slot, own = slot, n
        held = self.held(chain)
        if held and min(held * BLOCK, limit) >= own + self.min_copy:
            source, best = -1, own
            for slot in sorted(self._holders[chain[held - 1]]):
                n = self._common(slot, prompt, chain, limit)
                if n > best:
                    source, best = slot, n
            if source >= 0 and best >= own + self.min_copy:
                return Plan(self._victim(free), source, best)
        if own < self.min_copy:  # little to keep anywhere: spare the cells worth most
            slot = self._victim(free)
            return Plan(slot, slot, self._common(slot, prompt, chain, limit))
        return Plan(own_slot, own_slot, own)

    # -- changes ----------------------------------------------------------------------------
    def assign(self, slot: int, prompt: Sequence[int], chain: list[int], reuse: int) -> None:
        """The slot now runs this prompt, its first `reuse` tokens' cells in place."""
        self._drop(slot)
        self._tokens[slot], self._chains[slot] = prompt, chain
        self._length[slot] = reuse
        held = min(reuse // BLOCK, len(chain))
        for key in chain[:held]:
            self._holders.setdefault(key, set()).add(slot)
        self._held[slot] = held
        for key in chain[held:]:
            self._filling[key] = self._filling.get(key, 0) + 1
        self._busy[slot] = True

    def progress(self, slot: int, computed: int) -> None:
        """The slot's sequence has the cells of its first `computed` prompt tokens now."""
        if computed <= self._length[slot]:
            return
        self._length[slot] = computed
        chain, held = self._chains[slot], self._held[slot]
        blocks = min(computed // BLOCK, len(chain))
        for key in chain[held:blocks]:
            self._holders.setdefault(key, set()).add(slot)
            if self._busy[slot]:
                self._unfill(key)
        self._held[slot] = max(held, blocks)

    def release(self, slot: int) -> None:
        """The slot's sequence ended; its computed cells stay for the next one."""
        if self._busy[slot]:
            for key in self._chains[slot][self._held[slot] :]:
                self._unfill(key)
            self._busy[slot] = False

    def forget(self, slot: int) -> None:
        """The slot's cells are gone (cleared, or a failed step left them unknown)."""
        self._drop(slot)
        self._tokens[slot], self._chains[slot], self._length[slot] = (), [], 0

    # -- inside -----------------------------------------------------------------------------
    def _drop(self, slot: int) -> None:
        self.release(slot)
        for key in self._chains[slot][: self._held[slot]]:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._holders[key]
        self._held[slot] = 0

    def _unfill(self, key: int) -> None:
        left = self._filling.get(key, 0) - 1
        if left > 0:
            self._filling[key] = left
        else:
            self._filling.pop(key, None)

    def _common(self, slot: int, prompt: Sequence[int], chain: list[int], limit: int) -> int:
        own, tokens = self._chains[slot], self._tokens[slot]
        span = min(self._held[slot], len(chain))
        # Blocks whose keys agree (a chain: agreeing at k means agreeing before k).
        lo, hi = 0, span
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if own[mid - 1] == chain[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        n = lo * BLOCK
        end = min(limit, self._length[slot], len(tokens))
        if n > end:
            n = end
        if tokens[:n] != prompt[:n]:  # a hash collision: count from the start
            n = 0
        while n < end and tokens[n] == prompt[n]:
            n += 1
        return n

    def _victim(self, free: list[int]) -> int:
        """The free slot whose cells are worth least: empty, or holding what another slot
        holds too, or else the shortest; the lowest slot among equals."""

        def worth(slot: int) -> tuple[int, int, int]:
            held = self._held[slot]
            if not held:
                return (0, 0, slot)
            if len(self._holders.get(self._chains[slot][held - 1], ())) > 1:
                return (0, 1, slot)
            return (held, 1, slot)

        return min(free, key=worth)


def _longest(chain: list[int], present: Callable[[int], bool]) -> int:
    """The largest k with chain[k-1] present (presence is prefix-closed), by binary search."""
    lo, hi = 0, len(chain)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if present(chain[mid - 1]):
            lo = mid
        else:
            hi = mid - 1
    return lo
