"""Anthropic's Message Batches: a big inline create, streamed, and the batch it makes.

Starts `lowtide serve` on the echo engine, streams a create body of --requests requests (each
padded to about --request-bytes) with the official anthropic SDK's wire format, and prints how
long the create took, the server's peak RSS before and after it (the body is parsed as a
stream: the peak should not grow with the body), and the batch's lines/s until `ended`.

    .venv/bin/python bench/message_batches.py [--requests 100000] [--request-bytes 600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import start_lowtide, stop  # noqa: E402
from throughput import proc_kib  # noqa: E402


def body_chunks(requests: int, request_bytes: int):  # type: ignore[no-untyped-def]
    """The create body, generated as it is sent: the client holds none of it whole."""
    yield b'{"requests":['
    pad = "x" * max(0, request_bytes - 120)
    for i in range(requests):
        item = {
            "custom_id": f"r-{i}",
            "params": {
                "model": "lowtide-echo",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": f"request {i} {pad}"}],
            },
        }
        yield (b"," if i else b"") + orjson.dumps(item)
    yield b"]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--request-bytes", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowtide-bench-msgbatch-") as tmp:
        proc, client = start_lowtide(Path(tmp) / "data", "")
        root = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
        try:
            rss_before = proc_kib(proc.pid, "VmHWM")
            sent = 0

            def counted():  # type: ignore[no-untyped-def]
                nonlocal sent
                for chunk in body_chunks(args.requests, args.request_bytes):
                    sent += len(chunk)
                    yield chunk

            t0 = time.perf_counter()
            response = httpx.post(
                f"{root}/v1/messages/batches",
                content=counted(),
                headers={"x-api-key": "bench", "anthropic-version": "2023-06-01"},
                timeout=600,
            )
            create_s = time.perf_counter() - t0
            response.raise_for_status()
            batch_id = response.json()["id"]
            rss_after = proc_kib(proc.pid, "VmHWM")
            while True:
                batch = httpx.get(f"{root}/v1/messages/batches/{batch_id}", timeout=60).json()
                if batch["processing_status"] == "ended":
                    break
                time.sleep(0.5)
            total_s = time.perf_counter() - t0
            counts = batch["request_counts"]
            t1 = time.perf_counter()
            lines = 0
            with httpx.stream("GET", batch["results_url"], timeout=600) as results:
                for _line in results.iter_lines():
                    lines += 1
            results_s = time.perf_counter() - t1
        finally:
            stop(proc)
    mb = sent / 1e6
    print(f"create body            {mb:,.1f} MB, {args.requests:,} requests")
    print(f"create (stream + store) {create_s:6.1f} s  ({mb / create_s:,.1f} MB/s)")
    print(
        f"server peak RSS        {rss_before / 1024:,.0f} MiB before, {rss_after / 1024:,.0f} MiB "
        f"after the create (+{(rss_after - rss_before) / 1024:,.0f} MiB for a {mb:,.0f} MB body)"
    )
    print(
        f"create -> ended        {total_s:6.1f} s  ({args.requests / total_s:,.0f} requests/s "
        f"end to end); succeeded {counts['succeeded']:,}"
    )
    print(f"results stream         {lines:,} lines in {results_s:.1f} s")


if __name__ == "__main__":
    main()
