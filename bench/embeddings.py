"""Embeddings throughput: MiniLM on ONNX Runtime (Lowtide's encoder) beside what else runs on CPU.

Encoders driven directly (texts sorted by length, 64 a call, all cores), in interleaved rounds so
that the machine's noise falls on each alike:
  numpy     - the hand-written numpy BERT Lowtide used before (`engines/bert.py`);
  onnx      - the standard-operator graph an ONNX export of the sentence-transformers model
              gives (what `optimum`/`torch.onnx.export` + onnxruntime would run), ONNX Runtime's
              generic graph optimizations on;
  q8        - the same graph with the attention-output and feed-forward products on 8-bit
              block-quantized weights (MatMulNBits, `engines/bert_onnx.py`).
Lowtide's encoder is whichever of onnx and q8 is faster on this CPU (timed once when it loads;
the line "Lowtide chose" says which). Then texts/s through a real Lowtide batch (`lowtide
serve`, one text per line, create -> completed), once with the numpy encoder
(LOWTIDE_EMBEDDINGS_ENCODER=numpy) and once with the ONNX one, the two servers' batches
alternating: the short texts, and --mixed-texts chunks of 10-256 tokens in random order (where
the engine's length grouping and token budget per call matter). Every figure is the median of --repeats rounds;
ratios are between medians of this one run. Vectors are checked against numpy (min cosine).

    .venv/bin/python bench/embeddings.py [--texts 5000] [--direct-texts 2000] [--mixed-texts 400]
        [--repeats 3]
    .venv/bin/python bench/embeddings.py --threads 1   # core for core, steadier on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop, timed_batch  # noqa: E402

from lowtide.engines.bert import BertSentenceEncoder  # noqa: E402
from lowtide.engines.bert_onnx import OnnxSentenceEncoder  # noqa: E402
from lowtide.engines.model_files import minilm_folder  # noqa: E402

TOPICS = ["a lighthouse", "the moon", "a robot", "a bakery", "the ocean", "a violin", "a city"]
MODEL = "all-MiniLM-L6-v2"


def short_texts(n: int) -> list[str]:
    """The README's corpus: short support tickets (15-17 tokens)."""
    return [
        f"Ticket {i}: my {TOPICS[i % len(TOPICS)]} order arrived damaged, please refund."
        for i in range(n)
    ]


def encode_all(encoder, ids: list[list[int]], batch: int = 64) -> np.ndarray:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.empty((len(ids), encoder.dim), dtype=np.float32)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        out[chunk] = encoder.encode_ids([ids[i] for i in chunk])
    return out


def bench_direct(
    texts: list[str], repeats: int, cache: Path, threads: int
) -> tuple[dict, dict, dict, dict, str]:
    folder = minilm_folder()
    loads: dict[str, float] = {}
    started = time.perf_counter()
    encoders = {"numpy": BertSentenceEncoder(folder)}
    loads["numpy"] = time.perf_counter() - started
    started = time.perf_counter()
    encoders["onnx"] = OnnxSentenceEncoder(folder, cache, q8=False, threads=threads or None)
    loads["onnx (first: build + cache the graph)"] = time.perf_counter() - started
    started = time.perf_counter()
    encoders["q8"] = OnnxSentenceEncoder(folder, cache, q8=True, threads=threads or None)
    loads["q8 (first: build + cache the graph)"] = time.perf_counter() - started
    started = time.perf_counter()
    chosen = OnnxSentenceEncoder(folder, cache, threads=threads or None)
    loads["Lowtide (first: time both graphs, choose)"] = time.perf_counter() - started
    started = time.perf_counter()
    OnnxSentenceEncoder(folder, cache, threads=threads or None)
    loads["Lowtide (choice cached)"] = time.perf_counter() - started

    ids = encoders["numpy"].tokenize(texts)
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    per_cpu: dict[str, list[float]] = {name: [] for name in encoders}
    vectors: dict[str, np.ndarray] = {}
    for name, encoder in encoders.items():  # warm-up: first-call allocations, thread pools
        vectors[name] = encode_all(encoder, ids[:256])
    for _ in range(repeats):
        for name, encoder in encoders.items():
            started, cpu = time.perf_counter(), time.process_time()
            vectors[name] = encode_all(encoder, ids)
            rates[name].append(len(texts) / (time.perf_counter() - started))
            per_cpu[name].append(len(texts) / (time.process_time() - cpu))
    cos = {name: float((vectors[name] * vectors["numpy"]).sum(axis=1).min()) for name in encoders}
    return rates, per_cpu, loads, cos, "q8" if chosen.q8 else "onnx"


def _run_batch(client, texts: list[str]) -> float:
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": text},
        }
        for i, text in enumerate(texts)
    ]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    _, elapsed = timed_batch(client, raw, "/v1/embeddings")
    return len(texts) / elapsed


