"""`lowtide submit`, `lowtide batches ...`, `lowtide files ...`: a client of a running server.

Every call goes through the official `openai` SDK, so these commands work against any
OpenAI-compatible Batch API; Lowtide's extensions (live rate, ETA and cost on the batch object,
retry, partial results, estimates) are used where the server has them and skipped where not.

Exit codes: 0 every line succeeded (or the command did what it was asked), 1 some lines failed,
the batch expired or was cancelled, or the server refused the request; 2 invalid input (the batch
failed validation, the file could not be uploaded, a bad option); 3 the server cannot be reached
or refused the API key; 130 interrupted while waiting (the batch keeps running).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowtide.cli.common import app, err
from lowtide.cli.progress import CostColumn, EtaColumn, LineCountsColumn, LinesPerSecondColumn

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch

batches_app = typer.Typer(
    no_args_is_help=True,
    help="Batches on a server: list, get (and wait), cancel, retry, results, estimate.",
)
files_app = typer.Typer(
    no_args_is_help=True, help="Files on a server: list, get, upload, content, delete."
)
app.add_typer(batches_app, name="batches")
app.add_typer(files_app, name="files")

DEFAULT_SERVER = "http://127.0.0.1:8080/v1"
DEFAULT_ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        "-s",
        help="server URL, with or without /v1 "
        f"(default: $LOWTIDE_URL, else $OPENAI_BASE_URL, else {DEFAULT_SERVER})",
        show_default=False,
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key (default: $LOWTIDE_API_KEY, else $OPENAI_API_KEY)",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the raw object(s) as JSON")]
PollOpt = Annotated[
    float, typer.Option("--poll", min=0.05, help="seconds between status checks while waiting")
]
WindowOpt = Annotated[str, typer.Option("--window", help="completion window, e.g. 24h, 90m, 7d")]


# --- where the server is -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A server and the key to use on it."""

    base_url: str
    api_key: str
    explicit_server: str | None = None  # --server as given, to repeat it in hints

    def client(self) -> OpenAI:
        from openai import OpenAI  # imported here: `lowtide serve` and `run` do not need it

        return OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=2)

    def hint(self, command: str) -> str:
        """`command` as the user would type it again, with --server if they gave one."""
        flag = f" --server {self.explicit_server}" if self.explicit_server else ""
        return f"lowtide {command}{flag}"


def normalize_url(url: str) -> str:
    """`http://host:8080`, `http://host:8080/` and `http://host:8080/v1/` -> `.../v1`."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def resolve(
    server: str | None, api_key: str | None, environ: Mapping[str, str] = os.environ
) -> Target:
    """--server/--api-key, then LOWTIDE_URL/LOWTIDE_API_KEY, then OPENAI_BASE_URL/OPENAI_API_KEY."""
    url = server or environ.get("LOWTIDE_URL") or environ.get("OPENAI_BASE_URL") or DEFAULT_SERVER
    # A Lowtide server with no keys configured accepts any key; the SDK insists on one.
    key = api_key or environ.get("LOWTIDE_API_KEY") or environ.get("OPENAI_API_KEY") or "lowtide"
    return Target(normalize_url(url), key, server)


def _envelope_message(body: object) -> str | None:
    """The `message` of an OpenAI error envelope (or of its `error` object), if any."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return None


def _message(exc: BaseException) -> str:
    """What an SDK error says: the server's message, or the exception's own text."""
    return _envelope_message(getattr(exc, "body", None)) or str(
        getattr(exc, "message", None) or exc
    )


def _exit_code_for_status(status: int) -> int:
    if status in (401, 403):
        return EXIT_UNREACHABLE
    return EXIT_INVALID if status in (400, 413, 422) else EXIT_FAILED


