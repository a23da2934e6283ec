"""Batch throughput and memory benchmark for Lowtide.

Runs real `lowtide serve` subprocesses (fresh data dir per run) against the
in-process echo engine and/or the simulated OpenAI upstream, so the numbers
include HTTP upload, the SQLite store, the workers and the output download.

    .venv/bin/python bench/throughput.py --lines 100000 --repeats 3 --engine both
    .venv/bin/python bench/throughput.py --engine echo --repeats 1 --scaling 10000,100000,300000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

from lowtide_sim.launch import SimulatorError, start_simulator

BATCH_TIMEOUT = 600.0  # seconds allowed per batch before we give up
TERMINAL = {"completed", "failed", "expired", "cancelled"}
MODELS = {"echo": "lowtide-echo", "sim": "sim-model"}


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM first so the server shuts down cleanly; SIGKILL if it will not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_kib(pid: int, field: str) -> int:
    """VmHWM (peak RSS since start) or VmRSS from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"{field} not found in /proc/{pid}/status")


def write_input(path: Path, lines: int, model: str) -> None:
    """Stream ~200-byte request lines to disk so huge inputs never sit in memory."""
    with path.open("w") as fh:
        for i in range(lines):
            body = {
                "model": model,
                "messages": [
                    {"role": "user", "content": f"classify ticket {i}: printer offline again"}
                ],
                "max_tokens": 16,
            }
            req = {"custom_id": f"req-{i:08d}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**req, "body": body}, separators=(",", ":")) + "\n")


def start_server(workdir: Path, config: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `lowtide serve` on a free port; returns (process, /v1 base URL) once /healthz is 200."""
    port = free_port()
    (workdir / "config.toml").write_text(config)
    log = (workdir / "server.log").open("wb")
    cmd = [sys.executable, "-m", "lowtide.cli", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--data-dir", str(workdir / "data")]
    cmd += ["--config", str(workdir / "config.toml"), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"lowtide exited with {proc.returncode}:\n{server_log(workdir)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop(proc)
    raise BenchError(f"lowtide not ready after {timeout}s:\n{server_log(workdir)}")


def server_log(workdir: Path) -> str:
    path = workdir / "server.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def make_config(engine: str, sim_url: str | None) -> str:
    if engine == "echo":
        return '[[models]]\nname = "lowtide-echo"\nengine = "echo"\nmax_concurrency = 1024\n'
    return (
        f'[[models]]\nname = "sim-model"\nengine = "openai"\nbase_url = "{sim_url}"\n'
        "max_concurrency = 256\n"
    )


def run_once(engine: str, input_path: Path, lines: int, sim_url: str | None) -> dict:
    """One fresh server, one batch: returns timings and memory for that run."""
    workdir = Path(tempfile.mkdtemp(prefix=f"lowtide-bench-{engine}-"))
    proc, base_url = start_server(workdir, make_config(engine, sim_url))
    try:
        idle_kib = proc_kib(proc.pid, "VmRSS")
        client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=300)
        t0 = time.perf_counter()
        with input_path.open("rb") as fh:
            f = client.files.create(file=fh, purpose="batch")
        t1 = time.perf_counter()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status not in TERMINAL:
            if time.perf_counter() - t1 > BATCH_TIMEOUT:
                raise BenchError(f"{engine}: batch {b.id} still {b.status} after {BATCH_TIMEOUT}s")
            if proc.poll() is not None:
                raise BenchError(
                    f"{engine}: server died ({proc.returncode}):\n{server_log(workdir)}"
                )
            time.sleep(0.05)
            b = client.batches.retrieve(b.id)
        t2 = time.perf_counter()
        peak_kib = proc_kib(proc.pid, "VmHWM")
        done = b.request_counts.completed if b.request_counts else 0
        if b.status != "completed" or done != lines or not b.output_file_id:
            raise BenchError(
                f"{engine}: status={b.status} completed={done}/{lines} errors={b.errors}"
            )
        out_lines = 0
        with client.files.with_streaming_response.content(b.output_file_id) as r:
            for chunk in r.iter_bytes():
                out_lines += chunk.count(b"\n")
        if out_lines != lines:
            raise BenchError(f"{engine}: output file has {out_lines} lines, expected {lines}")
        upload, run = t1 - t0, t2 - t1
        return {
            "lines": lines,
            "upload_s": upload,
            "run_s": run,
            "lps": lines / run,
            "e2e_lps": lines / (upload + run),
            "idle_mib": idle_kib / 1024,
            "peak_mib": peak_kib / 1024,
        }
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(title: str, runs: list[dict]) -> None:
    cols = ["lines", "upload_s", "run_s", "lps", "e2e_lps", "idle_mib", "peak_mib"]
    heads = [
        "lines",
        "upload s",
        "create->done s",
        "lines/s",
        "e2e lines/s",
        "idle MiB",
        "peak MiB",
    ]
    fmt = "{:>10} {:>9} {:>15} {:>10} {:>12} {:>9} {:>9}"

    def cells(r: dict) -> list[str]:
        return [f"{r[c]:.0f}" if c in ("lines", "lps", "e2e_lps") else f"{r[c]:.2f}" for c in cols]

    print(f"\n== {title} ==")
    print("       " + fmt.format(*heads))
    median = {c: statistics.median(r[c] for r in runs) for c in cols}
    print("median " + fmt.format(*cells(median)))
    for i, r in enumerate(runs, 1):
        print(f"run {i:<3}" + fmt.format(*cells(r)))


def bench_engine(engine: str, lines: int, repeats: int, tmp: Path) -> list[dict]:
    """Run `repeats` fresh servers for one engine; the sim upstream is shared across repeats."""
    input_path = tmp / f"{engine}-{lines}.jsonl"
    write_input(input_path, lines, MODELS[engine])
    sim = start_simulator() if engine == "sim" else None
    sim_url = sim.url if sim is not None else None
    try:
        return [run_once(engine, input_path, lines, sim_url) for _ in range(repeats)]
    finally:
        if sim is not None:
            sim.stop()
        input_path.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=100_000, help="request lines per batch")
    p.add_argument("--repeats", type=int, default=3, help="fresh-server runs per engine")
    p.add_argument("--engine", choices=["echo", "sim", "both"], default="both")
    p.add_argument(
        "--scaling", default="", help="comma-separated line counts for an echo memory sweep"
    )
    args = p.parse_args()
    engines = ["echo", "sim"] if args.engine == "both" else [args.engine]
    tmp = Path(tempfile.mkdtemp(prefix="lowtide-bench-"))
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.lines} lines x {args.repeats}"
    )
    try:
        medians = {}
        for engine in engines:
            runs = bench_engine(engine, args.lines, args.repeats, tmp)
            print_table(f"{engine} engine", runs)
            medians[engine] = statistics.median(r["lps"] for r in runs)
        if len(medians) == 2:
            print(
                f"\necho/sim throughput ratio (median lines/s): {medians['echo'] / medians['sim']:.2f}"
            )
        if args.scaling:
            counts = [int(x) for x in args.scaling.split(",") if x.strip()]
            print("\n== scaling (echo engine, 1 run each) ==")
            print(f"{'lines':>10} {'lines/s':>10} {'peak MiB':>9}")
            for n in counts:
                r = bench_engine("echo", n, 1, tmp)[0]
                print(f"{n:>10} {r['lps']:>10.0f} {r['peak_mib']:>9.1f}", flush=True)
    except (BenchError, SimulatorError) as e:
        print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
