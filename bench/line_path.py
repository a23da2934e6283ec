"""Lowtide's own CPU per line, without HTTP: LineSender.run_line against an in-process engine.

bench/workers.py measures a whole worker against a simulated upstream over HTTP, where the HTTP
client is most of the cost and the machine's noise hides a few microseconds. This isolates
what Lowtide adds on every line (parsing, routing, the token estimate, admission, retries'
bookkeeping, the result line, usage and price) so a change to that path can be measured. The
engine answers every request at once (one suspension, like an HTTP answer) with a fixed chat
completion. "minimal" is the least any client does with the same engine: parse the line, call
the engine, encode a result line. Runs are interleaved; medians in microseconds per line.

    .venv/bin/python bench/line_path.py [--lines 20000] [--repeats 7] [--lanes 32]
        [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

from lowtide.cli.common import settle_heap
from lowtide.config import ModelRoute, WorkerConfig
from lowtide.engines.base import Engine, EngineResponse
from lowtide.engines.router import Router
from lowtide.ids import request_line_id
from lowtide.runner import segment_lines
from lowtide.runner.context import RunnerContext
from lowtide.runner.sending import LineSender

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import write_input  # noqa: E402

ENDPOINT = "/v1/chat/completions"
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "printer"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
    }
)


class InstantEngine(Engine):
    """Encodes the request and decodes a fixed answer, as an HTTP engine would, after one
    trip through the event loop."""

    name = "m"
    max_concurrency = 32

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        orjson.dumps(body)
        await asyncio.sleep(0)
        return EngineResponse(status_code=200, body=orjson.loads(ANSWER), request_id="req_1")

    def for_endpoint(self, endpoint: str) -> Engine:
        return self


class _Batch:
    batch_id = "batch_1"
    project = "default"
    endpoint = ENDPOINT
    priority = "normal"
    created_at = 0
    expires_at = 2**40


class _Running:
    stopping = False
    lost = False


async def lowtide_path(
    lines: list[bytes], lanes: int, concurrency: int, upstream: str | None = None
) -> float:
    """CPU seconds for every line through LineSender, `lanes` at a time (as a shard runs them);
    to `upstream` over HTTP with the route's real engine, or else to the instant engine."""
    route = ModelRoute(
        name="m",
        engine="openai",
        base_url=upstream or "http://unused",
        max_concurrency=concurrency,
        adaptive=False,
    )
    router = Router([route])
    if upstream is None:
        router._engines["m"] = InstantEngine()  # the route's engine, without an HTTP one
    ctx = RunnerContext(None, None, router, WorkerConfig())  # type: ignore[arg-type]
    sender = LineSender(ctx, _Batch(), _Running())
    results: list[Any] = [None] * len(lines)
    todo = iter(range(len(lines)))

    async def lane() -> None:
        for i in todo:
            results[i] = await sender.run_line(request_line_id("batch_1", i), lines[i])

    cpu = time.process_time()
    await asyncio.gather(*(lane() for _ in range(lanes)))
    segment_lines.encode(r.result for r in results)
    cpu = time.process_time() - cpu
    await router.close()
    if not all(r.result.ok for r in results):
        raise SystemExit("a line failed")
    return cpu


async def minimal_path(lines: list[bytes], concurrency: int) -> float:
    engine = InstantEngine()
    out: list[bytes] = [b""] * len(lines)
    todo = iter(range(len(lines)))

    async def lane() -> None:
        for i in todo:
            request = orjson.loads(lines[i])
            answer = await engine.execute(ENDPOINT, request["body"])
            out[i] = orjson.dumps(
                {
                    "id": i,
                    "custom_id": request["custom_id"],
                    "response": {"status_code": answer.status_code, "body": answer.body},
                }
            )

    cpu = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    b"\n".join(out)
    return time.process_time() - cpu


async def main(args: argparse.Namespace) -> None:
    path = Path(tempfile.mkdtemp()) / "input.jsonl"
    write_input(path, args.lines, "m")  # the requests bench/workers.py sends
    lines = path.read_bytes().splitlines()
    settle_heap()  # as a worker process does once started
    runs: dict[str, list[float]] = {"minimal": [], "lowtide": []}
    sim = None
    if args.http:
        from bare_client import send_all

        from lowtide_sim.launch import start_simulator

        sim = start_simulator("--latency-ms", "0")
        runs = {"bare aiohttp": [], "lowtide": []}
    try:
        for _ in range(args.repeats):
            if sim is None:
                runs["minimal"].append(await minimal_path(lines, args.concurrency))
                runs["lowtide"].append(await lowtide_path(lines, args.lanes, args.concurrency))
            else:
                bare = await send_all(f"{sim.url}/chat/completions", str(path), args.concurrency)
                runs["bare aiohttp"].append(bare["cpu"])
                cpu = await lowtide_path(lines, args.lanes, args.concurrency, sim.url)
                runs["lowtide"].append(cpu)
    finally:
        if sim is not None:
            sim.stop()
    base = statistics.median(next(iter(runs.values())))
    print(f"{args.lines} lines, {args.lanes} lanes, {args.concurrency} permits; us of CPU a line")
    for name, cpus in runs.items():
        med = statistics.median(cpus)
        each = " ".join(f"{1e6 * c / args.lines:.1f}" for c in cpus)
        print(f"{name:>12} {1e6 * med / args.lines:7.1f}  {med / base:5.2f}x   ({each})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--lanes",
        type=int,
        help="lanes running lines (default: --concurrency, where a shard's lanes settle)",
    )
    p.add_argument("--concurrency", type=int, default=32, help="the route's max_concurrency")
    p.add_argument(
        "--http",
        action="store_true",
        help="send to the simulator over HTTP: Lowtide's route engine against bench/bare_client.py's loop",
    )
    cli = p.parse_args()
    cli.lanes = cli.lanes or cli.concurrency
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(cli))