def _error(text: str) -> None:
    """`error: text` on stderr; `text` may hold the server's words, so no markup in it."""
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _talking_to(target: Target) -> Iterator[None]:
    """Turn the SDK's errors into a message and this module's exit codes."""
    import openai

    try:
        yield
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        _error(f"cannot reach {target.base_url}: {cause}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc
    except openai.APIStatusError as exc:
        if exc.status_code in (401, 403):
            what = f"{target.base_url} refused the API key"
        else:
            what = f"the server answered {exc.status_code}"
        _error(f"{what}: {_message(exc)}")
        raise typer.Exit(_exit_code_for_status(exc.status_code)) from exc


# --- output ----------------------------------------------------------------------------------


def _stdout() -> Console:
    """Rich output for people; piped, it is wide enough that ids are never cut."""
    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, 200))


def _show(obj: Any, as_json: bool, human: Callable[[], object]) -> None:
    """One object: raw JSON for scripts (--json), else the human rendering."""
    if as_json:
        _print_json(_as_dict(obj))
    else:
        human()


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _as_dict(obj: Any) -> dict[str, Any]:
    """An SDK object as the server sent it (extension fields included)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _extension(batch: Batch) -> dict[str, Any]:
    """The batch's `lowtide` extension object, or {} from a server without it."""
    ext = _as_dict(batch).get("lowtide")
    return ext if isinstance(ext, dict) else {}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _money(amount: float, currency: str) -> str:
    text = f"{amount:,.6f}".rstrip("0").rstrip(".") if amount else "0"
    return f"{text} {currency}"


def _cost_text(ext: dict[str, Any]) -> str | None:
    cost = ext.get("cost")
    if not isinstance(cost, dict) or cost.get("amount") is None:
        return None
    if not cost["amount"] and cost.get("no_price_lines"):
        return None  # nothing priced: "0 USD" would mislead
    return _money(float(cost["amount"]), str(cost.get("currency") or ""))


def _counts(batch: Batch) -> tuple[int, int, int]:
    """(completed, failed, total) from request_counts (absent while validating on some servers)."""
    c = batch.request_counts
    return (c.completed, c.failed, c.total) if c else (0, 0, 0)


def _batch_table(batch: Batch) -> Table:
    ext = _extension(batch)
    ok, failed, total = _counts(batch)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | None]] = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", getattr(batch, "model", None)),
        ("lines", f"{ok:,} ok, {failed:,} failed of {total:,}"),
        ("created", _when(batch.created_at)),
        ("window", f"{batch.completion_window} (expires {_when(batch.expires_at)})"),
        ("input file", batch.input_file_id),
        ("output file", batch.output_file_id),
        ("error file", batch.error_file_id),
    ]
    if batch.status not in TERMINAL:
        rate, finish = ext.get("lines_per_second"), ext.get("estimated_finish_at")
        rows.append(("rate", f"{rate:,.1f} lines/s" if rate else None))
        rows.append(("estimated finish", _when(finish) if finish else None))
        rows.append(("waiting because", ext.get("paused_reason")))
    rows.append(("cost", _cost_text(ext)))
    if ext.get("retries"):
        rows.append(("retries", str(ext["retries"])))
    if batch.usage is not None:
        u = batch.usage
        rows.append(("tokens", f"{u.input_tokens:,} in, {u.output_tokens:,} out"))
    if batch.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in batch.metadata.items())))
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    return table


def _print_validation_errors(batch: Batch, limit: int = 50) -> None:
    data = (batch.errors.data or []) if batch.errors else []
    err.print(f"[red]batch {batch.id} failed validation[/red] ({len(data)} error(s) reported):")
    for e in data[:limit]:
        where = f"line {e.line}" if e.line else "file"
        param = f" ({e.param})" if e.param else ""
        err.print(
            escape(f"  {where}: {e.code}{param}: {e.message}"), highlight=False, soft_wrap=True
        )
    if len(data) > limit:
        err.print(f"  ... and {len(data) - limit} more")


