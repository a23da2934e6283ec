"""Shared prompt prefixes on the embedded chat engine: the bookkeeping, and identical answers."""

from __future__ import annotations

import asyncio

import pytest

from lowtide.config import ModelRoute
from lowtide.engines.llamacpp.prefixes import BLOCK, PrefixCache, block_chain

# -- the bookkeeping (no model) ----------------------------------------------------------------

INSTRUCTION = list(range(1000, 1300))  # 300 tokens every prompt starts with


def _prompt(*tail: int) -> list[int]:
    return [*INSTRUCTION, *tail]


def test_a_prompt_reuses_its_own_slot_or_copies_the_longest_prefix():
    cache = PrefixCache(4, min_copy=32)
    a, b = _prompt(1, 2, 3), _prompt(4, 5, 6, 7)
    plan = cache.plan(a, block_chain(a), [0, 1, 2, 3])
    assert (plan.slot, plan.reuse) == (0, 0)  # nothing cached yet
    cache.assign(0, a, block_chain(a), 0)
    # While slot 0 computes the instruction, b waits for it rather than computing it again.
    assert cache.should_wait(block_chain(b))
    cache.progress(0, 160)
    assert cache.held(block_chain(b)) == 160 // BLOCK and cache.should_wait(block_chain(b))
    cache.progress(0, len(a))
    assert not cache.should_wait(block_chain(b))
    plan = cache.plan(b, block_chain(b), [1, 2, 3])
    assert (plan.slot, plan.source, plan.reuse) == (1, 0, 300)  # a copy of slot 0's cells
    cache.assign(1, b, block_chain(b), 300)
    cache.release(0)
    again = _prompt(9)
    plan = cache.plan(again, block_chain(again), [0, 2, 3])
    assert (plan.slot, plan.source, plan.reuse) == (0, 0, 300)  # its own cells: no copy
    other = list(range(5000, 5300))
    plan = cache.plan(other, block_chain(other), [0, 2, 3])
    assert (plan.slot, plan.reuse) == (2, 0)  # an empty slot, sparing the cached instruction


def test_the_last_prompt_token_is_always_decoded_and_collisions_reuse_nothing():
    cache = PrefixCache(2, min_copy=32)
    a = _prompt(1, 2)
    cache.assign(0, a, block_chain(a), 0)
    cache.progress(0, len(a))
    cache.release(0)
    plan = cache.plan(a, block_chain(a), [0, 1])
    assert plan.reuse == len(a) - 1  # the same prompt again: only its last token runs
    # A chain that claims to match but whose tokens differ (a hash collision) reuses nothing.
    forged = list(range(7000, 7302))
    plan = cache.plan(forged, block_chain(a), [0, 1])
    assert plan.reuse == 0


def test_a_forgotten_slot_holds_nothing():
    cache = PrefixCache(2, min_copy=32)
    a = _prompt(1)
    cache.assign(0, a, block_chain(a), 0)
    cache.progress(0, len(a))
    cache.forget(0)
    assert cache.held(block_chain(a)) == 0 and not cache.should_wait(block_chain(a))


# -- the engine, for real ------------------------------------------------------------------------

SYSTEM = (
    "You sort customer messages. Read the message and answer with exactly one label from this"
    " list: billing, shipping, returns, account, praise, fraud. Use billing for payments,"
    " invoices, double charges and refunds of money. Use shipping for parcels that are late,"
    " lost or tracked. Use returns for items sent back, wrong sizes and exchanges. Use account"
    " for passwords, logins and profile details. Use praise for thanks and compliments. Use"
    " fraud for orders the customer never made. Answer with the label only, in lower case."
)
DOCS = [
    "My parcel has not arrived after three weeks.",
    "I was charged twice for one order.",
    "Please send me a copy of my last invoice.",
    "The jacket is too small, I want to send it back.",
    "Thank you for the quick delivery, the lamp is lovely!",
    "Someone ordered three phones on my account.",
]
REVIEW = {
    "type": "json_schema",
    "json_schema": {
        "name": "label",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["label"],
            "properties": {
                "label": {"type": "string", "enum": ["billing", "shipping", "returns", "other"]}
            },
        },
    },
}


def _bodies() -> list[dict]:
    bodies = []
    for i in range(16):
        body = {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Message {i}: {DOCS[i % len(DOCS)]}"},
            ],
            "max_tokens": 6,
            "temperature": 0,
        }
        if i % 8 == 3:
            body["response_format"] = REVIEW  # a grammar per sequence, on a reused prefix
            body["max_tokens"] = 16
        if i % 8 == 5:
            body["n"] = 2  # two choices of one prompt: the second starts from the first's cells
        bodies.append(body)
    bodies.append(
        {
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4,
            "temperature": 0,
        }
    )
    return bodies


async def _answers(route: ModelRoute, cache_dir) -> tuple[list[list[str]], list[int]]:
    from lowtide.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(route, cache_dir)
    try:
        await engine.start()
        answers = await asyncio.gather(
            *(engine.execute("/v1/chat/completions", body) for body in _bodies())
        )
    finally:
        await engine.close()
    assert all(a.status_code == 200 for a in answers), [a.body for a in answers]
    texts = [[c["message"]["content"] for c in a.body["choices"]] for a in answers]
    cached = [a.body["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    return texts, cached


def test_greedy_answers_are_identical_with_and_without_prefix_reuse(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    cache_dir = tmp_path_factory.mktemp("models")
    name = "SmolLM2-135M-Instruct"
    reused, cached = asyncio.run(
        _answers(ModelRoute(name=name, engine="llamacpp", max_concurrency=64), cache_dir)
    )
    plain, none = asyncio.run(
        _answers(
            ModelRoute(name=name, engine="llamacpp", max_concurrency=64, prefix_cache=False),
            cache_dir,
        )
    )
    assert reused == plain
    assert set(none) == {0}
    # The instruction is computed once: every later line starts from its cells.
    assert sum(1 for n in cached[:16] if n > 100) >= 12, cached
    assert all(text for choices in reused for text in choices)
