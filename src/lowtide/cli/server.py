"""`lowtide serve`, `lowtide worker`, `lowtide db upgrade`: the long-running processes."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path
from typing import Annotated

import typer

from lowtide.cli.common import (
    ConfigOpt,
    app,
    db_app,
    err,
    load_or_exit,
    run_async,
    settle_heap,
    setup_logging,
)
from lowtide.config import Config


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="SQLite database and files live here")] = Path(
        "./lowtide-data"
    ),
    config: ConfigOpt = None,
    workers: Annotated[
        bool, typer.Option("--workers/--no-workers", help="run batch workers in this process")
    ] = True,
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="listen on a non-loopback address even with no API keys configured")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the HTTP API (and, by default, the workers that execute batches)."""
    from lowtide.api.app import create_app
    from lowtide.api.server import serve as serve_http
    from lowtide.runtime import Runtime

    setup_logging(log_level)
    cfg = load_or_exit(config)
    if not cfg.auth.api_keys:
        if not _is_loopback(host) and not allow_unauthenticated:
            err.print(
                f"[red]refusing to listen on {host}:[/red] no API keys are configured, so anyone who can "
                "reach this address could use the server. Add [auth] api_keys to the configuration, "
                "or pass --allow-unauthenticated if that is really what you want."
            )
            raise typer.Exit(2)
        err.print(
            "[yellow]note:[/yellow] no API keys configured: any key is accepted (project 'default')."
        )
    runtime = Runtime(cfg, data_dir, run_workers=workers)
    http_app = create_app(runtime)
    settle_heap()
    serve_http(
        http_app,
        host,
        port,
        cfg.server,
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=int(cfg.worker.cancel_grace_seconds) + 5,
    )


@app.command()
def worker(
    data_dir: Annotated[
        Path, typer.Option(help="data folder (blobs; and SQLite unless a database URL is set)")
    ] = Path("./lowtide-data"),
    config: ConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run only workers (no HTTP API), against the same database and blobs as the API servers."""
    setup_logging(log_level)
    run_async(_run_worker(load_or_exit(config), data_dir))


async def _run_worker(cfg: Config, data_dir: Path) -> None:
    import signal

    from lowtide.runtime import Runtime

    runtime = Runtime(cfg, data_dir)
    await runtime.start()
    settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    err.print(
        f"worker {runtime.worker.id if runtime.worker else '?'} running; SIGTERM hands work back and exits"
    )
    await stop.wait()
    await runtime.stop()


@db_app.command("upgrade")
def db_upgrade(
    data_dir: Annotated[
        Path, typer.Option(help="data folder (for the default SQLite database)")
    ] = Path("./lowtide-data"),
    config: ConfigOpt = None,
) -> None:
    """Apply database migrations (serve does this on start too)."""
    from lowtide.runtime import Runtime

    Runtime(load_or_exit(config), data_dir, run_workers=False).db.upgrade()
    err.print("database is up to date")
