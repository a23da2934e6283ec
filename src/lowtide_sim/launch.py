"""The one way tests and benchmarks start the simulator and talk to its control endpoints.

Standard library only, so benchmark scripts can use it without the dev dependencies.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "Simulator",
    "SimulatorError",
    "configure",
    "read_stats",
    "reset",
    "start_simulator",
]

# Talk to 127.0.0.1 directly even where http_proxy is set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SimulatorError(RuntimeError):
    pass


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def _call(url: str, payload: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """GET ``url``, or POST ``payload`` as JSON; returns the decoded JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SimulatorError(f"{request.method} {url}: HTTP {exc.code}: {detail}") from exc


def read_stats(url: str) -> dict[str, Any]:
    """GET /sim/stats of the simulator at ``url`` (its /v1 base URL)."""
    return _call(_root(url) + "/sim/stats")


def configure(url: str, **changes: Any) -> dict[str, Any]:
    """POST /sim/config; returns the whole configuration after the change."""
    return _call(_root(url) + "/sim/config", changes)


def reset(url: str) -> None:
    """POST /sim/reset: clear stats and rate-limit buckets, reseed the RNG."""
    _call(_root(url) + "/sim/reset", {})


class Simulator:
    """A running simulator process; stopping it is up to the caller (or the ``with`` block)."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url  # base URL ending in /v1

    @property
    def root(self) -> str:
        """The URL without /v1, where /sim/* and /metrics live."""
        return _root(self.url)

    def stats(self) -> dict[str, Any]:
        return read_stats(self.url)

    def configure(self, **changes: Any) -> dict[str, Any]:
        return configure(self.url, **changes)

    def reset(self) -> None:
        reset(self.url)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        stop_process(self.process, sig, timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` (default: ours) with this package's folder first on PYTHONPATH.

    The child then runs the same lowtide_sim as the caller, installed or not.
    """
    env = dict(os.environ if env is None else env)
    here = str(Path(__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


def start_simulator(
    *flags: str, timeout: float = 15.0, env: dict[str, str] | None = None
) -> Simulator:
    """Start ``python -m lowtide_sim --port 0 *flags`` and wait for its READY line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowtide_sim", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        env=_child_env(env),
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("READY "):
            return Simulator(proc, line.split()[1])
    try:
        code = proc.wait(timeout=1)  # a child that closed stdout is exiting: get its code
    except subprocess.TimeoutExpired:
        code = None
    Simulator(proc, "").stop()
    reason = f"exited with code {code}" if code is not None else f"not ready after {timeout}s"
    raise SimulatorError(f"simulator did not print READY: {reason}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Send ``sig`` to any child process, wait up to ``timeout`` seconds, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