def mixed_texts(n: int) -> list[str]:
    """Chunks of a document collection: 8 to 200 random vocabulary words (~10-256 tokens, past
    the 256-token truncation now and then), in random order: what a vector database ingests."""
    rng = random.Random(1)
    words = (minilm_folder() / "vocab.txt").read_text().split()[2000:12000]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 200))) for _ in range(n)]


def bench_batches(corpora: dict[str, list[str]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """texts/s through real batches, per corpus, for a server on each encoder."""
    rates = {corpus: {"numpy": [], "lowtide": []} for corpus in corpora}
    servers = {}
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-emb-") as tmp:
        try:
            for name, encoder in (("numpy", "numpy"), ("lowtide", "onnx")):
                os.environ["LOWTIDE_EMBEDDINGS_ENCODER"] = encoder
                servers[name] = start_lowtide(Path(tmp) / name)
                _run_batch(servers[name][1], ["warm up"] * 64)  # loads the model
            os.environ.pop("LOWTIDE_EMBEDDINGS_ENCODER")
            for _ in range(repeats):
                for corpus, texts in corpora.items():
                    for name, (_, client) in servers.items():
                        rates[corpus][name].append(_run_batch(client, texts))
        finally:
            for proc, _ in servers.values():
                stop(proc)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=5_000, help="texts per Lowtide batch")
    parser.add_argument("--direct-texts", type=int, default=2_000, help="texts per direct round")
    parser.add_argument(
        "--mixed-texts", type=int, default=400, help="10-256-token texts per batch (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-batches", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="encoders on this many threads (numpy's BLAS too; skips the batches): "
        "--threads 1 compares the engines core for core, which holds on a busy machine",
    )
    args = parser.parse_args()
    if args.threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # read when numpy loads: start again with them
        os.execv(sys.executable, [sys.executable, *sys.argv])
    threads = f", encoders on {args.threads} thread(s)" if args.threads else ""
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs{threads}, {MODEL}")

    with tempfile.TemporaryDirectory(prefix="lowtide-bench-onnx-") as cache:
        direct, per_cpu, loads, cos, chosen = bench_direct(
            short_texts(args.direct_texts), args.repeats, Path(cache), args.threads
        )
    short = f"{args.texts} short texts (15-17 tokens)"
    corpora = {short: short_texts(args.texts)}
    if args.mixed_texts:
        corpora[f"{args.mixed_texts} texts of 10-256 tokens, mixed"] = mixed_texts(args.mixed_texts)
    batches = None if args.skip_batches or args.threads else bench_batches(corpora, args.repeats)

    med = {name: statistics.median(r) for name, r in direct.items()}
    print(f"\nencoder directly, {args.direct_texts} short texts, median of {args.repeats}")
    print(
        f"  {'encoder':<54}{'texts/s':>9}{'(min-max)':>12}{'vs numpy':>10}{'vs onnx':>9}"
        f"{'per CPU-s':>11}{'vs numpy':>10}{'min cos':>10}"
    )
    labels = {
        "numpy": "numpy BERT (Lowtide's encoder before)",
        "onnx": "ONNX export graph on onnxruntime (a user's CPU option)",
        "q8": "onnxruntime, 8-bit feed-forward weights (MatMulNBits)",
    }
    cpu = {name: statistics.median(r) for name, r in per_cpu.items()}
    for name, rates in direct.items():
        span = f"({min(rates):.0f}-{max(rates):.0f})"
        print(
            f"  {labels[name]:<54}{med[name]:>9.0f}{span:>12}"
            f"{med[name] / med['numpy']:>9.2f}x{med[name] / med['onnx']:>8.2f}x"
            f"{cpu[name]:>11.0f}{cpu[name] / cpu['numpy']:>9.2f}x{cos[name]:>10.5f}"
        )
    print("  (per CPU-s: texts per second of this process's CPU time, all its threads;")
    print("   min cos: the lowest cosine against the numpy encoder over every text)")
    print("  load: " + ", ".join(f"{k} {v:.2f} s" for k, v in loads.items()))
    print(f"  Lowtide chose: {labels[chosen]}")
    for corpus, rates in (batches or {}).items():
        bmed = {name: statistics.median(r) for name, r in rates.items()}
        print(f"\nthrough a Lowtide batch, {corpus}, one per line, median of {args.repeats}")
        for name, label in (("numpy", "numpy encoder (before)"), ("lowtide", "Lowtide's encoder")):
            span = f"({min(rates[name]):.1f}-{max(rates[name]):.1f})"
            print(f"  {label:<54}{bmed[name]:>9.1f}{span:>14}{bmed[name] / bmed['numpy']:>9.2f}x")
        if corpus == short:
            print(
                f"  batch / direct (Lowtide's overhead): numpy {bmed['numpy'] / med['numpy']:.2f}, "
                f"onnx {bmed['lowtide'] / med[chosen]:.2f}"
            )


if __name__ == "__main__":
    main()
