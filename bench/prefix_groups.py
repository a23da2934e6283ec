"""Lines that share a prompt prefix, sent together, against an upstream with a prefix cache.

A GPU server (vLLM, SGLang) skips the prefill of a prompt prefix it still has cached; its cache
is finite and evicts the least recently used blocks. This batch mixes --instructions different
long instructions (an evaluation set of many tasks, say), line i using instruction i mod K, each
followed by a short document, `max_tokens` 4. The simulator models the server: prefill at
--prefill-tokens-per-s one request after another, a prefix cache of --cache-tokens (LRU, 16-token
blocks), decoding after. Two routes to the same simulator, in one run, batches alternating:

  grouped    - `group_prefixes = true` (the default): a shard's lines that share a prefix go
               out one after another;
  file order - `group_prefixes = false`: lines go out in file order, as before.

Each batch starts with an empty cache (POST /sim/reset). Printed per route: median seconds
create -> completed, lines/s, the share of prompt tokens the upstream found cached (from the
batch's usage), and the batch's cost at gpt-4o-mini's list prices (cached input at half price).

    .venv/bin/python bench/prefix_groups.py [--lines 2000] [--instructions 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop, timed_batch  # noqa: E402

from lowtide_sim.launch import start_simulator  # noqa: E402

WORDS = [
    "classify",
    "the",
    "message",
    "by",
    "its",
    "main",
    "topic",
    "and",
    "answer",
    "with",
    "one",
    "label",
    "only",
    "billing",
    "shipping",
    "returns",
    "account",
    "technical",
    "praise",
    "fraud",
    "other",
    "warranty",
    "pricing",
    "delivery",
    "refund",
    "login",
]


def instruction(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return f"Task {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def input_file(lines: int, instructions: int, words: int) -> bytes:
    texts = [instruction(k, words) for k in range(instructions)]
    out = io.BytesIO()
    for i in range(lines):
        body = {
            "model": "MODEL",
            "messages": [
                {"role": "system", "content": texts[i % instructions]},
                {"role": "user", "content": f"Message {i}: " + " ".join(["text"] * 38)},
            ],
            "max_tokens": 4,
            "temperature": 0,
        }
        line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.write(json.dumps({**line, "body": body}).encode() + b"\n")
    return out.getvalue()


def run_batch(client, raw: bytes, model: str) -> dict:
    batch, seconds = timed_batch(
        client, raw.replace(b'"model": "MODEL"', f'"model": "{model}"'.encode())
    )
    usage = batch.usage
    cost = batch.model_extra["lowtide"]["cost"]
    return {
        "seconds": seconds,
        "cached": usage.input_tokens_details.cached_tokens / usage.input_tokens,
        "cost": cost["amount"],
    }


def config(sim_url: str, concurrency: int) -> str:
    routes = []
    for name, grouped in (("grouped", "true"), ("file-order", "false")):
        routes.append(
            f'[[models]]\nname = "{name}"\nengine = "openai"\nbase_url = "{sim_url}"\n'
            f"max_concurrency = {concurrency}\nadaptive = false\ngroup_prefixes = {grouped}\n"
            "input_price = 0.15\ncached_input_price = 0.075\noutput_price = 0.6\n"
        )
    return "\n".join(routes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--instructions", type=int, default=16)
    p.add_argument("--instruction-words", type=int, default=500)
    p.add_argument("--prefill-tokens-per-s", type=float, default=100_000)
    p.add_argument("--cache-tokens", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    sim = start_simulator(
        "--prefill-tokens-per-s", str(args.prefill_tokens_per_s),
        "--prefix-cache-tokens", str(args.cache_tokens),
        "--max-tokens-per-s-per-request", "200", "--capacity-tokens-per-s", "20000",
    )  # fmt: skip
    raw = input_file(args.lines, args.instructions, args.instruction_words)
    print(
        f"{args.lines} lines, {args.instructions} instructions of ~{args.instruction_words} "
        f"tokens interleaved (line i: instruction i mod {args.instructions}) + a 40-token "
        f"document, max_tokens 4; simulated prefill {args.prefill_tokens_per_s:,.0f} tokens/s, "
        f"prefix cache {args.cache_tokens:,} tokens, {args.concurrency} in flight"
    )
    results: dict[str, list[dict]] = {"grouped": [], "file-order": []}
    try:
        with tempfile.TemporaryDirectory(prefix="lowtide-bench-groups-") as tmp:
            proc, client = start_lowtide(Path(tmp), config(sim.url, args.concurrency))
            try:
                for repeat in range(args.repeats):
                    order = ["grouped", "file-order"]
                    if repeat % 2:
                        order.reverse()
                    for model in order:
                        sim.reset()
                        results[model].append(run_batch(client, raw, model))
            finally:
                stop(proc)
    finally:
        sim.stop()

    print(f"\n{'route':<12} {'seconds':>8} {'lines/s':>8} {'cached':>7} {'cost $':>9}")
    median = {}
    for model, runs in results.items():
        m = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cached", "cost")}
        median[model] = m
        print(
            f"{model:<12} {m['seconds']:>8.2f} {args.lines / m['seconds']:>8.0f} "
            f"{m['cached']:>7.1%} {m['cost']:>9.4f}"
        )
    g, f = median["grouped"], median["file-order"]
    print(
        f"\ngrouped vs file order: {f['seconds'] / g['seconds']:.2f}x faster, "
        f"{1 - g['cost'] / f['cost']:.1%} cheaper (medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
