"""Throughput scheduling benchmarks against the simulated upstream. Each prints a small table.

known        5,000 requests, upstream limited to 3,000 RPM and a TPM limit that binds for part
             of the run; Lowtide told the limits, vs the cookbook runner told the same limits.
unknown      the same upstream; Lowtide told nothing (it learns from headers and 429s).
fairness     one 200,000-line batch, then twenty 50-line batches: time for each small one.
interactive  an upstream with a fixed capacity; an interactive client's p50/p99 alone, with a
             large batch on a route marked shared, and with the batch on an unshared route.

  .venv/bin/python bench/scheduling.py [known unknown fairness interactive]
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cookbook_baseline import run_cookbook  # noqa: E402
from processes import start_lowtide, stop  # noqa: E402

from lowtide_sim.interactive import run_interactive  # noqa: E402
from lowtide_sim.launch import start_simulator  # noqa: E402

RPM, TPM, LATENCY_MS = 3000, 400_000, 50


def route(sim_url: str, extra: str = "") -> str:
    return f"""
[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim_url}"
max_concurrency = 256
timeout = 60
max_retries = 10
{extra}

[worker]
poll_seconds = 0.1
"""


def chat(i: int, words: int, max_tokens: int) -> dict:
    content = " ".join(f"w{i}x{j}" for j in range(words))
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def run_batch(client: OpenAI, lines: list[dict], metadata: dict | None = None, wait: bool = True):
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(raw)), purpose="batch")
    started = time.perf_counter()
    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
    )
    if not wait:
        return b, started
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        b = client.batches.retrieve(b.id)
    return b, time.perf_counter() - started


# -- 1 and 2: limits ---------------------------------------------------------------------
def limit_workload() -> list[dict]:
    # The first 600 requests are expensive (800 output tokens): the TPM limit binds for them;
    # afterwards requests are cheap and the RPM limit binds.
    return [chat(i, 10, 800 if i < 600 else 20) for i in range(5000)]


def theoretical_minimum(lines: list[dict]) -> float:
    """Earliest finish the limits allow: both buckets start full, refill continuously."""
    t, req, tok = 0.0, float(RPM), float(TPM)
    for line in lines:
        body = line["body"]
        cost = len(body["messages"][0]["content"].split()) + body["max_tokens"]
        wait = max(0.0, (1 - req) / (RPM / 60), (cost - tok) / (TPM / 60))
        t += wait
        req = min(RPM, req + wait * RPM / 60) - 1
        tok = min(TPM, tok + wait * TPM / 60) - cost
    return t + LATENCY_MS / 1000


def bench_limits(told: bool) -> list[tuple]:
    lines = limit_workload()
    best = theoretical_minimum(lines)
    rows = []
    with start_simulator(
        "--rpm", str(RPM), "--tpm", str(TPM), "--latency-ms", str(LATENCY_MS)
    ) as sim:
        with tempfile.TemporaryDirectory(prefix="lowtide-bench-") as tmp:
            extra = f"rpm = {RPM}\ntpm = {TPM}" if told else ""
            server, client = start_lowtide(Path(tmp), route(sim.url, extra))
            try:
                sim.reset()
                b, wall = run_batch(client, lines)
                stats = sim.stats()
                label = "lowtide, limits configured" if told else "lowtide, limits learned"
                rows.append((label, wall, best, stats["rate_limited"], b.request_counts.completed))
            finally:
                stop(server)
        if told:
            sim.reset()
            result = asyncio.run(
                run_cookbook(
                    [{"custom_id": ln["custom_id"], "body": ln["body"]} for ln in lines],
                    sim.url + "/chat/completions",
                    "bench",
                    rpm=RPM,
                    tpm=TPM,
                )
            )
            rows.append(
                (
                    "cookbook runner (static buckets, 15 s pause)",
                    result["wall_s"],
                    best,
                    sim.stats()["rate_limited"],
                    result["succeeded"],
                )
            )
    return rows


def print_limits(rows: list[tuple]) -> None:
    print(f"\n{'runner':<46}{'wall s':>8}{'min s':>8}{'vs min':>8}{'429s':>7}{'done':>7}")
    for label, wall, best, limited, done in rows:
        print(f"{label:<46}{wall:>8.1f}{best:>8.1f}{wall / best:>7.2f}x{limited:>7}{done:>7}")


# -- 3: fairness -------------------------------------------------------------------------
def bench_fairness(big_lines: int = 200_000, small: int = 20) -> None:
    sim = start_simulator("--latency-ms", "100")
    url = sim.url
    try:
        with tempfile.TemporaryDirectory(prefix="lowtide-bench-") as tmp:
            server, client = start_lowtide(
                Path(tmp), route(url).replace("max_concurrency = 256", "max_concurrency = 64")
            )
            try:
                big, _ = run_batch(client, [chat(i, 10, 16) for i in range(big_lines)], wait=False)
                while client.batches.retrieve(big.id).request_counts.completed < 500:
                    time.sleep(0.1)
                pending = {}
                for k in range(small):
                    lines = [chat(i, 10, 16) | {"custom_id": f"s{k}-{i}"} for i in range(50)]
                    b, started = run_batch(client, lines, wait=False)
                    pending[b.id] = (k, started)
                times = {}
                while pending:
                    for batch_id, (k, started) in list(pending.items()):
                        if client.batches.retrieve(batch_id).status == "completed":
                            times[k] = time.perf_counter() - started
                            del pending[batch_id]
                    time.sleep(0.05)
                done_big = client.batches.retrieve(big.id).request_counts.completed
                client.batches.cancel(big.id)
            finally:
                stop(server)
    finally:
        sim.stop()
    values = sorted(times.values())
    print(
        f"\n{small} batches of 50 lines created behind a {big_lines:,}-line batch (upstream: 100 ms, 64 in flight)"
    )
    print(
        "  seconds to complete, per small batch: "
        + " ".join(f"{times[k]:.1f}" for k in sorted(times))
    )
    print(
        f"  median {values[len(values) // 2]:.1f} s, max {values[-1]:.1f} s; the big batch had {done_big:,} lines done meanwhile"
    )


# -- 4: interactive co-existence ---------------------------------------------------------
CAPACITY, PER_REQUEST = 3000, 100


def bench_interactive(duration: float = 20.0, rate: float = 4.0) -> None:
    flags = [
        "--capacity-tokens-per-s",
        str(CAPACITY),
        "--max-tokens-per-s-per-request",
        str(PER_REQUEST),
        "--max-running",
        "256",
    ]
    rows = []
    for mode in ("alone", "shared", "unshared"):
        sim = start_simulator(*flags)
        url = sim.url
        try:
            with tempfile.TemporaryDirectory(prefix="lowtide-bench-") as tmp:
                extra = (
                    f'shared = true\nmetrics_url = "{sim.root}/metrics"\nbatch_priority = 10'
                    if mode == "shared"
                    else "adaptive = false"
                )
                server, client = start_lowtide(Path(tmp), route(url, extra))
                try:
                    if mode != "alone":
                        run_batch(client, [chat(i, 10, 64) for i in range(20_000)], wait=False)
                        time.sleep(8)  # let the batch reach its steady state
                    before = sim.stats()["completion_tokens_total"]
                    started = time.perf_counter()
                    result = asyncio.run(
                        run_interactive(
                            url, rate, duration, max_tokens=32, model="sim-model", seed=1
                        )
                    )
                    elapsed = time.perf_counter() - started
                    total = sim.stats()["completion_tokens_total"] - before
                    batch_rate = max(0.0, total - result["ok"] * 32) / elapsed
                    rows.append(
                        (mode, result["p50_ms"], result["p99_ms"], result["ok"], batch_rate)
                    )
                finally:
                    stop(server)
        finally:
            sim.stop()
    idle = CAPACITY - rate * 32
    print(
        f"\nupstream capacity {CAPACITY} tok/s ({PER_REQUEST} tok/s per request); interactive: {rate}/s x 32 tokens"
    )
    print(
        f"{'batch':<12}{'p50 ms':>9}{'p99 ms':>9}{'p99 vs alone':>14}{'batch tok/s':>13}{'of idle':>9}"
    )
    base = rows[0][2]
    for mode, p50, p99, _ok, batch_rate in rows:
        print(
            f"{mode:<12}{p50:>9.0f}{p99:>9.0f}{p99 / base:>13.2f}x{batch_rate:>13.0f}{batch_rate / idle:>8.0%}"
        )


def main() -> None:
    chosen = sys.argv[1:] or ["known", "unknown", "fairness", "interactive"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    if "known" in chosen or "unknown" in chosen:
        print(f"\nlimits: 5,000 requests; upstream {RPM} RPM, {TPM:,} TPM, {LATENCY_MS} ms latency")
        rows = []
        if "known" in chosen:
            rows += bench_limits(told=True)
        if "unknown" in chosen:
            rows += bench_limits(told=False)
        print_limits(rows)
    if "fairness" in chosen:
        bench_fairness()
    if "interactive" in chosen:
        bench_interactive()


if __name__ == "__main__":
    main()
