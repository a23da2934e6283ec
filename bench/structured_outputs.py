"""Structured outputs on the embedded chat engine: what does the grammar cost?

Runs the same chat requests through Lowtide's continuous-batching engine (driven directly, no
server: the engine's own throughput) without a response_format, with `json_object`, and with
a JSON schema (an enum label and a nested extraction object), and free text cut to the schema
answers' lengths (the same decoding work without the grammar: the fair comparison), in turn, so
that a busy machine slows them alike. Prints completion tokens/s per run and the medians, the
time the decoder spends choosing each token (sampling plus the grammar's judging), and the share
of answers that parse (and match the schema).

    .venv/bin/python bench/structured_outputs.py [--requests 64] [--max-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowtide.config import ModelRoute  # noqa: E402
from lowtide.engines.llamacpp import LlamaCppEngine  # noqa: E402
from lowtide.engines.llamacpp.decoder import BatchedDecoder  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
PRODUCTS = ["phone", "laptop", "kettle", "backpack", "headphones", "blender", "lamp", "chair"]
VERDICTS = [
    "works perfectly and arrived a day early",
    "stopped working after two days and support never answered",
    "is fine, nothing special",
]
SYSTEM = (
    "Classify the review as positive, negative or neutral, and extract the product, a rating "
    "from 1 to 5 and a guessed price in dollars. Answer in JSON."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "item": {
            "type": "object",
            "properties": {
                "product": {"type": "string", "maxLength": 24},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "price": {"type": "number"},
            },
            "required": ["product", "rating", "price"],
            "additionalProperties": False,
        },
    },
    "required": ["label", "item"],
    "additionalProperties": False,
}
FORMATS = {
    "free text": None,
    "json_object": {"type": "json_object"},
    "json_schema": {
        "type": "json_schema",
        "json_schema": {"name": "review", "schema": SCHEMA, "strict": True},
    },
}


def bodies(n: int, max_tokens: int, fmt: dict | None) -> list[dict]:
    out = []
    for i in range(n):
        review = f"The {PRODUCTS[i % len(PRODUCTS)]} {VERDICTS[i % len(VERDICTS)]}."
        body = {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": review},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if fmt is not None:
            body["response_format"] = fmt
        out.append(body)
    return out


def matches(mode: str, content: str) -> bool:
    if mode.startswith("free text"):
        return True
    try:
        value = json.loads(content)
    except ValueError:
        return False
    if mode == "json_schema":
        return jsonschema.Draft202012Validator(SCHEMA).is_valid(value)
    return isinstance(value, dict)


class ChoiceTimer:
    """Time spent choosing tokens (sampling, and the grammar's judging) on the decoder thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original = BatchedDecoder._choose
        timer = self

        def timed(decoder, seq, logits):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return timer._original(decoder, seq, logits)
            finally:
                timer.seconds += time.perf_counter() - started
                timer.calls += 1

        BatchedDecoder._choose = timed  # type: ignore[method-assign]

    def take(self) -> float:
        """Microseconds per chosen token since the last call."""
        per = self.seconds / self.calls * 1e6 if self.calls else 0.0
        self.seconds, self.calls = 0.0, 0
        return per


async def run(args: argparse.Namespace) -> None:
    cache = Path(args.cache or tempfile.mkdtemp(prefix="lowtide-bench-so-"))
    route = ModelRoute(name=MODEL, engine="llamacpp", threads=args.threads)
    engine = LlamaCppEngine(route, cache)
    timer = ChoiceTimer()
    await engine.start()
    await engine.execute("/v1/chat/completions", bodies(1, 4, None)[0])  # warm up
    modes = ["json_schema", "free text, same lengths", "json_object", "free text"]
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    choose_us: dict[str, list[float]] = {mode: [] for mode in modes}
    valid: dict[str, float] = {}
    lengths: dict[str, float] = {}
    print(
        f"{args.requests} requests, max_tokens {args.max_tokens}, temperature 0, "
        f"{route.parallel} sequences decoded together, {args.threads or os.cpu_count()} threads. "
        "'free text, same lengths' asks each request for as many tokens as its schema answer had."
    )
    for repeat in range(args.repeats):
        schema_lengths: list[int] = []
        for mode in modes:
            if mode == "free text, same lengths":
                batch = bodies(args.requests, args.max_tokens, None)
                for body, length in zip(batch, schema_lengths, strict=True):
                    body["max_tokens"] = max(1, length)
            else:
                fmt = FORMATS[mode]
                batch = bodies(args.requests, args.max_tokens, fmt)
            timer.take()
            started = time.perf_counter()
            results = await asyncio.gather(
                *(engine.execute("/v1/chat/completions", b) for b in batch)
            )
            elapsed = time.perf_counter() - started
            per_token = timer.take()
            counts = [r.body["usage"]["completion_tokens"] for r in results]
            if mode == "json_schema":
                schema_lengths = counts
            tokens = sum(counts)
            rates[mode].append(tokens / elapsed)
            choose_us[mode].append(per_token)
            contents = [r.body["choices"][0]["message"]["content"] for r in results]
            valid[mode] = sum(matches(mode, c) for c in contents) / len(contents)
            lengths[mode] = tokens / len(results)
            print(
                f"  run {repeat + 1} {mode:>23}: {tokens:6d} tokens in {elapsed:6.2f} s = "
                f"{tokens / elapsed:7.1f} tok/s; choosing a token {per_token:7.1f} us"
            )
    await engine.close()
    base = statistics.median(rates["free text, same lengths"])
    print()
    print(
        f"| mode | completion tok/s (median of {args.repeats}) | vs free text, same lengths | "
        "choosing a token (median) | tokens/answer | answers that parse (json modes: and match) |"
    )
    print("|---|---|---|---|---|---|")
    for mode in modes:
        median = statistics.median(rates[mode])
        print(
            f"| {mode} | {median:.1f} | {median / base:.2f}x | "
            f"{statistics.median(choose_us[mode]):.0f} us | {lengths[mode]:.1f} | {valid[mode]:.0%} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--cache", default=None, help="where the converted weights are cached")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
