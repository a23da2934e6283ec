"""Baseline for benchmarks: the openai-cookbook client-side parallel request runner.

A re-implementation (own code) of the algorithm in openai-cookbook's
``api_request_parallel_processor.py``, the script most teams copy when they
push many requests at an OpenAI-compatible endpoint. Benchmarks compare Lowtide
against it, so its weaknesses are kept on purpose: a static rate from two
client-side token buckets, no cap on in-flight requests, immediate retries
without backoff (Retry-After is ignored), a fixed 15 s global pause after any
429 with no rate reduction afterwards, and real usage never fed back.

Difference from the original: it counts tokens with tiktoken's cl100k_base,
whose BPE file cannot be downloaded here, so each string is estimated as
ceil(len(text) / 4) tokens instead.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import deque

import aiohttp
import orjson


def estimate_tokens(body: dict) -> int:
    """Cookbook chat estimate: per message 4 + field tokens, +2, plus n * max_tokens."""
    prompt = 2
    for message in body.get("messages", []):
        prompt += 4
        for value in message.values():
            text = value if isinstance(value, str) else str(value)
            prompt += math.ceil(len(text) / 4)
    return prompt + body.get("n", 1) * body.get("max_tokens", 15)


async def run_cookbook(
    requests: list[dict],
    url: str,
    api_key: str,
    rpm: float,
    tpm: float,
    max_attempts: int = 5,
    pause_seconds: float = 15.0,
) -> dict:
    """Send every request as the cookbook runner would; return counters and wall time."""
    stats = dict(succeeded=0, failed=0, status_429=0, other_errors=0, attempts=0)
    pending = iter(requests)
    retry_queue: deque[tuple[dict, int, int]] = deque()  # (request, tokens, attempts left)
    in_flight = 0
    last_rate_limit = -math.inf
    headers = {"Authorization": f"Bearer {api_key}"}

    async def attempt(session: aiohttp.ClientSession, item: tuple[dict, int, int]) -> None:
        nonlocal in_flight, last_rate_limit
        request, tokens, left = item
        try:
            async with session.post(url, json=request["body"], headers=headers) as resp:
                await resp.read()
                status = resp.status
        except Exception:  # connection errors, timeouts: the cookbook catches everything
            status = None
        if status is not None and status < 400:
            stats["succeeded"] += 1
        else:
            if status == 429:
                stats["status_429"] += 1
                last_rate_limit = time.monotonic()
            else:
                stats["other_errors"] += 1
            if left > 0:
                retry_queue.append(item)  # immediately, no backoff
            else:
                stats["failed"] += 1
        in_flight -= 1

    req_avail, tok_avail = rpm, tpm  # buckets start full, capacity = one minute
    last_refill = start = time.monotonic()
    next_item: tuple[dict, int, int] | None = None
    exhausted = False
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        while True:
            if next_item is None:
                if retry_queue:
                    next_item = retry_queue.popleft()
                elif not exhausted:
                    request = next(pending, None)
                    if request is None:
                        exhausted = True
                    else:
                        next_item = (request, estimate_tokens(request["body"]), max_attempts)
            now = time.monotonic()
            elapsed, last_refill = now - last_refill, now
            req_avail = min(rpm, req_avail + rpm * elapsed / 60)
            tok_avail = min(tpm, tok_avail + tpm * elapsed / 60)
            if next_item is not None and req_avail >= 1 and tok_avail >= next_item[1]:
                req_avail -= 1
                tok_avail -= next_item[1]
                request, tokens, left = next_item
                next_item = None
                in_flight += 1
                stats["attempts"] += 1
                task = asyncio.create_task(attempt(session, (request, tokens, left - 1)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if in_flight == 0 and next_item is None and not retry_queue and exhausted:
                break
            await asyncio.sleep(0.001)
            remaining = last_rate_limit + pause_seconds - time.monotonic()
            if remaining > 0:  # global pause after a 429; in-flight requests carry on
                await asyncio.sleep(remaining)
    return {"wall_s": time.monotonic() - start, **stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="full endpoint, e.g. .../v1/chat/completions")
    p.add_argument("--requests-file", required=True, help="Lowtide batch input JSONL")
    p.add_argument("--rpm", type=float, required=True)
    p.add_argument("--tpm", type=float, required=True)
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--pause-seconds", type=float, default=15.0)
    args = p.parse_args()
    with open(args.requests_file, "rb") as f:
        lines = [orjson.loads(line) for line in f if line.strip()]
    requests = [{"custom_id": x["custom_id"], "body": x["body"]} for x in lines]
    result = asyncio.run(
        run_cookbook(
            requests,
            args.url,
            args.api_key,
            args.rpm,
            args.tpm,
            args.max_attempts,
            args.pause_seconds,
        )
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
