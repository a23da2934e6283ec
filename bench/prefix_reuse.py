"""Shared prompt prefixes on the embedded chat engine: one instruction computed once, or per line?

A classification batch: every line is a ~300-token instruction followed by a ~40-token document,
`max_tokens` 4, temperature 0. Three batches through a real `lowtide serve` (upload, validate,
run, finalize), in one run:

  shared     - every line repeats the same instruction (prefix cache on, the default);
  different  - every line's instruction is different text of about the same length (prefix cache
               on: nothing to share, so this is what the shared batch would cost without reuse);
  shared, prefix_cache = false - the shared batch on a route with reuse turned off: the greedy
               answers must be identical to the first batch's, line by line.

    .venv/bin/python bench/prefix_reuse.py [--lines 500] [--direct]

--direct drives the engine in this process instead (no server), for a quicker look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop, timed_batch  # noqa: E402

from lowtide.config import ModelRoute  # noqa: E402
from lowtide.engines.llamacpp import LlamaCppEngine  # noqa: E402

LABELS = [
    "billing", "shipping", "returns", "account", "technical", "praise", "fraud", "other",
    "warranty", "pricing", "delivery", "refund", "login", "privacy", "feedback", "sales",
]  # fmt: skip
SUBJECTS = [
    "the customer", "the writer", "the sender", "the client", "the user", "the buyer",
    "the author", "the person", "the shopper", "the member", "the subscriber", "the caller",
]  # fmt: skip
VERBS = [
    "mentions", "complains about", "asks about", "describes", "reports", "praises",
    "questions", "refers to", "talks about", "writes about", "focuses on", "explains",
]  # fmt: skip
THINGS = [
    "an invoice", "a late parcel", "a broken item", "a password", "a card payment",
    "a discount code", "a damaged box", "a missing refund", "a wrong size", "an email address",
    "a subscription", "a delivery slot", "a warranty claim", "a price change", "a login page",
    "a tracking number", "a gift card", "a product review", "a phone call", "a store visit",
]  # fmt: skip
DOCS = [
    "I ordered a kettle three weeks ago and it still has not arrived. The tracking page has"
    " said 'in transit' since Monday. Can you tell me where it is?",
    "My card was charged twice for the same order last Friday. Please refund the second"
    " payment as soon as possible, I need the money back.",
    "I cannot log in to my account any more. The site says my password is wrong but I reset"
    " it yesterday and used the new one.",
    "The jacket I received is two sizes too small. I would like to send it back and get the"
    " right size instead. How do I do that?",
    "Thank you so much for the quick delivery and the lovely note in the box. The lamp looks"
    " great in our living room!",
    "Somebody used my account to order three phones that I never asked for. Please block the"
    " orders and check my account now.",
    "The price of the blender went down the day after I bought it. Can I get the difference"
    " back as a refund or a voucher?",
    "My headphones stopped working after two months. They are still under warranty, so I"
    " would like a repair or a replacement please.",
]


def instruction(seed: int) -> str:
    """A classification instruction of about 300 tokens; each seed gives different text."""
    rng = random.Random(seed)
    labels = rng.sample(LABELS, 8)
    parts = [
        f"Task {seed}: you sort customer messages for team {rng.randint(100, 999)}.",
        "Read the message below and answer with exactly one label from this list: "
        + ", ".join(labels)
        + ".",
    ]
    while len(" ".join(parts).split()) < 215:
        label = rng.choice(labels)
        parts.append(
            f"Use {label} when {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(THINGS)}"
            f" or {rng.choice(THINGS)}, unless {rng.choice(SUBJECTS)} {rng.choice(VERBS)}"
            f" {rng.choice(THINGS)}."
        )
    parts.append("Answer with the label only, in lower case, and nothing else.")
    return " ".join(parts)


def bodies(lines: int, shared: bool, model: str) -> list[dict]:
    out = []
    for i in range(lines):
        doc = f"Message {i}: {DOCS[i % len(DOCS)]}"
        out.append(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": instruction(0 if shared else i + 1)},
                    {"role": "user", "content": doc},
                ],
                "max_tokens": 4,
                "temperature": 0,
            }
        )
    return out


class Result:
    def __init__(self, seconds: float, answers: dict[str, str], prompt: int, cached: int) -> None:
        self.seconds, self.answers, self.prompt, self.cached = seconds, answers, prompt, cached


def run_batch(client, batch_bodies: list[dict]) -> Result:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i, body in enumerate(batch_bodies)
    ]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    batch, elapsed = timed_batch(client, raw)
    answers = {}
    for text in client.files.content(batch.output_file_id).text.splitlines():
        row = json.loads(text)
        answers[row["custom_id"]] = row["response"]["body"]["choices"][0]["message"]["content"]
    usage = batch.usage
    return Result(elapsed, answers, usage.input_tokens, usage.input_tokens_details.cached_tokens)


CONFIG = """
[[models]]
name = "smol-reuse"
engine = "llamacpp"
max_concurrency = 64

