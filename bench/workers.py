"""Scale-out: one batch's throughput with 1, 2 and 4 `lowtide worker` processes.

Each run starts a fresh `lowtide serve --no-workers` and N workers sharing one database (SQLite
by default, or a fresh PostgreSQL database with --database-url) and one data folder, uploads
the same input, and times batch create -> completed. The simulated upstream answers every
request after --latency-ms; each worker process may keep --concurrency requests in flight, as
a per-process route limit would in production. The CPU seconds column shows which process
was busy, so you can tell whether the upstream (sim) or this machine's cores were the limit.

The first row is the baseline for Lowtide's own cost: a bare aiohttp loop (bench/bare_client.py)
sending the same requests to the same simulator with the same in-flight limit, nothing of
Lowtide around it. "cpu ms/line" is the CPU of the sending process(es) alone per line: the bare
loop, or the worker processes (the API's and the simulator's CPU are in their own columns), and
"vs bare" divides it by the bare loop's. Repeats are interleaved (bare, 1, 2, 4 workers, bare,
...) so every row sees the same machine; each cell is the median. --baseline-src adds a row
"base": one worker (and its API) running another checkout's code, e.g. a `git worktree` of the
previous commit, so a change is measured against what it replaced in the same run.

--embedding-dim N sends embeddings requests instead of chat ones, each answered with one vector
of N floats (1536: text-embedding-3-small's size), where the answer is most of the bytes.

    .venv/bin/python bench/workers.py [--workers 1,2,4] [--lines 20000] [--latency-ms 100]
        [--concurrency 32] [--repeats 1] [--shard-lines 250]
        [--database-url postgresql://postgres@127.0.0.1] [--no-bare] [--baseline-src DIR/src]
        [--embedding-dim 1536] [--http-client aiohttp,pyreqwest]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import cpu_seconds, start_lowtide, start_worker, stop  # noqa: E402
from throughput import proc_kib, write_input  # noqa: E402

from lowtide_sim.launch import start_simulator  # noqa: E402


def fresh_database(base_url: str) -> str:
    """The URL of a new, empty database on the PostgreSQL server at `base_url`."""
    import psycopg

    name = f"lowtide_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"


def write_embedding_input(path: Path, lines: int, model: str) -> None:
    """Embeddings request lines, one short text each (the answer is the large part)."""
    with path.open("w") as fh:
        for i in range(lines):
            body = {"model": model, "input": f"ticket {i}: printer offline again"}
            req = {"custom_id": f"req-{i:08d}", "method": "POST", "url": "/v1/embeddings"}
            fh.write(json.dumps({**req, "body": body}, separators=(",", ":")) + "\n")


def database_config(base_url: str | None) -> str:
    """The configuration line for a fresh PostgreSQL database, or "" for SQLite."""
    return f'database_url = "{fresh_database(base_url)}"\n' if base_url else ""


def run_once(
    args: argparse.Namespace,
    workers: int,
    input_path: Path,
    sim_url: str,
    src: Path | None = None,
    client: str = "aiohttp",
) -> dict:
    config = database_config(args.database_url) + (
        f'[[models]]\nname = "sim-model"\nengine = "openai"\nbase_url = "{sim_url}"\n'
        f"max_concurrency = {args.concurrency}\nadaptive = false\n"
        + (f'http_client = "{client}"\n' if client != "aiohttp" else "")
        + f"[batches]\nshard_lines = {args.shard_lines}\n[worker]\nmax_active_shards = 4\n"
        + "".join(f"{setting}\n" for setting in args.worker_setting)
    )
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-workers-") as tmp:
        data = Path(tmp)
        api, client = start_lowtide(data, config, "--no-workers", src=src)
        procs = [start_worker(data, src) for _ in range(workers)]
        try:
            with input_path.open("rb") as fh:
                f = client.files.create(file=fh, purpose="batch")
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in [api, *procs]}

            def workers_cpu() -> float:
                return sum(cpu_seconds(p.pid) - cpu0[p.pid] for p in procs)

            t0 = time.perf_counter()
            batch = client.batches.create(
                input_file_id=f.id, endpoint=f"/v1/{args.path}", completion_window="24h"
            )
            # The workers' CPU when the batch is first seen running and first seen finalizing:
            # validation, sending and finalize apart (to a poll interval, 50 ms).
            phase_cpu: dict[str, float] = {}
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.05)
                batch = client.batches.retrieve(batch.id)
                if batch.status in ("in_progress", "finalizing", "completed"):
                    phase_cpu.setdefault("in_progress", workers_cpu())
                if batch.status in ("finalizing", "completed"):
                    phase_cpu.setdefault("finalizing", workers_cpu())
            seconds = time.perf_counter() - t0
            counts = batch.request_counts
            if batch.status != "completed" or counts.completed != args.lines:
                raise SystemExit(f"batch ended {batch.status} with {counts}")
            return {
                "seconds": seconds,
                "lines_per_s": args.lines / seconds,
                "api_cpu": cpu_seconds(api.pid) - cpu0[api.pid],
                "worker_cpu": (total := workers_cpu()),
                "validate_cpu": phase_cpu["in_progress"],
                "send_cpu": phase_cpu["finalizing"] - phase_cpu["in_progress"],
                "finalize_cpu": total - phase_cpu["finalizing"],
                "api_mib": proc_kib(api.pid, "VmHWM") / 1024,
                "worker_mib": max(proc_kib(p.pid, "VmHWM") for p in procs) / 1024,
            }
        finally:
            for p in procs:
                stop(p)
            stop(api)


def run_bare(args: argparse.Namespace, input_path: Path, sim_url: str, client: str) -> dict:
    """The bare aiohttp loop in its own process; its CPU is measured inside, from input to end."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "bare_client.py"),
            "--url",
            f"{sim_url}/{args.path}",
            "--requests-file",
            str(input_path),
            "--concurrency",
            str(args.concurrency),
            "--client",
            client,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout)
    if result["statuses"] != {"200": args.lines}:
        raise SystemExit(f"bare loop answers: {result['statuses']}")
    return {
        "seconds": result["seconds"],
        "lines_per_s": args.lines / result["seconds"],
        "api_cpu": float("nan"),
        "worker_cpu": result["cpu"],
        "validate_cpu": 0.0,
        "send_cpu": result["cpu"],
        "finalize_cpu": 0.0,
        "api_mib": float("nan"),
        "worker_mib": float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--lines", type=int, default=20_000)
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", type=int, default=32, help="in-flight requests per worker")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--shard-lines", type=int, default=250, help="lines per shard (server default: 1000)"
    )
    p.add_argument(
        "--http-client",
        default="aiohttp",
        help="the route's http_client and the bare loop's library; two, comma-separated "
        "(aiohttp,pyreqwest), run every row on each, interleaved",
    )
    p.add_argument(
        "--embedding-dim",
        type=int,
        default=0,
        help="send embeddings requests answered with vectors of this size (default: chat)",
    )
    p.add_argument("--database-url", help="PostgreSQL server URL (no database name)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare aiohttp baseline row")
    p.add_argument(
        "--baseline-src",
        type=Path,
        help="another checkout's src/ folder: adds a row 'base', one worker running that code",
    )
    p.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a line for the workers' [worker] section, e.g. 'poll_seconds = 2' (repeatable)",
    )
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    args.path = "embeddings" if args.embedding_dim else "chat/completions"
    sim = start_simulator(
        "--latency-ms", str(args.latency_ms), "--embedding-dim", str(args.embedding_dim or 8)
    )
    print(
        f"{os.cpu_count()} CPUs; {args.lines} lines; upstream latency {args.latency_ms:g} ms; "
        f"{args.concurrency} in flight per worker; {args.shard_lines} lines a shard; "
        f"/v1/{args.path}{f' ({args.embedding_dim} floats)' if args.embedding_dim else ''}; "
        f"store: {'PostgreSQL' if args.database_url else 'SQLite'} + local folder"
    )
    print(
        f"{'workers':>7} {'seconds':>8} {'lines/s':>8} {'speed-up':>8} {'API cpu s':>9} "
        f"{'workers cpu s':>13} {'cpu ms/line':>11} {'vs bare':>7} {'sim cpu s':>9} "
        f"{'API MiB':>8} {'worker MiB':>10}"
    )
    # Rows: "bare", "base", worker counts; with a second HTTP client, the same again as
    # "bare@pyreqwest", "1@pyreqwest", ... (each row against its own client's bare loop).
    clients = args.http_client.split(",")
    groups: list[str] = []
    for client in clients:
        at = "" if client == clients[0] else f"@{client}"
        groups += [] if args.no_bare else [f"bare{at}"]
        groups += ["base"] if args.baseline_src and not at else []
        groups += [f"{n}{at}" for n in counts]
    runs: dict[str, list[dict]] = {g: [] for g in groups}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            input_path = Path(tmp) / "input.jsonl"
            if args.embedding_dim:
                write_embedding_input(input_path, args.lines, "sim-model")
            else:
                write_input(input_path, args.lines, "sim-model")
            for rep in range(args.repeats):
                for g in groups:
                    sim0 = cpu_seconds(sim.process.pid)
                    kind, _, client = g.partition("@")
                    client = client or clients[0]
                    if kind == "bare":
                        run = run_bare(args, input_path, sim.url, client)
                    elif kind == "base":
                        run = run_once(args, 1, input_path, sim.url, args.baseline_src, client)
                    else:
                        run = run_once(args, int(kind), input_path, sim.url, None, client)
                    run["sim_cpu"] = cpu_seconds(sim.process.pid) - sim0
                    runs[g].append(run)
                    ms = 1000 * run["worker_cpu"] / args.lines
                    print(
                        f"# repeat {rep + 1}: {g} {run['seconds']:.1f} s, {ms:.3f} cpu ms/line",
                        file=sys.stderr,
                        flush=True,
                    )
        base = None
        bare_ms: dict[str, float] = {}  # by client suffix
        for g in groups:
            med = {k: statistics.median(r[k] for r in runs[g]) for k in runs[g][0]}
            ms = 1000 * med["worker_cpu"] / args.lines
            kind, at, client = g.partition("@")
            if kind == "bare":
                bare_ms[client] = ms
            elif kind != "base":
                base = base or med["lines_per_s"]
            speed = (
                f"{med['lines_per_s'] / base:>7.2f}x"
                if base and kind not in ("bare", "base")
                else f"{'':>8}"
            )
            ratio = f"{ms / bare_ms[client]:>6.2f}x" if client in bare_ms else f"{'':>7}"
            api_cpu, api_mib, worker_mib = (
                (f"{'-':>9}", f"{'-':>8}", f"{'-':>10}")  # the bare loop has no API process
                if kind == "bare"
                else (
                    f"{med['api_cpu']:>9.1f}",
                    f"{med['api_mib']:>8.0f}",
                    f"{med['worker_mib']:>10.0f}",
                )
            )
            print(
                f"{g:>7} {med['seconds']:>8.1f} {med['lines_per_s']:>8.0f} {speed} {api_cpu} "
                f"{med['worker_cpu']:>13.2f} {ms:>11.3f} {ratio} {med['sim_cpu']:>9.1f} "
                f"{api_mib} {worker_mib}",
                flush=True,
            )
        print_phases(groups, runs, args.lines)
    finally:
        sim.stop()


def print_phases(groups: list[str], runs: dict[str, list[dict]], lines: int) -> None:
    """Where the sending processes' CPU went, per line: validating the input, sending (the
    batch in_progress: the part the bare loop does too), finalizing the output."""
    print(
        f"\n{'workers':>7} {'validate us/line':>16} {'send us/line':>12} {'send vs bare':>12} "
        f"{'finalize us/line':>16}"
    )
    bare_us: dict[str, float] = {}  # by client suffix
    for g in groups:
        us = {
            k: 1e6 * statistics.median(r[f"{k}_cpu"] for r in runs[g]) / lines
            for k in ("validate", "send", "finalize")
        }
        kind, _, client = g.partition("@")
        if kind == "bare":
            bare_us[client] = us["send"]
        ratio = f"{us['send'] / bare_us[client]:>11.2f}x" if client in bare_us else f"{'':>12}"
        print(
            f"{g:>7} {us['validate']:>16.1f} {us['send']:>12.1f} {ratio} {us['finalize']:>16.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
