"""Admission mechanisms: budget accounting, header learning, window adaptation, fair ordering."""

from __future__ import annotations

import asyncio

import pytest

from lowtide.admission.budgets import TokenBucket
from lowtide.admission.controller import RouteController
from lowtide.admission.estimate import estimate_tokens
from lowtide.admission.headers import parse_rate_limit_headers, parse_reset
from lowtide.admission.window import ConcurrencyWindow
from lowtide.config import ModelRoute


def test_token_bucket_refills_continuously_and_carries_debt():
    bucket = TokenBucket(per_minute=600)  # 10 a second, capacity 600
    t0 = 1000.0
    bucket._updated = t0
    assert bucket.wait_time(600, t0) == 0
    bucket.take(600, t0)
    assert bucket.wait_time(1, t0) == pytest.approx(0.1)
    assert bucket.wait_time(1, t0 + 0.1) == pytest.approx(0.0, abs=1e-9)
    bucket.take(50, t0 + 1)  # 10 refilled, 50 taken: 40 in debt
    assert bucket.level == pytest.approx(-40)
    bucket.give_back(30)  # the request used 30 fewer tokens than estimated
    assert bucket.level == pytest.approx(-10)
    assert bucket.wait_time(10, t0 + 1) == pytest.approx(2.0)


def test_bucket_learns_and_clamps():
    bucket = TokenBucket(per_minute=1000)
    bucket.clamp(100)
    assert bucket.level <= 100
    bucket.resize(3000)
    assert bucket.per_minute == 3000 and bucket.capacity == 3000


def test_parse_reset_and_headers():
    assert parse_reset("1s") == 1
    assert parse_reset("6m0s") == 360
    assert parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1m30.5s") == pytest.approx(90.5)
    assert parse_reset("2.5") == 2.5
    assert parse_reset("soon") is None
    info = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "3000",
            "x-ratelimit-remaining-requests": "2999",
            "x-ratelimit-limit-tokens": "1000000",
            "x-ratelimit-remaining-tokens": "999000",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert (info.limit_requests, info.remaining_requests, info.limit_tokens) == (
        3000,
        2999,
        1_000_000,
    )
    assert info.reset_tokens == 360 and not info.empty
    assert parse_rate_limit_headers({}).empty


def test_estimate_counts_prompt_and_completion_budget():
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    assert estimate_tokens("/v1/chat/completions", body) == 100 + 4 + 100
    assert estimate_tokens("/v1/embeddings", {"input": ["a" * 40, "b" * 40]}) == 20 + 4


def test_window_slow_start_then_aimd():
    window = ConcurrencyWindow(initial=4, minimum=1, maximum=64)
    for _ in range(4):  # each success while the window is full (in_flight counts the others)
        window.on_success(0.01, in_flight=window.limit - 1)
    assert window.limit == 8
    window.on_success(0.01, in_flight=0)  # not full: no growth
    assert window.limit == 8
    assert window.on_overload()
    assert window.limit == 4 and not window.slow_start
    assert not window.on_overload()  # a second 429 in the same round trip does not cut again
    for _ in range(5):
        window.on_success(0.01, in_flight=window.limit - 1)
    assert window.limit == 5  # additive increase: about one per window of successes
    fixed = ConcurrencyWindow(initial=4, minimum=1, maximum=64, adaptive=False)
    assert fixed.limit == 64 and not fixed.on_overload()


def test_controller_learns_limits_from_headers_and_pauses_on_retry_after():
    async def scenario():
        route = ModelRoute(name="r", base_url="http://x/v1", max_concurrency=16)
        ctl = RouteController(route)
        assert ctl.rpm is None
        permit = await ctl.acquire("b", 1.0, 10)
        ctl.release(
            permit,
            status=200,
            used_tokens=8,
            headers={"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0"},
        )
        assert ctl.rpm is not None and ctl.rpm.per_minute == 600
        assert ctl._blocked_for(10) > 0  # the upstream said nothing is left
        permit = await asyncio.wait_for(ctl.acquire("b", 1.0, 10), timeout=2)
        ctl.release(permit, status=429, retry_after=0.3)
        assert ctl._blocked_for(10) >= 0.2  # paused for Retry-After, this route only
        assert ctl.window.limit < 8

    asyncio.run(scenario())


def test_fair_share_serves_small_batch_and_honours_weights():
    async def scenario():
        route = ModelRoute(name="f", engine="echo", max_concurrency=1)
        ctl = RouteController(route)
        first = await ctl.acquire("big", 1.0, 1)  # holds the only slot
        order: list[str] = []

        async def request(batch: str, weight: float):
            permit = await ctl.acquire(batch, weight, 1)
            order.append(batch)
            await asyncio.sleep(0)
            ctl.release(permit, status=200)

        tasks = [asyncio.create_task(request("big", 1.0)) for _ in range(20)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("small", 1.0)) for _ in range(2)]
        tasks += [asyncio.create_task(request("vip", 4.0)) for _ in range(8)]
        await asyncio.sleep(0)
        ctl.release(first, status=200)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    assert max(i for i, b in enumerate(order) if b == "small") < 8  # not behind the 20 big ones
    assert max(i for i, b in enumerate(order) if b == "vip") < 14  # 4x the share of "big"
    assert len(order) == 30


