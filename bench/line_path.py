"""Lowtide's own CPU per line, without HTTP: LineSender.run_line against an in-process engine.

bench/workers.py measures a whole worker against a simulated upstream over HTTP, where the HTTP
client is most of the cost and the machine's noise hides a few microseconds. This isolates
what Lowtide adds on every line (parsing, routing, the token estimate, admission, retries'
bookkeeping, the result line, usage and price) so a change to that path can be measured. The
engine answers every request at once (one suspension, like an HTTP answer) with a fixed chat
completion. "minimal" is the least any client does with the same engine: parse the line, call
the engine, encode a result line. Both encode their results a segment (1,000 lines) at a
time and then drop them, as a shard commits: results kept to the end cost page faults a worker
does not pay (~2.8 us each on this VM). Runs are interleaved; medians in microseconds per line.

--without PART (repeatable) adds a row with one part of Lowtide's path stubbed out, to see what
it costs in place, beside the HTTP client's code and data (more than the same code in a tight
loop): admission (permit, release, counters), usage (reading the answer's token counts), or
result (building the result line).

    .venv/bin/python bench/line_path.py [--lines 20000] [--repeats 7] [--lanes 32]
        [--concurrency 32] [--http] [--without admission --without usage --without result]
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

import lowtide.engines.openai_http as openai_http
import lowtide.runner.sending as sending
from lowtide.admission.controller import Permit, RouteController
from lowtide.cli.common import settle_heap
from lowtide.config import ModelRoute, WorkerConfig
from lowtide.engines.base import Engine, EngineResponse
from lowtide.engines.router import Router
from lowtide.ids import request_line_id
from lowtide.runner import segment_lines
from lowtide.runner.context import RunnerContext
from lowtide.runner.segment_lines import ResultLine
from lowtide.runner.sending import LineSender
from lowtide.store.rows import Usage

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
        return EngineResponse(status_code=200, parsed=orjson.loads(ANSWER), request_id="req_1")

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
    results: list[Any] = []
    todo = iter(range(len(lines)))
    failed = 0

    async def lane() -> None:
        nonlocal failed
        for i in todo:
            results.append(await sender.run_line(request_line_id("batch_1", i), lines[i]))
            if len(results) >= SEGMENT:
                failed += sum(not r.result.ok for r in results)
                segment_lines.encode(r.result for r in results)
                results.clear()

    cpu = time.process_time()
    await asyncio.gather(*(lane() for _ in range(lanes)))
    failed += sum(not r.result.ok for r in results)
    segment_lines.encode(r.result for r in results)
    cpu = time.process_time() - cpu
    await router.close()
    if failed:
        raise SystemExit("a line failed")
    return cpu


SEGMENT = 1000  # lines a shard commits at a time (then drops)
_PERMIT = Permit("batch_1", 0)
_USAGE = Usage(20, 2)
_RESULT = ResultLine(True, b"{}")
# What --without replaces: (object, attribute, stand-in).
STUBS: dict[str, list[tuple[Any, str, Any]]] = {
    "admission": [
        (RouteController, "try_acquire", lambda self, *a: _PERMIT),
        (RouteController, "release", lambda self, *a, **k: None),
        (RouteController, "count", lambda self, *a: None),
    ],
    # An answer's counts: read from its bytes over HTTP (with the check that they are JSON),
    # from the parsed body for the instant engine.
    "usage": [
        (openai_http, "read_tokens", lambda raw: (20, 2, 0, 0)),
        (sending, "usage_of", lambda body: _USAGE),
    ],
    "result": [(sending, "response_line", lambda *a: _RESULT)],
}


async def without(part: str, run: Any) -> float:
    """`run()` with `part` of the line path stubbed out."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in STUBS[part]]
    for obj, name, stand_in in STUBS[part]:
        setattr(obj, name, stand_in)
    try:
        return await run()
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)


async def minimal_path(lines: list[bytes], concurrency: int) -> float:
    engine = InstantEngine()
    out: list[bytes] = []
    todo = iter(range(len(lines)))

    async def lane() -> None:
        for i in todo:
            request = orjson.loads(lines[i])
            answer = await engine.execute(ENDPOINT, request["body"])
            out.append(
                orjson.dumps(
                    {
                        "id": i,
                        "custom_id": request["custom_id"],
                        "response": {"status_code": answer.status_code, "body": answer.body},
                    }
                )
            )
            if len(out) >= SEGMENT:
                b"\n".join(out)
                out.clear()

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
    for part in args.without:
        runs[f"without {part}"] = []
    upstream = None if sim is None else sim.url
    try:
        for _ in range(args.repeats):
            if sim is None:
                runs["minimal"].append(await minimal_path(lines, args.concurrency))
            else:
                bare = await send_all(f"{sim.url}/chat/completions", str(path), args.concurrency)
                runs["bare aiohttp"].append(bare["cpu"])
            runs["lowtide"].append(
                await lowtide_path(lines, args.lanes, args.concurrency, upstream)
            )
            for part in args.without:
                cpu = await without(
                    part, lambda: lowtide_path(lines, args.lanes, args.concurrency, upstream)
                )
                runs[f"without {part}"].append(cpu)
    finally:
        if sim is not None:
            sim.stop()
    base = statistics.median(next(iter(runs.values())))
    print(f"{args.lines} lines, {args.lanes} lanes, {args.concurrency} permits; us of CPU a line")
    for name, cpus in runs.items():
        med = statistics.median(cpus)
        each = " ".join(f"{1e6 * c / args.lines:.1f}" for c in cpus)
        print(f"{name:>18} {1e6 * med / args.lines:7.1f}  {med / base:5.2f}x   ({each})")


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
    p.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(STUBS),
        help="add a row with this part of the line path stubbed out (repeatable)",
    )
    cli = p.parse_args()
    cli.lanes = cli.lanes or cli.concurrency
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(cli))
