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
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowtide.config import Config, load_config

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
    from lowtide.store.database import Database, sqlite_url

    cfg = _load(config)
    data_dir.mkdir(parents=True, exist_ok=True)
    Database(cfg.resolved_database_url() or sqlite_url(data_dir)).upgrade()
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
        code = _run_async(_run_file(cfg, workdir, input, output, errors, model_cache))
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


def _endpoint_of(path: Path) -> str:
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    url = orjson.loads(raw).get("url")
                except (orjson.JSONDecodeError, AttributeError):
                    url = None
                if isinstance(url, str):
                    return url
                break
    return "/v1/chat/completions"


async def _run_file(
    cfg: Config, workdir: Path, input: Path, output: Path, errors: Path, model_cache: Path
) -> int:
    from lowtide.api.auth import OPEN_PROJECT
    from lowtide.config import parse_duration
    from lowtide.ids import new_batch_id, new_file_id
    from lowtide.runtime import Runtime
    from lowtide.store import batches as batch_store
    from lowtide.store import files as file_store
    from lowtide.store.batches import TERMINAL

    runtime = Runtime(cfg, workdir, model_cache_dir=model_cache)
    await runtime.start()
    try:
        file_id, now = new_file_id(), int(time.time())
        key = f"files/{file_id}"
        writer = await runtime.blobs.writer(key)
        async with writer:
            with open(input, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    await writer.write(chunk)
            await writer.commit()
        async with runtime.db.write() as conn:
            await file_store.insert_file(
                conn,
                {
                    "id": file_id,
                    "project": OPEN_PROJECT,
                    "filename": input.name,
                    "purpose": "batch",
                    "bytes": writer.bytes_written,
                    "created_at": now,
                    "expires_at": None,
                    "blob_key": key,
                },
            )
        window = cfg.batches.max_completion_window
        row = batch_store.new_batch_row(
            batch_id=new_batch_id(),
            project=OPEN_PROJECT,
            endpoint=_endpoint_of(input),
            input_file_id=file_id,
            completion_window=window,
            window_seconds=int(parse_duration(window)),
            now=now,
        )
        await batch_store.insert_batch(runtime.db, row)
        runtime.wake_worker()
        batch = await _follow(runtime, row["id"], TERMINAL)
        if batch["status"] == "failed":
            err.print(f"[red]the input file is not valid[/red] ({input}):")
            for e in (orjson.loads(batch["errors"]) or {}).get("data", [])[:50]:
                where = f"line {e['line']}" if e.get("line") else "file"
                err.print(f"  {where}: {e['code']}: {e['message']}")
            return 2
        await _copy_out(runtime, batch["output_file_id"], output)
        await _copy_out(runtime, batch["error_file_id"], errors)
        err.print(
            f"{batch['status']}: {batch['completed']} succeeded, {batch['failed']} failed of {batch['total']} "
            f"→ {output}" + (f", errors → {errors}" if batch["error_file_id"] else "")
        )
        return 0 if batch["failed"] == 0 else 1
    finally:
        await runtime.stop()


async def _follow(runtime, batch_id: str, terminal: tuple[str, ...]) -> dict:  # type: ignore[no-untyped-def]
    from lowtide.api.auth import OPEN_PROJECT
    from lowtide.store import batches as batch_store

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("validating", total=None)
        while True:
            batch = await batch_store.get_batch(runtime.db, OPEN_PROJECT, batch_id)
            assert batch is not None
            if batch["status"] in terminal:
                bar.update(
                    task,
                    description=batch["status"],
                    total=batch["total"] or 1,
                    completed=batch["completed"] + batch["failed"],
                )
                return batch
            progress = (await batch_store.live_progress(runtime.db, [batch_id])).get(batch_id, {})
            done = progress.get("completed", 0) + progress.get("failed", 0)
            bar.update(
                task, description=batch["status"], total=batch["total"] or None, completed=done
            )
            await asyncio.sleep(0.2)


async def _copy_out(runtime, file_id: str | None, path: Path) -> None:  # type: ignore[no-untyped-def]
    from lowtide.store.files import get_file_any_project

    if file_id is None:
        path.unlink(missing_ok=True)
        return
    row = await get_file_any_project(runtime.db, file_id)
    assert row is not None
    with open(path, "wb") as fh:
        async for chunk in runtime.blobs.iter_chunks(row["blob_key"]):
            fh.write(chunk)


if __name__ == "__main__":
    app()