def _outcome(batch: Batch) -> int:
    """The exit code a finished batch stands for."""
    if batch.status == "failed":
        return EXIT_INVALID
    _, failed, _ = _counts(batch)
    return EXIT_OK if batch.status == "completed" and failed == 0 else EXIT_FAILED


def _summary(batch: Batch) -> str:
    ok, failed, total = _counts(batch)
    cost = _cost_text(_extension(batch))
    return f"{batch.id} {batch.status}: {ok:,} succeeded, {failed:,} failed of {total:,}" + (
        f", cost {cost}" if cost else ""
    )


# --- waiting ---------------------------------------------------------------------------------


def _wait(target: Target, client: OpenAI, batch_id: str, poll: float) -> Batch:
    """Poll until the batch ends, with a progress bar; Ctrl-C leaves it running (exit 130)."""
    tty = sys.stderr.isatty()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        LineCountsColumn(),
        LinesPerSecondColumn(),
        EtaColumn(),
        CostColumn(),
        TimeElapsedColumn(),
    ]
    try:
        with (
            _talking_to(target),
            Progress(*columns, console=err, transient=False, disable=not tty) as bar,
        ):
            task = bar.add_task("validating", total=None)
            last_status = None
            while True:
                batch = client.batches.retrieve(batch_id)
                ext = _extension(batch)
                ok, failed, total = _counts(batch)
                finish = ext.get("estimated_finish_at")
                bar.update(
                    task,
                    description=batch.status,
                    total=total or None,
                    completed=ok + failed,
                    ok=ok,
                    failed=failed,
                    rate=ext.get("lines_per_second"),
                    eta=max(0.0, finish - time.time()) if finish else None,
                    cost=_cost_text(ext) if (ext.get("cost") or {}).get("amount") else None,
                )
                if not tty and batch.status != last_status:
                    err.print(f"{batch.id}: {batch.status}", highlight=False)
                last_status = batch.status
                if batch.status in TERMINAL:
                    return batch
                time.sleep(poll)
    except KeyboardInterrupt:
        err.print(
            f"\nstopped waiting; batch {batch_id} keeps running on the server (not cancelled).\n"
            f"Resume waiting with:  {target.hint(f'batches get {batch_id} --wait')}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _download(client: OpenAI, file_id: str | None, path: Path) -> bool:
    """Write a file's content to `path`; with no file, remove a stale `path`."""
    if file_id is None:
        path.unlink(missing_ok=True)
        return False
    with client.files.with_streaming_response.content(file_id) as response, open(path, "wb") as fh:
        for chunk in response.iter_bytes():
            fh.write(chunk)
    return True


def _finish_waiting(target: Target, batch: Batch, as_json: bool) -> None:
    """After `get --wait` / `retry --wait`: show the batch, exit with its outcome."""
    _show(batch, as_json, lambda: _stdout().print(_batch_table(batch)))
    if batch.status == "failed":
        _print_validation_errors(batch)
    else:
        err.print(_summary(batch), highlight=False, soft_wrap=True)
        if batch.output_file_id or batch.error_file_id:
            err.print(
                f"download: {target.hint(f'batches results {batch.id} --type output -o OUT.jsonl')}",
                highlight=False,
                soft_wrap=True,
            )
    raise typer.Exit(_outcome(batch))


# --- submit ----------------------------------------------------------------------------------


def _first_url(path: Path) -> str | None:
    """The `url` of the file's first request line, if it has a readable one."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                line = raw.removeprefix(b"\xef\xbb\xbf").strip()
                if line:
                    url = json.loads(line).get("url")
                    return url if isinstance(url, str) and url else None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def _parse_metadata(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _error(f"--metadata wants KEY=VALUE, got {pair!r}")
            raise typer.Exit(EXIT_INVALID)
        metadata[key] = value
    return metadata


def _upload(client: OpenAI, path: Path) -> str:
    with open(path, "rb") as fh:
        return client.files.create(file=(path.name, fh), purpose="batch").id


@app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(help="JSONL file of batch requests", exists=True, dir_okay=False)
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(help="the batch endpoint (default: the url of the file's first request)"),
    ] = None,
    window: WindowOpt = "24h",
    wait: Annotated[
        bool,
        typer.Option("--wait/--no-wait", help="wait with a progress bar, then download results"),
    ] = True,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="successful results (default: FILE.output.jsonl beside FILE)"
        ),
    ] = None,
    errors: Annotated[
        Path | None,
        typer.Option(
            "--errors", "-e", help="failed lines (default: FILE.errors.jsonl beside FILE)"
        ),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", "-m", help="KEY=VALUE, repeatable: the batch's metadata"),
    ] = None,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
    poll: PollOpt = 1.0,
) -> None:
    """Upload FILE and start a batch on a server; print its id, wait and download the results.

    Exit codes:
    0 every line succeeded;
    1 some lines failed, or the batch expired or was cancelled;
    2 invalid input (validation errors are printed with their line numbers);
    3 cannot reach the server, or it refused the API key;
    130 interrupted while waiting (the batch keeps running).
    """
    meta = _parse_metadata(metadata)
    endpoint = endpoint or _first_url(file) or DEFAULT_ENDPOINT
    target = resolve(server, api_key)
    client = target.client()
    with _talking_to(target):
        file_id = _upload(client, file)
        batch = client.batches.create(
            input_file_id=file_id,
            endpoint=endpoint,  # type: ignore[arg-type] - any endpoint the server serves
            completion_window=window,  # type: ignore[arg-type] - Lowtide takes any duration
            **({"metadata": meta} if meta else {}),
        )
    print(batch.id, flush=True)
    if not wait:
        return
    batch = _wait(target, client, batch.id, poll)
    if batch.status == "failed":
        _print_validation_errors(batch)
        raise typer.Exit(EXIT_INVALID)
    output = output or file.with_name(f"{file.stem}.output.jsonl")
    errors = errors or file.with_name(f"{file.stem}.errors.jsonl")
    with _talking_to(target):
        wrote_output = _download(client, batch.output_file_id, output)
        wrote_errors = _download(client, batch.error_file_id, errors)
    written = [f"output → {output}"] if wrote_output else []
    written += [f"errors → {errors}"] if wrote_errors else []
    err.print(
        _summary(batch) + (f"; {', '.join(written)}" if written else ""),
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(_outcome(batch))


# --- batches ---------------------------------------------------------------------------------


@batches_app.command("list")
def batches_list(
    limit: Annotated[int, typer.Option(min=1, help="show at most this many, newest first")] = 20,
    status: Annotated[
        str | None, typer.Option(help="only batches in this status, e.g. in_progress")
    ] = None,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List batches, newest first."""
    target = resolve(server, api_key)
    client = target.client()
    found: list[Batch] = []
    with _talking_to(target):
        for batch in client.batches.list(limit=min(limit, 100)):  # pages on as needed
            if status is None or batch.status == status:
                found.append(batch)
                if len(found) >= limit:
                    break
    if as_json:
        _print_json({"object": "list", "data": [_as_dict(b) for b in found]})
        return
    table = Table()
    for name in ("id", "status", "endpoint", "lines ok/failed/total", "created", "cost"):
        table.add_column(name, no_wrap=name == "id")
    for b in found:
        ok, failed, total = _counts(b)
        table.add_row(
            b.id,
            b.status,
            b.endpoint,
            f"{ok:,} / {failed:,} / {total:,}",
            _when(b.created_at),
            _cost_text(_extension(b)) or "",
        )
    _stdout().print(table)


@batches_app.command("get")
def batches_get(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch id")],
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for it to end, with a progress bar")
    ] = False,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
    poll: PollOpt = 1.0,
) -> None:
    """Show a batch; with --wait, follow it to the end (exit code as for `submit`)."""
    target = resolve(server, api_key)
    client = target.client()
    if wait:
        _finish_waiting(target, _wait(target, client, batch_id, poll), as_json)
    with _talking_to(target):
        batch = client.batches.retrieve(batch_id)
    if as_json:
        _print_json(_as_dict(batch))
    else:
        _stdout().print(_batch_table(batch))
        if batch.status == "failed":
            _print_validation_errors(batch)