[[models]]
name = "smol-no-reuse"
engine = "llamacpp"
prefix_cache = false
max_concurrency = 64
"""


def through_lowtide(lines: int) -> dict[str, Result]:
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-") as tmp:
        proc, client = start_lowtide(Path(tmp), CONFIG)
        try:
            for model in ("smol-reuse", "smol-no-reuse"):  # load both models first
                run_batch(client, bodies(1, True, model))
            return {
                "shared": run_batch(client, bodies(lines, True, "smol-reuse")),
                "different": run_batch(client, bodies(lines, False, "smol-reuse")),
                "shared, no reuse": run_batch(client, bodies(lines, True, "smol-no-reuse")),
            }
        finally:
            stop(proc)


def direct(lines: int) -> dict[str, Result]:
    async def one(engine: LlamaCppEngine, batch_bodies: list[dict]) -> Result:
        limit = asyncio.Semaphore(64)  # as the runner would: max_concurrency lines in flight

        async def line(body: dict):
            async with limit:
                return await engine.execute("/v1/chat/completions", body)

        started = time.perf_counter()
        results = await asyncio.gather(*(line(b) for b in batch_bodies))
        elapsed = time.perf_counter() - started
        answers = {
            f"r{i}": r.body["choices"][0]["message"]["content"] for i, r in enumerate(results)
        }
        prompt = sum(r.body["usage"]["prompt_tokens"] for r in results)
        cached = sum(r.body["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
        return Result(elapsed, answers, prompt, cached)

    async def run() -> dict[str, Result]:
        with tempfile.TemporaryDirectory(prefix="lowtide-models-") as cache:
            out = {}
            for name, reuse in (("smol-reuse", True), ("smol-no-reuse", False)):
                route = ModelRoute(name=name, engine="llamacpp", prefix_cache=reuse)
                engine = LlamaCppEngine(route, Path(cache))
                await engine.start()
                if reuse:
                    out["shared"] = await one(engine, bodies(lines, True, name))
                    out["different"] = await one(engine, bodies(lines, False, name))
                else:
                    out["shared, no reuse"] = await one(engine, bodies(lines, True, name))
                await engine.close()
            return out

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--direct", action="store_true", help="drive the engine directly")
    args = parser.parse_args()
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.lines} lines, max_tokens 4,"
        f" {'engine driven directly' if args.direct else 'real batches through lowtide serve'}"
    )
    results = direct(args.lines) if args.direct else through_lowtide(args.lines)
    base = results["different"].seconds
    print(
        f"\n  {'batch':<36}{'wall s':>8}{'lines/s':>9}{'prompt tok/line':>17}"
        f"{'reused tok/line':>17}{'vs different':>14}"
    )
    for name, r in results.items():
        print(
            f"  {name:<36}{r.seconds:>8.1f}{args.lines / r.seconds:>9.1f}"
            f"{r.prompt / args.lines:>17.1f}{r.cached / args.lines:>17.1f}"
            f"{base / r.seconds:>13.2f}x"
        )
    shared, plain = results["shared"].answers, results["shared, no reuse"].answers
    same = sum(shared[k] == plain.get(k) for k in shared)
    print(
        f"\n  speed-up, shared instruction vs different instructions: "
        f"{base / results['shared'].seconds:.2f}x"
    )
    print(
        f"  speed-up, prefix cache on vs off (same shared batch): "
        f"{results['shared, no reuse'].seconds / results['shared'].seconds:.2f}x"
    )
    print(f"  greedy answers identical with and without reuse: {same}/{len(shared)}")
    labels = sorted({a.strip() for a in shared.values()})
    print(f"  answers seen: {', '.join(repr(x) for x in labels[:8])}")


if __name__ == "__main__":
    main()
