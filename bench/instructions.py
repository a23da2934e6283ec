"""Instructions per line, counted by valgrind's callgrind: the bare aiohttp loop against one
`lowtide worker`, the same requests to the same simulator (0 ms).

CPU time on a shared VM moves by tens of percent from run to run; instruction counts do not.
Each sender runs twice, for --big and for --small lines, and the difference is divided by the
difference in lines, so start-up, imports and shutdown cancel out. The worker's count is the
whole worker: validating the input, sending, finalizing. Its poll and segment timers are
slowed so that valgrind's slowness (~50x) adds no idle ticks or extra commits; a shard's end
still wakes it at once. --baseline-src adds the same count for another checkout's code (e.g.
a `git worktree` of the previous commit). Takes a few minutes per row.

    .venv/bin/python bench/instructions.py [--small 1000] [--big 6000] [--baseline-src DIR/src]
        [--keep DIR]   # keep the callgrind files, for callgrind_annotate
        [--rate-limit-headers]   # answers carry x-ratelimit-* headers, as a hosted API's do
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import env_for, start_lowtide, stop  # noqa: E402
from throughput import write_input  # noqa: E402

from lowtide_sim.launch import start_simulator  # noqa: E402

VALGRIND = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--collect-jumps=no"]
BENCH = Path(__file__).resolve().parent
# Counts that repeat: one string-hash seed (dict probes and set orders differ by seed: a few
# thousand instructions a line between runs), and one BLAS thread (numpy's idle pool threads
# spin at start-up, by a different number of instructions each run).
FIXED = {"PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}


def instructions(path: Path) -> int:
    """The total a callgrind output file reports."""
    with path.open() as fh:
        for line in fh:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no totals (did valgrind run?)")


def bare(sim_url: str, lines: int, folder: Path) -> int:
    requests = folder / f"bare-{lines}.jsonl"
    write_input(requests, lines, "sim-model")
    out = folder / f"callgrind.bare.{lines}"
    cmd = [sys.executable, str(BENCH / "bare_client.py"), "--url", f"{sim_url}/chat/completions"]
    cmd += ["--requests-file", str(requests)]
    subprocess.run(
        [*VALGRIND, f"--callgrind-out-file={out}", *cmd],
        check=True,
        capture_output=True,
        env={**os.environ, **FIXED},
    )
    return instructions(out)


def worker(sim_url: str, lines: int, folder: Path, name: str, src: Path | None) -> int:
    data = folder / f"data-{name}-{lines}"
    config = (
        f'[[models]]\nname = "sim-model"\nengine = "openai"\nbase_url = "{sim_url}"\n'
        "max_concurrency = 32\nadaptive = false\n[batches]\nshard_lines = 1000\n"
        "[worker]\nmax_active_shards = 4\npoll_seconds = 30\nsegment_seconds = 60\n"
    )
    api, client = start_lowtide(data, config, "--no-workers", src=src)
    out = folder / f"callgrind.{name}.{lines}"
    proc = None
    try:
        requests = folder / f"worker-{lines}.jsonl"
        write_input(requests, lines, "sim-model")
        with requests.open("rb") as fh:
            f = client.files.create(file=fh, purpose="batch")
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cmd = [sys.executable, "-m", "lowtide.cli", "worker", "--data-dir", str(data)]
        cmd += ["--config", str(data / "lowtide.toml"), "--log-level", "warning"]
        proc = subprocess.Popen(
            [*VALGRIND, f"--callgrind-out-file={out}", *cmd],
            env={**(env_for(src) or os.environ), **FIXED},
            stderr=subprocess.DEVNULL,
        )
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        if batch.status != "completed" or batch.request_counts.completed != lines:
            raise SystemExit(f"batch ended {batch.status} with {batch.request_counts}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(600)
        stop(api)
    return instructions(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--big", type=int, default=6000)
    p.add_argument("--baseline-src", type=Path, help="another checkout's src/: adds a row 'base'")
    p.add_argument("--keep", type=Path, help="a folder to keep the callgrind files in")
    p.add_argument(
        "--rate-limit-headers",
        action="store_true",
        help="the simulator sends x-ratelimit-* headers with every answer, as OpenAI does",
    )
    args = p.parse_args()
    # A hosted API's answers carry rate-limit headers (six of them), which Lowtide reads and
    # learns from on every answer: limits far above what the run sends, so none binds.
    limits = ["--rpm", "1000000000", "--tpm", "1000000000000"] if args.rate_limit_headers else []
    sim = start_simulator("--latency-ms", "0", *limits)
    lines = args.big - args.small
    try:
        with tempfile.TemporaryDirectory(prefix="lowtide-bench-instructions-") as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            base = (bare(sim.url, args.big, folder) - bare(sim.url, args.small, folder)) / lines
            print(f"{'sender':>7} {'instructions/line':>18} {'vs bare':>8}")
            print(f"{'bare':>7} {base / 1000:>17.0f}k {1:>7.2f}x", flush=True)
            rows = [("base", args.baseline_src)] if args.baseline_src else []
            for name, src in [*rows, ("worker", None)]:
                big = worker(sim.url, args.big, folder, name, src)
                small = worker(sim.url, args.small, folder, name, src)
                per_line = (big - small) / lines
                print(f"{name:>7} {per_line / 1000:>17.0f}k {per_line / base:>7.2f}x", flush=True)
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
