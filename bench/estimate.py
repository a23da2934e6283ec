"""Estimates: how fast `POST /v1/batches/estimate` reads a file, and whether memory stays flat.

For each case it writes a JSONL file of short chat requests (~470 bytes: a system prompt and a
support ticket, as bench/big_file.py writes them), uploads it to a `lowtide serve --no-workers`,
restarts the server (so its peak memory is the estimate's, not the upload's), and times one
estimate. It prints MB/s, lines/s and the server's peak resident memory (VmHWM) before and
after the estimate. Cases: the approximate method (the echo model: ~4 characters a token), and
the tokenizer method on each embedded model (SmolLM2's llama.cpp tokenizer, MiniLM's).

    .venv/bin/python bench/estimate.py [--lines 1000000] [--chat-lines 50000]
                                       [--embed-lines 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_file import _TICKET, write_input  # noqa: E402
from processes import start_lowtide, stop  # noqa: E402
from throughput import proc_kib  # noqa: E402

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def write_embeddings(path: Path, lines: int) -> None:
    with path.open("w", buffering=1 << 22) as fh:
        for i in range(lines):
            fh.write(
                f'{{"custom_id":"doc-{i:09d}","method":"POST","url":"/v1/embeddings","body":'
                f'{{"model":"all-MiniLM-L6-v2","input":"{_TICKET.format(i=i)}"}}}}\n'
            )


def write_chat(path: Path, lines: int, model: str) -> None:
    write_input(path, lines)  # lowtide-echo lines
    if model != "lowtide-echo":
        tmp = path.with_suffix(".tmp")
        with path.open("rb") as src, tmp.open("wb") as dst:
            for line in src:
                dst.write(line.replace(b'"model":"lowtide-echo"', f'"model":"{model}"'.encode()))
        tmp.replace(path)


def run_case(name: str, path: Path, endpoint: str, tmp: Path) -> dict:
    size = path.stat().st_size
    data = tmp / f"data-{name}"
    api, client = start_lowtide(data)
    try:
        with path.open("rb") as fh:
            file_id = client.files.create(file=("input.jsonl", fh), purpose="batch").id
    finally:
        stop(api)
    api, client = start_lowtide(data)  # a fresh process: its peak memory is the estimate's
    try:
        idle_kib = proc_kib(api.pid, "VmHWM")
        started = time.perf_counter()
        response = client.post(
            "/batches/estimate",
            body={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
            cast_to=httpx.Response,
        )
        seconds = time.perf_counter() - started
        estimate = response.json()
        return {
            "case": name,
            "mb": size / 1e6,
            "lines": estimate["lines"],
            "seconds": seconds,
            "mb_s": size / 1e6 / seconds,
            "lines_s": estimate["lines"] / seconds,
            "method": estimate["input_tokens_method"],
            "idle_mib": idle_kib / 1024,
            "peak_mib": proc_kib(api.pid, "VmHWM") / 1024,
        }
    finally:
        stop(api)
        path.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=1_000_000, help="approximate case (echo model)")
    p.add_argument("--chat-lines", type=int, default=50_000, help="SmolLM2 tokenizer case")
    p.add_argument("--embed-lines", type=int, default=200_000, help="MiniLM tokenizer case")
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; SQLite + local folder; one estimate per case")
    print(
        f"{'case':<26} {'MB':>6} {'lines':>9} {'s':>7} {'MB/s':>7} {'lines/s':>9} "
        f"{'method':>11} {'idle MiB':>8} {'peak MiB':>8}"
    )
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-estimate-") as tmp_name:
        tmp = Path(tmp_name)
        cases = []
        if args.lines:
            cases.append(("approximate (echo)", "lowtide-echo", CHAT, args.lines))
        if args.chat_lines:
            cases.append(
                ("tokenizer (SmolLM2 chat)", "SmolLM2-135M-Instruct", CHAT, args.chat_lines)
            )
        if args.embed_lines:
            cases.append(("tokenizer (MiniLM)", "all-MiniLM-L6-v2", EMBEDDINGS, args.embed_lines))
        for name, model, endpoint, lines in cases:
            path = tmp / f"{model}.jsonl"
            if endpoint == EMBEDDINGS:
                write_embeddings(path, lines)
            else:
                write_chat(path, lines, model)
            r = run_case(model, path, endpoint, tmp)
            print(
                f"{name:<26} {r['mb']:>6.0f} {r['lines']:>9} {r['seconds']:>7.1f} "
                f"{r['mb_s']:>7.1f} {r['lines_s']:>9.0f} {r['method']:>11} "
                f"{r['idle_mib']:>8.0f} {r['peak_mib']:>8.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
