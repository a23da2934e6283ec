"""Real processes for tests: the simulated upstream and the Lowtide server, on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from lowtide_sim.launch import read_stats, start_simulator, stop_process

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sim(*flags: str, timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    """The simulated upstream; returns (process, base URL ending in /v1)."""
    sim = start_simulator(*flags, timeout=timeout)
    return sim.process, sim.url


def sim_stats(sim_url: str) -> dict:
    return read_stats(sim_url)


class LowtideServer:
    """`lowtide serve` as a subprocess, restartable on the same port and data folder."""

    def __init__(self, data_dir: Path, config_text: str) -> None:
        self.data_dir = data_dir
        self.config_path = data_dir.parent / f"{data_dir.name}.toml"
        self.config_path.write_text(config_text)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(
        self, timeout: float = 30.0, *extra: str, env: dict[str, str] | None = None
    ) -> LowtideServer:
        """Start (or restart) the server; `env` adds variables for this run only."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lowtide.cli",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--config",
                str(self.config_path),
                "--log-level",
                "info",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_env(), **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lowtide exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"lowtide did not become ready:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def client(self, api_key: str = "sk-test", **kwargs: object) -> OpenAI:
        options: dict = {"max_retries": 0, "timeout": 30, **kwargs}
        return OpenAI(base_url=self.base_url, api_key=api_key, **options)


# Set LOWTIDE_TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1) to run every server
# on PostgreSQL instead of SQLite; each configuration gets a database of its own.
TEST_DATABASE_URL = os.environ.get("LOWTIDE_TEST_DATABASE_URL", "").rstrip("/")
# Set LOWTIDE_TEST_STORAGE_URL (s3://bucket, with AWS_ENDPOINT_URL) to keep blobs in S3 instead.
TEST_STORAGE_URL = os.environ.get("LOWTIDE_TEST_STORAGE_URL", "").rstrip("/")
CREATED_DATABASES: list[str] = []


def _fresh_database() -> str:
    import uuid

    import psycopg

    name = f"lowtide_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{TEST_DATABASE_URL}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    CREATED_DATABASES.append(name)
    return f"{TEST_DATABASE_URL}/{name}"


def drop_test_databases() -> None:
    if not CREATED_DATABASES:
        return
    import psycopg

    with psycopg.connect(f"{TEST_DATABASE_URL}/postgres", autocommit=True) as conn:
        for name in CREATED_DATABASES:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    CREATED_DATABASES.clear()


def make_config(sim_url: str | None = None, extra: str = "", *, models: str | None = None) -> str:
    """A configuration tuned for fast tests: short leases, fast polling, small segments."""
    if models is None:
        models = ""
        if sim_url:
            models += f"""
[[models]]
name = "sim-model"
engine = "openai"
base_url = "{sim_url}"
max_concurrency = 32
timeout = 2
max_retries = 8
"""
        models += """
[[models]]
name = "lowtide-echo"
engine = "echo"
"""
    database = f'database_url = "{_fresh_database()}"\n' if TEST_DATABASE_URL else ""
    if TEST_STORAGE_URL:
        import uuid

        database += f'storage_url = "{TEST_STORAGE_URL}/{uuid.uuid4().hex[:12]}"\n'
    return f"""{database}{models}
[worker]
lease_seconds = 3
poll_seconds = 0.1
segment_lines = 50
segment_seconds = 0.3
retry_base_seconds = 0.05
retry_max_seconds = 0.5
cancel_grace_seconds = 5

[batches]
min_completion_window = "1s"
{extra}
"""


def wait_for_batch(
    client: OpenAI, batch_id: str, timeout: float = 60, statuses: tuple[str, ...] | None = None
):
    terminal = statuses or ("completed", "failed", "expired", "cancelled")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in terminal:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout}s")


def chat_line(custom_id: str, content: str, model: str = "sim-model", **body: object) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(lines: list[dict]) -> bytes:
    import json

    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def start_worker(server: LowtideServer) -> subprocess.Popen:
    """A `lowtide worker` process on the server's data folder and configuration."""
    log = open(server.log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lowtide.cli",
            "worker",
            "--data-dir",
            str(server.data_dir),
            "--config",
            str(server.config_path),
            "--log-level",
            "info",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )


def blob_store(server: LowtideServer):  # type: ignore[no-untyped-def]
    """The server's blob store (local folder or S3, as configured), opened from the test."""
    import tomllib

    from lowtide.blobs import open_blob_store

    url = tomllib.loads(server.config_path.read_text()).get("storage_url")
    return open_blob_store(str(server.data_dir), url)


def blob_exists(server: LowtideServer, key: str) -> bool:
    import asyncio

    return asyncio.run(blob_store(server).exists(key))


def submit_batch(
    client: OpenAI, lines: list[dict], endpoint: str = "/v1/chat/completions", metadata=None
):
    """Upload `lines` as a batch input file and create a 24h batch over it."""
    import io

    f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint=endpoint, completion_window="24h", metadata=metadata
    )


def assert_output_exactly_once(client: OpenAI, batch, expected: int) -> None:
    """Every custom_id in the output file exactly once, and no error file."""
    import json
    from collections import Counter

    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    counts = Counter(o["custom_id"] for o in out)
    assert len(counts) == expected and max(counts.values()) == 1 and batch.error_file_id is None
