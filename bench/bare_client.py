"""The baseline for Lowtide's own CPU per line: a bare aiohttp loop, nothing of Lowtide around it.

Sends every request line of a batch input file to an OpenAI-compatible endpoint with the same
HTTP client library, the same connection limit and the same headers a Lowtide worker uses, and
reads and decodes every answer, on the same event loop (uvloop, as `lowtide worker` runs when it
is installed; --loop asyncio for the standard one). No retries, no files written, no accounting: the least a client
must do to send the requests. Prints one JSON object: wall seconds, CPU seconds of this process
spent from reading the input to the last answer, and the answers by HTTP status.

    .venv/bin/python bench/bare_client.py --url http://127.0.0.1:PORT/v1/chat/completions \\
        --requests-file input.jsonl [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson


async def send_all(url: str, path: str, concurrency: int, client: str = "aiohttp") -> dict:
    cpu0, t0 = time.process_time(), time.perf_counter()
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line]
    statuses: Counter[int] = Counter()
    headers = {"Content-Type": "application/json"}
    pending = iter(lines)

    async def send(post: Callable[[bytes], Awaitable[tuple[int, bytes]]]) -> None:
        async def sender() -> None:
            for raw in pending:
                status, answer = await post(orjson.dumps(orjson.loads(raw)["body"]))
                statuses[status] += 1
                orjson.loads(answer)

        await asyncio.gather(*(sender() for _ in range(concurrency)))

    if client == "pyreqwest":
        import datetime

        from pyreqwest.client import ClientBuilder

        builder = ClientBuilder().max_connections(concurrency).default_headers(headers)
        builder = builder.timeout(datetime.timedelta(seconds=300)).no_proxy().gzip(True)
        async with builder.build() as rq:

            async def post(data: bytes) -> tuple[int, bytes]:
                resp = await rq.post(url).body_bytes(data).build().send()
                return resp.status, bytes(await resp.bytes())

            await send(post)
    elif client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, headers=headers) as http:

            async def post(data: bytes) -> tuple[int, bytes]:
                resp = await http.post(url, content=data)
                return resp.status_code, resp.content

            await send(post)
    else:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def post(data: bytes) -> tuple[int, bytes]:
                async with session.post(url, data=data) as resp:
                    return resp.status, await resp.read()

            await send(post)
    return {
        "lines": len(lines),
        "seconds": time.perf_counter() - t0,
        "cpu": time.process_time() - cpu0,
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="full endpoint, e.g. .../v1/chat/completions")
    p.add_argument("--requests-file", required=True, help="batch input JSONL")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument(
        "--client",
        choices=["aiohttp", "httpx", "pyreqwest"],
        default="aiohttp",
        help="the HTTP client library (Lowtide's routes use aiohttp, or pyreqwest where a route "
        "sets http_client)",
    )
    args = p.parse_args()
    coro = send_all(args.url, args.requests_file, args.concurrency, args.client)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(coro)
    else:
        result = asyncio.run(coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
