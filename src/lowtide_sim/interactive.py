"""Open-loop interactive load: chat requests at a fixed rate, latency percentiles at the end.

Benchmarks use it to measure what batch traffic does to interactive users of the
same upstream. Arrivals are open-loop (a slow server does not slow the sender):
Poisson by default, or evenly spaced with ``--fixed-interval``. Latency is
measured per request from send to the fully read response body; percentiles
and the mean cover successful (HTTP 200) requests only.

    python -m lowtide_sim.interactive --url http://127.0.0.1:P/v1 --rate 5 --duration 20

prints one JSON line::

    {"sent": n, "ok": n, "errors": n, "p50_ms": x, "p90_ms": x, "p99_ms": x,
     "mean_ms": x, "by_status": {"200": n, ...}, "wall_s": x}

(latency fields are null when nothing succeeded; ``by_status`` uses "error"
for requests that got no HTTP response, such as timeouts or refused connections).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson

__all__ = ["main", "percentile", "run_interactive"]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); ``q`` in 0..100."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def run_interactive(
    url: str,
    rate: float,
    duration: float,
    *,
    max_tokens: int = 32,
    model: str = "sim-model",
    api_key: str | None = None,
    prompt: str = "hello, how are you today?",
    poisson: bool = True,
    seed: int | None = None,
    timeout: float = 60.0,
    priority: int | None = None,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """Send chat requests to ``url`` (ending in /v1) at ``rate`` per second for ``duration`` s.

    Waits for every request sent (each bounded by ``timeout``) and returns the
    summary dict described in the module docstring.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be > 0")
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    if priority is not None:
        body["priority"] = priority
    payload = orjson.dumps(body)
    rng = random.Random(seed)
    latencies: list[float] = []
    by_status: Counter[str] = Counter()
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def one(s: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        try:
            async with s.post(
                endpoint, data=payload, headers=headers, timeout=client_timeout
            ) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError):
            by_status["error"] += 1
            return
        by_status[str(status)] += 1
        if status == 200:
            latencies.append((time.perf_counter() - start) * 1000.0)

    own = session is None
    s = session or aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        at = 0.0
        while True:
            at += rng.expovariate(rate) if poisson else 1.0 / rate
            if at >= duration:
                break
            delay = began + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(s)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        if own:
            await s.close()
    wall = loop.time() - began
    ok = by_status.get("200", 0)
    return {
        "sent": len(tasks),
        "ok": ok,
        "errors": len(tasks) - ok,
        "p50_ms": _round(percentile(latencies, 50)),
        "p90_ms": _round(percentile(latencies, 90)),
        "p99_ms": _round(percentile(latencies, 99)),
        "mean_ms": _round(sum(latencies) / len(latencies)) if latencies else None,
        "by_status": dict(by_status),
        "wall_s": round(wall, 3),
    }


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lowtide_sim.interactive",
        description="Open-loop interactive chat load; prints latency percentiles as JSON.",
    )
    p.add_argument("--url", required=True, help="base URL ending in /v1")
    p.add_argument("--rate", type=_positive, required=True, help="requests per second")
    p.add_argument("--duration", type=_positive, required=True, help="seconds of sending")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompt", default="hello, how are you today?")
    p.add_argument("--priority", type=int, default=None, help="vLLM priority field to send")
    p.add_argument("--fixed-interval", action="store_true", help="even spacing, not Poisson")
    p.add_argument("--seed", type=int, default=None, help="seed for Poisson arrivals")
    p.add_argument("--timeout", type=_positive, default=60.0, help="per-request timeout (s)")
    args = p.parse_args(argv)
    result = asyncio.run(
        run_interactive(
            args.url,
            args.rate,
            args.duration,
            max_tokens=args.max_tokens,
            model=args.model,
            api_key=args.api_key,
            prompt=args.prompt,
            poisson=not args.fixed_interval,
            seed=args.seed,
            timeout=args.timeout,
            priority=args.priority,
        )
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