def test_lanes_follow_the_window_and_keep_fair_queuing():
    """A shard's lanes shrink while its own batch alone waits for a full window, or its batch
    runs more lanes than the window holds; lines of another batch waiting keep every lane (fair
    queuing needs them queued); a slot nobody uses asks for one lane more; a budget wait
    changes nothing."""

    async def scenario() -> None:
        route = ModelRoute(name="m", engine="echo", max_concurrency=2, adaptive=False, rpm=None)
        c = RouteController(route)
        assert c.window.limit == 2
        assert c.lanes_wanted("a") == 1  # nothing in flight: room for more lanes
        first = c.try_acquire("a", 1.0, 10)
        assert first is not None and c.lanes_wanted("a") == 0  # one slot left: it is the asker's
        second = c.try_acquire("a", 1.0, 10)
        assert second is not None and c.lanes_wanted("a") == 0  # full, nobody waits
        waiting_a = asyncio.create_task(c.acquire("a", 1.0, 10))
        await asyncio.sleep(0)
        assert c.lanes_wanted("a") == -1  # only batch a waits for a full window
        assert c.lanes_wanted("b") == 0  # b has nothing waiting: not b's lane to drop
        waiting_b = asyncio.create_task(c.acquire("b", 1.0, 10))
        await asyncio.sleep(0)
        assert c.lanes_wanted("a") == 0 and c.lanes_wanted("b") == 0  # two batches queue: keep all
        c.release(first, status=200, used_tokens=10)  # the fairest waiter gets the slot
        c.release(second, status=200, used_tokens=10)
        granted = [await waiting_a, await waiting_b]
        assert {p.batch for p in granted} == {"a", "b"}
        for permit in granted:
            c.release(permit, status=200, used_tokens=10)
        assert c.lanes_wanted("a") == 1

        # Lanes counted per batch: a new shard starts what the window holds beyond them (at
        # least one), and a lane beyond the window leaves even while nobody waits (else each
        # release would hand its slot to the extra lane, and every line would queue).
        assert c.lanes_to_start("a") == 2
        c.lane_started("a")
        c.lane_started("a")
        assert c.lanes_to_start("a") == 1 and c.lanes_to_start("b") == 2
        assert c.lanes_wanted("a") == 0  # a window of lanes: none more, even with slots free
        c.lane_started("a")
        assert c.lanes_wanted("a") == -1 and c.lanes_wanted("b") == 1
        c.backing_off += 1  # a line asleep in a retry backoff holds no slot: its lane may stay
        assert c.lanes_wanted("a") == 0
        c.backing_off -= 1
        for _ in range(3):
            c.lane_ended("a")
        assert c.lanes == {} and c.lanes_wanted("a") == 1

        paused = RouteController(ModelRoute(name="p", engine="echo", max_concurrency=4, rpm=1))
        assert paused.try_acquire("a", 1.0, 10) is not None  # the one request a minute
        assert paused.try_acquire("a", 1.0, 10) is None  # the budget, not the window, is empty
        waiter = asyncio.create_task(paused.acquire("a", 1.0, 10))
        await asyncio.sleep(0)
        assert paused.lanes_wanted("a") == 0  # lanes wait for the budget: none leave, none start
        waiter.cancel()

    asyncio.run(scenario())


def test_route_counters_are_exported_when_scraped():
    """Controllers keep plain numbers; /metrics reads them at scrape time, summed over the
    controllers of one route in the process, and forgets a controller once it is gone."""
    import gc

    from prometheus_client import REGISTRY, generate_latest

    route = ModelRoute(name="scraped-route", engine="echo", max_concurrency=2, adaptive=False)
    first, second = RouteController(route), RouteController(route)
    first.count(200)
    first.count(200)
    second.count(200)
    second.count("request_timeout")
    first.tokens += 40
    second.tokens += 2
    first.rate_limited += 1
    second.retried()
    text = generate_latest(REGISTRY).decode()
    assert 'lowtide_route_requests_total{outcome="200",route="scraped-route"} 3.0' in text
    assert (
        'lowtide_route_requests_total{outcome="request_timeout",route="scraped-route"} 1.0' in text
    )
    assert 'lowtide_route_tokens_total{route="scraped-route"} 42.0' in text
    assert 'lowtide_route_rate_limited_total{route="scraped-route"} 1.0' in text
    assert 'lowtide_route_retries_total{route="scraped-route"} 1.0' in text
    del first, second
    gc.collect()
    text = generate_latest(REGISTRY).decode()
    assert 'route_requests_total{outcome="200",route="scraped-route"}' not in text
    assert 'route_tokens_total{route="scraped-route"}' not in text
