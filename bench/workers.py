"""Scale-out: one batch's throughput with 1, 2 and 4 `lowtide worker` processes.

Each run starts a fresh `lowtide serve --no-workers` and N workers sharing one database (SQLite
by default, or a fresh PostgreSQL database with --database-url) and one data folder, uploads
the same input, and times batch create -> completed. The simulated upstream answers every
request after --latency-ms; each worker process may keep --concurrency requests in flight, as
a per-process route limit would in production. The CPU seconds column shows which process
was busy, so you can tell whether the upstream (sim) or this machine's cores were the limit.

    .venv/bin/python bench/workers.py [--workers 1,2,4] [--lines 20000] [--latency-ms 100]
        [--concurrency 32] [--repeats 1] [--database-url postgresql://postgres@127.0.0.1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import cpu_seconds, start_lowtide, start_worker, stop  # noqa: E402
from throughput import proc_kib, write_input  # noqa: E402

from lowtide_sim.launch import start_simulator  # noqa: E402


def fresh_database(base_url: str | None) -> str:
    if not base_url:
        return ""
    import psycopg

    name = f"lowtide_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f'database_url = "{base_url}/{name}"\n'


def run_once(args: argparse.Namespace, workers: int, input_path: Path, sim_url: str) -> dict:
    config = fresh_database(args.database_url) + (
        f'[[models]]\nname = "sim-model"\nengine = "openai"\nbase_url = "{sim_url}"\n'
        f"max_concurrency = {args.concurrency}\nadaptive = false\n"
        "[batches]\nshard_lines = 250\n[worker]\nmax_active_shards = 4\n"
    )
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-workers-") as tmp:
        data = Path(tmp)
        api, client = start_lowtide(data, config, "--no-workers")
        procs = [start_worker(data) for _ in range(workers)]
        try:
            with input_path.open("rb") as fh:
                f = client.files.create(file=fh, purpose="batch")
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in [api, *procs]}
            t0 = time.perf_counter()
            batch = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.1)
                batch = client.batches.retrieve(batch.id)
            seconds = time.perf_counter() - t0
            counts = batch.request_counts
            if batch.status != "completed" or counts.completed != args.lines:
                raise SystemExit(f"batch ended {batch.status} with {counts}")
            return {
                "seconds": seconds,
                "lines_per_s": args.lines / seconds,
                "api_cpu": cpu_seconds(api.pid) - cpu0[api.pid],
                "worker_cpu": sum(cpu_seconds(p.pid) - cpu0[p.pid] for p in procs),
                "api_mib": proc_kib(api.pid, "VmHWM") / 1024,
                "worker_mib": max(proc_kib(p.pid, "VmHWM") for p in procs) / 1024,
            }
        finally:
            for p in procs:
                stop(p)
            stop(api)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", type=int, default=32, help="in-flight requests per worker")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--database-url", help="PostgreSQL server URL (no database name)")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    sim = start_simulator("--latency-ms", str(args.latency_ms))
    print(
        f"{os.cpu_count()} CPUs; {args.lines} lines; upstream latency {args.latency_ms:g} ms; "
        f"{args.concurrency} in flight per worker; "
        f"store: {'PostgreSQL' if args.database_url else 'SQLite'} + local folder"
    )
    print(
        f"{'workers':>7} {'seconds':>8} {'lines/s':>8} {'speed-up':>8} {'API cpu s':>9} "
        f"{'workers cpu s':>13} {'sim cpu s':>9} {'API MiB':>8} {'worker MiB':>10}"
    )
    base = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            input_path = Path(tmp) / "input.jsonl"
            write_input(input_path, args.lines, "sim-model")
            for n in counts:
                runs = []
                for _ in range(args.repeats):
                    sim0 = cpu_seconds(sim.process.pid)
                    run = run_once(args, n, input_path, sim.url)
                    run["sim_cpu"] = cpu_seconds(sim.process.pid) - sim0
                    runs.append(run)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                base = base or med["lines_per_s"]
                print(
                    f"{n:>7} {med['seconds']:>8.1f} {med['lines_per_s']:>8.0f} "
                    f"{med['lines_per_s'] / base:>7.2f}x {med['api_cpu']:>9.1f} "
                    f"{med['worker_cpu']:>13.1f} {med['sim_cpu']:>9.1f} "
                    f"{med['api_mib']:>8.0f} {med['worker_mib']:>10.0f}",
                    flush=True,
                )
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
