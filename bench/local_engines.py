"""Local-engine throughput: is Lowtide's embedded chat engine really batching?

Prints aggregate completion tokens/s for N chat requests x M new tokens:
  naive    - the same requests one at a time through llama-cpp-python's high-level API, with the
             Q4_1 file as shipped (what a user gets without Lowtide);
  ceiling  - Lowtide's continuous-batching engine driven directly, no server, no batch API;
  lowtide  - a real batch through `lowtide serve` (upload, validate, run, finalize).
Then embeddings/s for short texts: the encoder directly, and through a Lowtide batch
(bench/embeddings.py sets them beside the numpy encoder and a plain ONNX export).

    .venv/bin/python bench/local_engines.py [--requests 64] [--tokens 64] [--texts 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop, timed_batch  # noqa: E402

from lowtide.config import ModelRoute  # noqa: E402
from lowtide.engines.embeddings import load_encoder
from lowtide.engines.llamacpp import LlamaCppEngine
from lowtide.engines.model_files import minilm_folder, smollm2_gguf

TOPICS = [
    "a lighthouse",
    "the moon",
    "a robot",
    "a bakery",
    "the ocean",
    "a violin",
    "a city",
    "winter",
]


def prompts(n: int) -> list[str]:
    return [
        f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} number {i}."
        for i in range(n)
    ]


def bench_naive(texts: list[str], tokens: int) -> float:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(smollm2_gguf()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False, seed=0
    )
    started, produced = time.perf_counter(), 0
    for text in texts:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}], max_tokens=tokens, temperature=0
        )
        produced += out["usage"]["completion_tokens"]
    return produced / (time.perf_counter() - started)


def bench_ceiling(texts: list[str], tokens: int, cache: Path) -> float:
    async def run() -> float:
        engine = LlamaCppEngine(ModelRoute(name="SmolLM2-135M-Instruct", engine="llamacpp"), cache)
        await engine.start()
        bodies = [
            {"messages": [{"role": "user", "content": t}], "max_tokens": tokens, "temperature": 0}
            for t in texts
        ]
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.execute("/v1/chat/completions", b) for b in bodies))
        elapsed = time.perf_counter() - started
        await engine.close()
        return sum(r.body["usage"]["completion_tokens"] for r in results) / elapsed

    return asyncio.run(run())


def _run_batch(client: OpenAI, lines: list[dict], endpoint: str) -> tuple[float, object]:
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    batch, elapsed = timed_batch(client, raw, endpoint)
    return elapsed, batch


def bench_lowtide(
    texts: list[str], tokens: int, short_texts: list[str]
) -> tuple[float, float, float]:
    def chat(i: int, text: str) -> dict:
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens,
            "temperature": 0,
        }
        return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}

    def emb(i: int, text: str) -> dict:
        body = {"model": "all-MiniLM-L6-v2", "input": text}
        return {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": body}

    with tempfile.TemporaryDirectory(prefix="lowtide-bench-") as tmp:
        proc, client = start_lowtide(Path(tmp))
        try:
            cold, _ = _run_batch(
                client, [chat(0, "Hello!")], "/v1/chat/completions"
            )  # loads the model
            elapsed, batch = _run_batch(
                client, [chat(i, t) for i, t in enumerate(texts)], "/v1/chat/completions"
            )
            chat_rate = batch.usage.output_tokens / elapsed
            _run_batch(client, [emb(0, "warm up")], "/v1/embeddings")
            elapsed, _ = _run_batch(
                client, [emb(i, t) for i, t in enumerate(short_texts)], "/v1/embeddings"
            )
            return chat_rate, len(short_texts) / elapsed, cold
        finally:
            stop(proc)


def bench_embeddings_direct(texts: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    encoder = load_encoder(minilm_folder())  # what the server runs (bench/embeddings.py compares)
    load = time.perf_counter() - started
    ids = encoder.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    started = time.perf_counter()
    for start in range(0, len(order), 64):
        encoder.encode_ids([ids[i] for i in order[start : start + 64]])
    return len(texts) / (time.perf_counter() - started), load


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--texts", type=int, default=10_000)
    parser.add_argument(
        "--skip-naive", action="store_true", help="skip the slow one-at-a-time baseline"
    )
    args = parser.parse_args()
    texts = prompts(args.requests)
    short = [
        f"Ticket {i}: my {TOPICS[i % 8]} order arrived damaged, please refund."
        for i in range(args.texts)
    ]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.requests} chat requests x {args.tokens} tokens"
    )

    with tempfile.TemporaryDirectory(prefix="lowtide-models-") as cache:
        ceiling = bench_ceiling(texts, args.tokens, Path(cache))
    lowtide_chat, lowtide_emb, cold = bench_lowtide(texts, args.tokens, short)
    naive = None if args.skip_naive else bench_naive(texts, args.tokens)
    direct_emb, emb_load = bench_embeddings_direct(short)

    print("\nchat completions (aggregate completion tokens/s)")
    print(f"  {'engine':<52}{'tok/s':>8}{'vs naive':>10}{'vs ceiling':>12}")
    rows = [
        ("naive: high-level API, Q4_1 as shipped, one at a time", naive),
        ("ceiling: Lowtide's batched engine, driven directly", ceiling),
        ("lowtide: a real batch through `lowtide serve`", lowtide_chat),
    ]
    for name, rate in rows:
        if rate is None:
            continue
        vs_naive = f"{rate / naive:.2f}x" if naive else "-"
        print(f"  {name:<52}{rate:>8.1f}{vs_naive:>10}{rate / ceiling:>11.2f}x")
    print(f"  (first batch, including F16 conversion and model load: {cold:.1f} s)")
    print(f"\nembeddings ({args.texts} short texts, all-MiniLM-L6-v2, onnxruntime)")
    print(f"  encoder directly: {direct_emb:8.0f} emb/s   (load {emb_load:.2f} s)")
    print(
        f"  lowtide batch:    {lowtide_emb:8.0f} emb/s   (one text per line, create -> completed)"
    )


if __name__ == "__main__":
    main()