@batches_app.command("cancel")
def batches_cancel(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch id")],
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Cancel a batch: no new line starts; what finished is kept (retry resumes it)."""
    target = resolve(server, api_key)
    with _talking_to(target):
        batch = target.client().batches.cancel(batch_id)
    _show(batch, as_json, lambda: _stdout().print(f"{batch.id}: {batch.status}", highlight=False))


@batches_app.command("retry")
def batches_retry(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch id")],
    code: Annotated[
        list[str] | None,
        typer.Option(
            "--code", help="rerun only lines that failed with this error code; repeatable"
        ),
    ] = None,
    custom_id: Annotated[
        list[str] | None,
        typer.Option("--custom-id", help="rerun only this line; repeatable"),
    ] = None,
    window: Annotated[
        str | None,
        typer.Option("--window", help="a new completion window (default: the batch's own)"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the rerun to end")] = False,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
    poll: PollOpt = 1.0,
) -> None:
    """Rerun the lines of an ended batch that did not succeed (a Lowtide extension)."""
    import openai

    body: dict[str, Any] = {}
    if code:
        body["codes"] = code
    if custom_id:
        body["custom_ids"] = custom_id
    if window:
        body["completion_window"] = window
    target = resolve(server, api_key)
    client = target.client()
    with _talking_to(target):
        batch = client.post(
            f"/batches/{urllib.parse.quote(batch_id, safe='')}/retry",
            body=body,
            cast_to=openai.types.Batch,
        )
    if wait:
        if not as_json:
            err.print(f"{batch.id}: {batch.status}", highlight=False)
        _finish_waiting(target, _wait(target, client, batch.id, poll), as_json)
    _show(batch, as_json, lambda: _stdout().print(f"{batch.id}: {batch.status}", highlight=False))


@batches_app.command("results")
def batches_results(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch id")],
    kind: Annotated[
        str,
        typer.Option("--type", help="all, output (successes) or error (failures)"),
    ] = "all",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: stdout)")
    ] = None,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Stream the result lines committed so far, also while the batch runs (a Lowtide extension)."""
    kind = kind.lower()
    if kind not in ("all", "output", "error"):
        _error(f"--type is all, output or error, not {kind!r}")
        raise typer.Exit(EXIT_INVALID)
    target = resolve(server, api_key)
    url = (
        f"{target.base_url}/batches/{urllib.parse.quote(batch_id, safe='')}/results?"
        + urllib.parse.urlencode({"type": kind})
    )
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {target.api_key}", "Accept": "application/x-jsonl"}
    )
    # Streamed as it comes (the SDK would read the whole body first); the file is opened only
    # once the server has said yes, so a refusal leaves no empty file behind.
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            _copy_stream(response, output)
    except urllib.error.HTTPError as exc:
        try:
            envelope = json.loads(exc.read() or b"{}")
        except ValueError:
            envelope = None
        message = _envelope_message(envelope) or str(exc.reason)
        _error(f"the server answered {exc.code}: {message}")
        raise typer.Exit(_exit_code_for_status(exc.code)) from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        _error(f"cannot reach {target.base_url}: {reason}")
        raise typer.Exit(EXIT_UNREACHABLE) from exc


