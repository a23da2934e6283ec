"""Gigabyte inputs: upload and validation rates, and whether memory stays flat as files grow.

For each size it writes a JSONL file of realistic ~450-byte classification requests, starts a
fresh `lowtide serve --no-workers` and one `lowtide worker`, uploads the file with the OpenAI
SDK, creates a batch and times validation (create -> in_progress: one streaming pass that
checks every line, cuts shards and finds duplicate custom_ids). It prints MB/s and the peak
resident memory of the API server and the worker. Flat memory means the peaks do not grow
with the file.

    .venv/bin/python bench/big_file.py [--lines 1000000,5000000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, start_worker, stop  # noqa: E402
from throughput import proc_kib  # noqa: E402
from workers import database_config  # noqa: E402

_TICKET = (
    "Order #{i} arrived with the charger missing and the box crushed on one side; I have "
    "emailed twice and the chat bot keeps closing my case. Please send the charger or refund "
    "the order, and tell me which it will be."
)


def write_input(path: Path, lines: int) -> None:
    """Streams lines to disk; the benchmark itself never holds the file either."""
    head = '{"custom_id":"ticket-'
    mid = (
        '","method":"POST","url":"/v1/chat/completions","body":{"model":"lowtide-echo",'
        '"max_tokens":4,"messages":[{"role":"system","content":"Label the ticket: billing, '
        'shipping, product or other."},{"role":"user","content":"'
    )
    with path.open("w", buffering=1 << 22) as fh:
        for i in range(lines):
            fh.write(f'{head}{i:09d}{mid}{_TICKET.format(i=i)}"}}]}}}}\n')


def run_once(lines: int, tmp: Path, database_url: str | None) -> dict:
    input_path = tmp / f"input-{lines}.jsonl"
    write_input(input_path, lines)
    size = input_path.stat().st_size
    config = database_config(database_url) + (
        '[[models]]\nname = "lowtide-echo"\nengine = "echo"\n'
        "[batches]\nmax_file_bytes = 21474836480\n"
    )
    data = tmp / f"data-{lines}"
    api, client = start_lowtide(data, config, "--no-workers")
    worker = start_worker(data)
    try:
        t0 = time.perf_counter()
        with input_path.open("rb") as fh:
            f = client.files.create(file=("input.jsonl", fh), purpose="batch")
        upload_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        batch = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status == "validating":
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
        validate_s = time.perf_counter() - t1
        if batch.status != "in_progress" or batch.request_counts.total != lines:
            raise SystemExit(f"batch is {batch.status}: {batch.errors}")
        return {
            "lines": lines,
            "gb": size / 1e9,
            "upload_mb_s": size / 1e6 / upload_s,
            "validate_s": validate_s,
            "validate_mb_s": size / 1e6 / validate_s,
            "api_mib": proc_kib(api.pid, "VmHWM") / 1024,
            "worker_mib": proc_kib(worker.pid, "VmHWM") / 1024,
        }
    finally:
        stop(worker)
        stop(api)
        input_path.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", default="1000000,5000000", help="comma-separated line counts")
    p.add_argument("--database-url", help="PostgreSQL server URL (no database name)")
    args = p.parse_args()
    print(
        f"{os.cpu_count()} CPUs; store: "
        f"{'PostgreSQL' if args.database_url else 'SQLite'} + local folder"
    )
    print(
        f"{'lines':>9} {'GB':>5} {'upload MB/s':>11} {'validate s':>10} {'validate MB/s':>13} "
        f"{'API peak MiB':>12} {'worker peak MiB':>15}"
    )
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-big-") as tmp:
        for n in (int(x) for x in args.lines.split(",")):
            r = run_once(n, Path(tmp), args.database_url)
            print(
                f"{r['lines']:>9} {r['gb']:>5.2f} {r['upload_mb_s']:>11.0f} "
                f"{r['validate_s']:>10.1f} {r['validate_mb_s']:>13.0f} "
                f"{r['api_mib']:>12.0f} {r['worker_mib']:>15.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
