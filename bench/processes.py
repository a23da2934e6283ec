"""Processes the benchmarks start: `lowtide serve` and `lowtide worker`, and a batch run on them.

The simulated upstream is started with lowtide_sim.launch.start_simulator.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]


def start_lowtide(
    data_dir: Path, config: str | None = None, *extra: str, src: Path | None = None
) -> tuple[subprocess.Popen, OpenAI]:
    """`lowtide serve` on a free port with its own data folder; returns (process, SDK client).
    `src`: run the lowtide package found there (another checkout's src/) instead of this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    if config is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "lowtide.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowtide.cli", "serve", *args, *extra], env=env_for(src)
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, OpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", timeout=600
                )
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("lowtide serve did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def env_for(src: Path | None) -> dict[str, str] | None:
    """The environment that makes `python -m lowtide...` import the package under `src`."""
    if src is None:
        return None
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }


def start_worker(data_dir: Path, src: Path | None = None) -> subprocess.Popen:
    """`lowtide worker` on the data folder and configuration a start_lowtide() call wrote,
    returned once it says it is running: a worker spends ~1.4 CPU seconds starting (imports,
    migrations check), which must not count as the CPU of the first batch it runs."""
    args = ["--data-dir", str(data_dir), "--log-level", "warning"]
    config = data_dir / "lowtide.toml"
    if config.exists():
        args += ["--config", str(config)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowtide.cli", "worker", *args],
        stderr=subprocess.PIPE,
        env=env_for(src),
    )
    running = threading.Event()
    threading.Thread(target=_forward, args=(proc, running), daemon=True).start()
    deadline = time.monotonic() + 60
    while not running.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"lowtide worker did not start (exit status {proc.poll()})")
    return proc


def _forward(proc: subprocess.Popen, running: threading.Event) -> None:
    """The worker's log goes on to ours (the pipe drained to the end); `running` is set when
    the worker says so."""
    for raw in proc.stderr:  # type: ignore[union-attr]
        sys.stderr.buffer.write(raw)
        if b" running; " in raw:
            running.set()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_batch(client: OpenAI, raw: bytes, endpoint: str = "/v1/chat/completions"):
    """Upload ``raw`` (JSONL), create a batch, poll until it ends; (batch, seconds from create
    to ended). Anything but a fully completed batch stops the benchmark."""
    f = client.files.create(file=("bench.jsonl", io.BytesIO(raw)), purpose="batch")
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    seconds = time.perf_counter() - started
    if batch.status != "completed" or batch.request_counts.failed:
        raise SystemExit(f"batch ended {batch.status}: {batch.request_counts}")
    return batch, seconds