def _copy_stream(response: Any, output: Path | None) -> None:
    if output is None:
        while chunk := response.read(1 << 16):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    with open(output, "wb") as fh:
        while chunk := response.read(1 << 16):
            fh.write(chunk)


@batches_app.command("estimate")
def batches_estimate(
    file: Annotated[
        Path, typer.Argument(help="JSONL file of batch requests", exists=True, dir_okay=False)
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(help="the batch endpoint (default: the url of the file's first request)"),
    ] = None,
    window: WindowOpt = "24h",
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Tokens, cost and duration of FILE as a batch on the server, creating none (extension).

    The file is uploaded, estimated and deleted again.
    `lowtide estimate` does the same with no server.
    """
    from lowtide.cli.local import _print_estimate

    endpoint = endpoint or _first_url(file) or DEFAULT_ENDPOINT
    target = resolve(server, api_key)
    client = target.client()
    with _talking_to(target):
        file_id = _upload(client, file)
        try:
            found = client.post(
                "/batches/estimate",
                body={"input_file_id": file_id, "endpoint": endpoint, "completion_window": window},
                cast_to=object,
            )
        finally:
            with contextlib.suppress(Exception):
                client.files.delete(file_id)
    if as_json or not isinstance(found, dict):
        _print_json(found)
        return
    try:
        _print_estimate(found, _stdout())
    except (KeyError, TypeError):  # another server's idea of an estimate: show it as it is
        _print_json(found)


# --- files -----------------------------------------------------------------------------------


def _file_table(files: list[Any]) -> Table:
    table = Table()
    for name in ("id", "filename", "purpose", "bytes", "created", "expires"):
        table.add_column(name, no_wrap=name == "id", justify="right" if name == "bytes" else "left")
    for f in files:
        table.add_row(
            f.id,
            f.filename,
            f.purpose,
            f"{f.bytes:,}",
            _when(f.created_at),
            _when(getattr(f, "expires_at", None)),
        )
    return table


@files_app.command("list")
def files_list(
    purpose: Annotated[str | None, typer.Option(help="only files of this purpose")] = None,
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 20,
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List files."""
    target = resolve(server, api_key)
    client = target.client()
    found: list[Any] = []
    with _talking_to(target):
        kwargs: dict[str, Any] = {"limit": min(limit, 100)}
        if purpose:
            kwargs["purpose"] = purpose
        for f in client.files.list(**kwargs):
            found.append(f)
            if len(found) >= limit:
                break
    if as_json:
        _print_json({"object": "list", "data": [_as_dict(f) for f in found]})
    else:
        _stdout().print(_file_table(found))


@files_app.command("get")
def files_get(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="the file id")],
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Show a file."""
    target = resolve(server, api_key)
    with _talking_to(target):
        f = target.client().files.retrieve(file_id)
    _show(f, as_json, lambda: _stdout().print(_file_table([f])))


@files_app.command("upload")
def files_upload(
    file: Annotated[Path, typer.Argument(help="the file to upload", exists=True, dir_okay=False)],
    purpose: Annotated[str, typer.Option(help="the file's purpose")] = "batch",
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Upload a file; print its id."""
    target = resolve(server, api_key)
    with _talking_to(target), open(file, "rb") as fh:
        f = target.client().files.create(file=(file.name, fh), purpose=purpose)  # type: ignore[arg-type]
    _show(f, as_json, lambda: print(f.id, flush=True))


@files_app.command("content")
def files_content(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="the file id")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here (default: stdout)")
    ] = None,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Download a file's content."""
    target = resolve(server, api_key)
    client = target.client()
    with _talking_to(target):
        if output is not None:
            _download(client, file_id, output)
            return
        with client.files.with_streaming_response.content(file_id) as response:
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


@files_app.command("delete")
def files_delete(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="the file id")],
    as_json: JsonOpt = False,
    server: ServerOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Delete a file."""
    target = resolve(server, api_key)
    with _talking_to(target):
        deleted = target.client().files.delete(file_id)
    _show(
        deleted,
        as_json,
        lambda: _stdout().print(f"{deleted.id}: {'deleted' if deleted.deleted else 'not deleted'}"),
    )
