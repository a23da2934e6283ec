"""The `lowtide` command: serve the API, or run one file with no server."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowtide.config import Config, load_config
from lowtide.vocabulary import BatchStatus

if TYPE_CHECKING:
    from lowtide.runtime import Runtime
    from lowtide.service import BatchView

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Lowtide: a self-hosted Batch API."
)
db_app = typer.Typer(help="Database maintenance.")
app.add_typer(db_app, name="db")
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration file")]


def _load(config: Path | None) -> Config:
    try:
        return load_config(config)
    except Exception as exc:
        err.print(f"[red]error:[/red] cannot load configuration {config}: {exc}")
        raise typer.Exit(2) from exc


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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
    import uvicorn

    from lowtide.api.app import create_app
    from lowtide.runtime import Runtime

    _setup_logging(log_level)
    cfg = _load(config)
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
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime),
            host=host,
            port=port,
            log_level=log_level,
            access_log=log_level == "debug",
            timeout_graceful_shutdown=int(cfg.worker.cancel_grace_seconds) + 5,
        )
    )
    server.run()


@app.command()
def worker(
    data_dir: Annotated[
        Path, typer.Option(help="data folder (blobs; and SQLite unless a database URL is set)")
    ] = Path("./lowtide-data"),
    config: ConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run only workers (no HTTP API), against the same database and blobs as the API servers."""
    _setup_logging(log_level)
    _run_async(_run_worker(_load(config), data_dir))


async def _run_worker(cfg: Config, data_dir: Path) -> None:
    import signal

    from lowtide.runtime import Runtime

    runtime = Runtime(cfg, data_dir)
    await runtime.start()
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

    Runtime(_load(config), data_dir, run_workers=False).db.upgrade()
    err.print("database is up to date")


@app.command()
def run(
    input: Annotated[
        Path, typer.Argument(help="JSONL file of batch requests", exists=True, dir_okay=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="where to write successful results")
    ],
    errors: Annotated[
        Path | None,
        typer.Option(
            "--errors", "-e", help="where to write failed lines (default: OUTPUT.errors.jsonl)"
        ),
    ] = None,
    config: ConfigOpt = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="keep state here (default: a temporary folder, removed afterwards)"),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="the batch endpoint (default: the url of the file's first request)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Process one file with no server; the output has the same format as a batch's files."""
    _setup_logging(log_level)
    cfg = _load(config)
    errors = errors or output.with_name(output.stem + ".errors.jsonl")
    workdir = data_dir or Path(tempfile.mkdtemp(prefix="lowtide-run-"))
    try:
        # A temporary data folder must not cost a model conversion on every run.
        model_cache = workdir / "models" if data_dir else _user_cache() / "models"
        code = _run_async(_run_file(cfg, workdir, input, output, errors, model_cache, endpoint))
    finally:
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    raise typer.Exit(code)


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowtide"


def _run_async(coro):  # type: ignore[no-untyped-def]
    """Run on uvloop when it is installed (it is, with uvicorn[standard]): ~20% faster here."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _run_file(
    cfg: Config,
    workdir: Path,
    input: Path,
    output: Path,
    errors: Path,
    model_cache: Path,
    endpoint: str | None,
) -> int:
    from lowtide.runtime import Runtime
    from lowtide.vocabulary import DEFAULT_ENDPOINT, DEFAULT_PROJECT, FilePurpose

    runtime = Runtime(cfg, workdir, model_cache_dir=model_cache)
    await runtime.start()
    try:
        source = await runtime.files.upload(
            DEFAULT_PROJECT, _read_chunks(input), purpose=FilePurpose.BATCH, filename=input.name
        )
        if endpoint is None:
            endpoint = await runtime.batches.endpoint_of_file(DEFAULT_PROJECT, source.id)
        view = await runtime.batches.create(
            DEFAULT_PROJECT,
            input_file_id=source.id,
            endpoint=endpoint or DEFAULT_ENDPOINT,
            completion_window=cfg.batches.max_completion_window,
        )
        view = await _follow(runtime, view.row.id)
        batch = view.row
        if batch.status == BatchStatus.FAILED:
            err.print(f"[red]the input file is not valid[/red] ({input}):")
            for e in (orjson.loads(batch.errors or "{}")).get("data", [])[:50]:
                where = f"line {e['line']}" if e.get("line") else "file"
                err.print(f"  {where}: {e['code']}: {e['message']}")
            return 2
        await _copy_out(runtime, batch.output_file_id, output)
        await _copy_out(runtime, batch.error_file_id, errors)
        counts = view.counts
        err.print(
            f"{batch.status}: {counts.completed} succeeded, {counts.failed} failed of {batch.total} "
            f"→ {output}" + (f", errors → {errors}" if batch.error_file_id else "")
        )
        return 0 if counts.failed == 0 else 1
    finally:
        await runtime.stop()


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            yield chunk


async def _follow(runtime: Runtime, batch_id: str) -> BatchView:
    from lowtide.vocabulary import DEFAULT_PROJECT, TERMINAL

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(BatchStatus.VALIDATING, total=None)
        while True:
            view = await runtime.batches.get(DEFAULT_PROJECT, batch_id)
            done = view.counts.completed + view.counts.failed
            bar.update(
                task, description=view.row.status, total=view.row.total or None, completed=done
            )
            if view.row.status in TERMINAL:
                return view
            await asyncio.sleep(0.2)


async def _copy_out(runtime: Runtime, file_id: str | None, path: Path) -> None:
    from lowtide.vocabulary import DEFAULT_PROJECT

    if file_id is None:
        path.unlink(missing_ok=True)
        return
    _, chunks = await runtime.files.content(DEFAULT_PROJECT, file_id)
    with open(path, "wb") as fh:
        async for chunk in chunks:
            fh.write(chunk)


if __name__ == "__main__":
    app()
