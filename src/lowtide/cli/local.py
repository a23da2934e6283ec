"""`lowtide run` and `lowtide estimate`: one file, in this process, with no server."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lowtide.cli.common import ConfigOpt, app, err, load_or_exit, run_async, setup_logging
from lowtide.cli.progress import EtaColumn, LinesPerSecondColumn
from lowtide.config import Config
from lowtide.vocabulary import BatchStatus

if TYPE_CHECKING:
    from lowtide.runtime import Runtime
    from lowtide.service import BatchView


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
    setup_logging(log_level)
    cfg = load_or_exit(config)
    errors = errors or output.with_name(output.stem + ".errors.jsonl")
    workdir = data_dir or Path(tempfile.mkdtemp(prefix="lowtide-run-"))
    try:
        # A temporary data folder must not cost a model conversion on every run.
        model_cache = workdir / "models" if data_dir else _user_cache() / "models"
        code = run_async(_run_file(cfg, workdir, input, output, errors, model_cache, endpoint))
    finally:
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    raise typer.Exit(code)


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowtide"


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
    from lowtide.service import BatchRequest
    from lowtide.vocabulary import DEFAULT_ENDPOINT, DEFAULT_PROJECT, FilePurpose

    runtime = Runtime(cfg, workdir, model_cache_dir=model_cache)
    await runtime.start()
    try:
        source = await runtime.files.upload(
            DEFAULT_PROJECT, _read_chunks(input), purpose=FilePurpose.BATCH, filename=input.name
        )
        if endpoint is None:
            endpoint = await runtime.batches.endpoint_of_file(DEFAULT_PROJECT, source.id)
        await _print_run_estimate(runtime, source.id, endpoint or DEFAULT_ENDPOINT)
        request = BatchRequest(
            source.id, endpoint or DEFAULT_ENDPOINT, cfg.batches.max_completion_window
        )
        view = await runtime.batches.create(DEFAULT_PROJECT, request)
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


@app.command()
def estimate(
    input: Annotated[
        Path, typer.Argument(help="JSONL file of batch requests", exists=True, dir_okay=False)
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(help="the batch endpoint (default: the url of the file's first request)"),
    ] = None,
    config: ConfigOpt = None,
    window: Annotated[str, typer.Option(help="the completion window to fit in")] = "24h",
    data_dir: Annotated[
        Path | None,
        typer.Option(help="a server's data folder: its history and queues inform the estimate"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the estimate object")] = False,
) -> None:
    """Tokens, cost and duration of a file as a batch, without a server and without running it."""
    setup_logging("warning")
    cfg = load_or_exit(config)
    workdir = data_dir or Path(tempfile.mkdtemp(prefix="lowtide-estimate-"))
    try:
        found = run_async(_estimate_file(cfg, workdir, input, endpoint, window))
    finally:
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if isinstance(found, str):
        err.print(f"[red]error:[/red] {found}")
        raise typer.Exit(2)
    if as_json:
        sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_estimate(found, Console())


async def _estimate_file(
    cfg: Config, workdir: Path, input: Path, endpoint: str | None, window: str
) -> dict | str:
    """The estimate object, or why there is none."""
    from lowtide.errors import ApiError
    from lowtide.runtime import Runtime
    from lowtide.vocabulary import DEFAULT_ENDPOINT

    runtime = Runtime(cfg, workdir, run_workers=False)  # tokenizers only: no weights converted
    await runtime.start()
    try:
        if endpoint is None:
            endpoint = await runtime.estimates.endpoint_of(_read_chunks(input)) or DEFAULT_ENDPOINT
        found = await runtime.estimates.estimate_chunks(
            _read_chunks(input), endpoint=endpoint, completion_window=window
        )
        return found.as_object()
    except ApiError as exc:
        return exc.message
    finally:
        await runtime.stop()


async def _print_run_estimate(runtime: Runtime, file_id: str, endpoint: str) -> None:
    from lowtide.errors import ApiError
    from lowtide.service import BatchRequest
    from lowtide.vocabulary import DEFAULT_PROJECT

    try:
        window = runtime.config.batches.max_completion_window
        found = await runtime.estimates.estimate(
            DEFAULT_PROJECT, BatchRequest(file_id, endpoint, window)
        )
    except ApiError:
        return  # the create right after says what is wrong
    _print_estimate(found.as_object(), err)


def _print_estimate(e: dict, out: Console) -> None:
    cost, invalid, unpriced = e["cost"], e["invalid_lines"], ", ".join(e["no_price_models"])
    lines = [
        f"estimate: {e['lines']:,} lines"
        + (f" ({invalid:,} invalid: the batch would fail)" if invalid else "")
        + f", {e['input_tokens']:,} input tokens ({e['input_tokens_method']}), up to "
        f"{e['max_output_tokens']:,} output tokens",
        f"cost: {cost['low']:,.6f} to {cost['high']:,.6f} {cost['currency']} at the batch price "
        f"({cost['sync_low']:,.6f} to {cost['sync_high']:,.6f} synchronously)"
        + (f"; no prices for {unpriced}" if unpriced else ""),
        f"time: ~{_duration(e['estimated_seconds'])}, "
        f"{'fits' if e['fits_window'] else 'does NOT fit'} the {e['completion_window']} window",
    ]
    lines += [
        f"  {m['model']}: {m['lines']:,} lines, {m['input_tokens']:,} in "
        f"({m['input_tokens_method']}), <= {m['max_output_tokens']:,} out, {m['queued_lines']:,} "
        f"queued ahead, ~{_duration(m['estimated_seconds'])} ({m['throughput']})"
        for m in e["models"]
    ]
    for line in lines:
        out.print(line, soft_wrap=True, highlight=False)


def _duration(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.0f}m" if s < 5400 else f"{s / 3600:.1f}h"


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
        LinesPerSecondColumn(),
        EtaColumn(),
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
