"""OpenAI's Files and Batch APIs, so Lowtide can be tested submitting work to a provider's batches.

Uploads stream into a temporary folder (never held in memory); the folder goes when the app
stops. Each batch is worked by one background task:

    validating (``batch_turnaround_seconds``) -> in_progress (lines answered at
    ``batch_lines_per_second``, 0: all at once) -> finalizing -> completed,
    or failed (validation), expired (some line expired), cancelling -> cancelled.

Each line gets the body its synchronous endpoint would give (same builders, same
``sim-missing`` / ``sim_fault`` faults); 2xx lines go to the output file, the rest to the
error file. Random faults: ``batch_rate_500`` and ``batch_rate_expired`` per line,
``batch_rate_drop`` per Files/Batches request (half of the drops after the action took
effect); limits: ``batch_max_lines`` and ``batch_token_limit`` (per key, enqueued tokens of
validating/in_progress/finalizing batches, estimated as prompt + max_out like the rate limiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import BodyPartReader, web

from lowtide_sim.config import SimConfig
from lowtide_sim.errors import error_body, error_response, json_response
from lowtide_sim.faults import MISSING_MODEL, requested_status
from lowtide_sim.responses import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Endpoint
from lowtide_sim.state import STATE, SimState

__all__ = ["BATCH_ENDPOINTS", "BATCH_STORE", "BatchStore", "add_batch_routes"]

BATCH_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/responses": RESPONSES,
}
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
COMPLETION_WINDOWS = ("24h",)
_WINDOW_SECONDS = 24 * 3600
_FILE_TTL = 30 * 24 * 3600  # purpose=batch inputs and batch outputs expire after 30 days
_ACTIVE = frozenset({"validating", "in_progress", "finalizing"})
_FINISHED = frozenset({"completed", "failed", "expired"})
_MAX_REPORTED_ERRORS = 100
_CHUNK = 256 * 1024

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


def _hex(bits: int) -> str:
    # Module-level RNG on purpose: ids must not disturb the seeded fault sequence.
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def _now() -> int:
    return int(time.time())


def _error(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = error_body(message, "invalid_request_error", code)
    body["error"]["param"] = param
    return json_response(body, status, headers)


def _unauthorized(request: web.Request, cfg: SimConfig) -> bool:
    key = cfg.require_key
    return bool(key) and request.headers.get("Authorization") != f"Bearer {key}"


def _api_key(request: web.Request) -> str:
    """The bearer token the enqueued-token limit is kept under, as the rate limiter does."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---------------------------------------------------------------- the store


@dataclass
class _File:
    obj: dict[str, Any]
    path: Path


@dataclass
class _Batch:
    obj: dict[str, Any]
    key: str
    input_path: Path
    lines: int
    tokens: int
    errors: list[dict[str, Any]] | None  # a validation failure, reported after the turnaround
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_deadline: float = 0.0  # loop time at which cancelling becomes cancelled


class BatchStore:
    """Files and batches of one app; files live on disk under a folder of its own."""

    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}  # insertion order = creation order
        self.tasks: set[asyncio.Task[None]] = set()
        self._folder: Path | None = None

    def new_path(self, prefix: str) -> Path:
        if self._folder is None:  # lazily, so an app that never serves leaves nothing behind
            self._folder = Path(tempfile.mkdtemp(prefix="lowtide-sim-files-"))
        return self._folder / f"{prefix}-{_hex(64)}"

    def add_file(
        self, state: SimState, path: Path, filename: str, purpose: str, expires_in: int | None
    ) -> _File:
        created = _now()
        file_id = f"file-{_hex(96)}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": path.stat().st_size,
            "created_at": created,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None if expires_in is None else created + expires_in,
            "status_details": None,
        }
        self.files[file_id] = entry = _File(obj, path)
        state.stats.files_created += 1
        state.stats.files_live = len(self.files)
        return entry

    def remove_file(self, state: SimState, file_id: str) -> None:
        entry = self.files.pop(file_id)
        entry.path.unlink(missing_ok=True)
        state.stats.files_deleted += 1
        state.stats.files_live = len(self.files)

    def enqueued_tokens(self, key: str) -> int:
        return sum(
            b.tokens
            for b in self.batches.values()
            if b.key == key and b.errors is None and b.obj["status"] in _ACTIVE
        )

    async def close(self, app: web.Application) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


BATCH_STORE = web.AppKey("lowtide_sim_batches", BatchStore)


# ---------------------------------------------------------------- validation


@dataclass
class _Scan:
    lines: int = 0
    tokens: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)


def _batch_error(
    code: str, message: str, line: int | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def _line_problem(line: Any, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """(code, message, param) of what OpenAI's validation would reject in one input line."""
    if not isinstance(line, dict):
        return "invalid_json_line", "This line is not parseable as valid JSON.", None
    for name in ("custom_id", "method", "url", "body"):
        if name not in line:
            return "missing_required_parameter", f"Missing required parameter: '{name}'.", name
    custom_id, body = line["custom_id"], line["body"]
    if not isinstance(custom_id, str):
        return "invalid_request", "custom_id must be a string.", "custom_id"
    if line["method"] != "POST":
        return "invalid_request", "Only the POST method is supported.", "method"
    if line["url"] != endpoint:
        msg = "The URL provided for this request does not match the batch endpoint."
        return "invalid_url", msg, "url"
    if not isinstance(body, dict):
        return "invalid_request", "The request body must be a JSON object.", "body"
    if body.get("stream"):
        return (
            "streaming_unsupported",
            "Streaming is not supported in the Batch API.",
            "body.stream",
        )
    if custom_id in seen:
        msg = f"The custom_id '{custom_id}' appears more than once in the input file."
        return "duplicate_custom_id", msg, "custom_id"
    seen.add(custom_id)
    return None


def _scan(path: Path, endpoint: str) -> _Scan:
    """Count lines and estimated tokens, and collect line errors; runs in a thread."""
    spec = BATCH_ENDPOINTS[endpoint]
    scan = _Scan()
    seen: set[str] = set()
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            scan.lines += 1
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
            problem = _line_problem(line, endpoint, seen)
            if problem is not None:
                if len(scan.errors) < _MAX_REPORTED_ERRORS:
                    scan.errors.append(_batch_error(problem[0], problem[1], number, problem[2]))
                continue
            body = line["body"]
            try:
                scan.tokens += spec.prompt(body) + spec.max_out(body)
            except (TypeError, ValueError, AttributeError):
                scan.tokens += 1
            if scan.model is None and isinstance(body.get("model"), str):
                scan.model = body["model"]
    return scan


def _validation_errors(
    scan: _Scan, cfg: SimConfig, store: BatchStore, key: str
) -> list[dict[str, Any]] | None:
    """Why the batch will fail after validating, or None; decided at create, shown later."""
    if cfg.batch_max_lines and scan.lines > cfg.batch_max_lines:
        msg = f"The batch has {scan.lines} requests; at most {cfg.batch_max_lines} are allowed."
        return [_batch_error("invalid_request", msg)]
    if scan.errors:
        return scan.errors
    if scan.lines == 0:
        return [_batch_error("empty_batch", "The input file contains no requests.")]
    if cfg.batch_token_limit and store.enqueued_tokens(key) + scan.tokens > cfg.batch_token_limit:
        msg = (
            f"Enqueued token limit reached for {scan.model or cfg.models[0]} in organization "
            f"org-lowtide-sim. Limit: {cfg.batch_token_limit:,} enqueued tokens. Please try "
            "again once some in_progress batches have been completed."
        )
        return [_batch_error("token_limit_exceeded", msg)]
    return None


def _check_metadata(metadata: Any) -> web.Response | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        msg = "Invalid type for 'metadata': expected an object."
        return _error(400, msg, "invalid_type", "metadata")
    if len(metadata) > 16:
        return _error(400, "metadata may hold at most 16 pairs.", "invalid_value", "metadata")
    for k, v in metadata.items():
        if not isinstance(v, str):
            msg = f"Invalid type for 'metadata.{k}': expected a string."
            return _error(400, msg, "invalid_type", f"metadata.{k}")
        if len(k) > 64 or len(v) > 512:
            msg = "metadata keys are at most 64 and values at most 512 characters."
            return _error(400, msg, "invalid_value", f"metadata.{k}")
    return None


# ---------------------------------------------------------------- processing


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "rate_limit_exceeded"
    return {401: "authentication_error", 403: "permission_error"}.get(
        status, "invalid_request_error"
    )


def _run_line(state: SimState, endpoint: Endpoint, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, body) the synchronous endpoint would answer, minus latency and rate limits."""
    cfg = state.config
    if body.get("model") == MISSING_MODEL:
        msg = f"The model `{MISSING_MODEL}` does not exist or you do not have access to it."
        return 404, error_body(msg, "invalid_request_error", "model_not_found")
    status = requested_status(body, 1)
    if status is not None:
        msg = f"Simulated failure with status {status}."
        return status, error_body(msg, _error_type(status), "sim_fault")
    n_out = endpoint.max_out(body) if endpoint.out_fields and state.engine.active else None
    try:
        return 200, endpoint.build(body, _hex(96), cfg, n_out)
    except (TypeError, ValueError, AttributeError, struct.error) as exc:
        return 400, error_body(f"Invalid request body: {exc}", "invalid_request_error", None)


class _Results:
    """The output and error files of one batch, written line by line as lines are answered."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store
        self.paths: dict[str, Path] = {}
        self.handles: dict[str, IO[bytes]] = {}

    def write(self, kind: str, entry: dict[str, Any]) -> None:
        handle = self.handles.get(kind)
        if handle is None:
            self.paths[kind] = path = self.store.new_path(kind)
            handle = self.handles[kind] = path.open("wb")
        handle.write(orjson.dumps(entry) + b"\n")

    def answered(self, custom_id: str, status: int, body: Any) -> None:
        response = {"status_code": status, "request_id": f"req_{_hex(96)}", "body": body}
        entry = self._entry(custom_id, response, None)
        self.write("output" if 200 <= status < 300 else "error", entry)

    def not_run(self, custom_id: str, code: str, message: str) -> None:
        self.write("error", self._entry(custom_id, None, {"code": code, "message": message}))

    @staticmethod
    def _entry(custom_id: str, response: Any, error: Any) -> dict[str, Any]:
        return {
            "id": f"batch_req_{_hex(128)}",
            "custom_id": custom_id,
            "response": response,
            "error": error,
        }

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def publish(self, state: SimState, batch_id: str) -> dict[str, str | None]:
        """Register the files written (an empty one gets no id, as OpenAI does)."""
        self.close()
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for kind, path in self.paths.items():
            name = f"{batch_id}_{kind}.jsonl"
            entry = self.store.add_file(state, path, name, "batch_output", _FILE_TTL)
            ids[f"{kind}_file_id"] = entry.obj["id"]
        return ids


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as ``event`` is set (a cancel)."""
    if event.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _process(state: SimState, batch: _Batch, results: _Results) -> bool:
    """Answer every line (or mark it cancelled / expired); True if some line expired."""
    obj, counts = batch.obj, batch.obj["request_counts"]
    endpoint = BATCH_ENDPOINTS[obj["endpoint"]]
    expired = False
    with batch.input_path.open("rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            line = orjson.loads(raw)  # validated at create
            custom_id = line["custom_id"]
            cfg = state.config  # read per line: /sim/config may change the pace or rates
            rate = cfg.batch_lines_per_second
            if rate > 0:
                await _wait(batch.cancel, 1.0 / rate)
            elif index % 256 == 255:
                await asyncio.sleep(0)  # stay responsive on a big batch
            if batch.cancel.is_set():
                results.not_run(custom_id, "batch_cancelled", CANCELLED_MESSAGE)
                continue
            draw = state.rng.random() if cfg.batch_rate_expired or cfg.batch_rate_500 else 1.0
            if draw < cfg.batch_rate_expired:
                expired = True
                results.not_run(custom_id, "batch_expired", EXPIRED_MESSAGE)
                continue
            if draw - cfg.batch_rate_expired < cfg.batch_rate_500:
                msg = "The server had an error while processing your request (simulated)."
                status, body = 500, error_body(msg, "server_error", None)
            else:
                status, body = _run_line(state, endpoint, line["body"])
            results.answered(custom_id, status, body)
            counts["completed" if 200 <= status < 300 else "failed"] += 1
    return expired


async def _work(state: SimState, store: BatchStore, batch: _Batch) -> None:
    """The life of one batch, from validating to a final status."""
    obj = batch.obj
    results = _Results(store)
    try:
        cancelled = await _wait(batch.cancel, state.config.batch_turnaround_seconds)
        if not cancelled and batch.errors is not None:
            obj.update(
                status="failed", failed_at=_now(), errors={"object": "list", "data": batch.errors}
            )
            return
        expired = False
        if not (cancelled and batch.errors is not None):
            if not cancelled:
                obj.update(status="in_progress", in_progress_at=_now())
            obj["request_counts"]["total"] = batch.lines
            expired = await _process(state, batch, results)
        if batch.cancel.is_set():
            left = batch.cancel_deadline - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.sleep(left)
            obj.update(results.publish(state, obj["id"]))
            obj.update(status="cancelled", cancelled_at=_now())
        elif expired:
            obj.update(results.publish(state, obj["id"]))
            obj.update(status="expired", expired_at=_now())
        else:
            obj.update(status="finalizing", finalizing_at=_now())
            obj.update(results.publish(state, obj["id"]))
            obj.update(status="completed", completed_at=_now())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # never leave a client polling a batch that will not move
        error = _batch_error("server_error", f"The simulator failed this batch: {exc!r}")
        obj.update(status="failed", failed_at=_now(), errors={"object": "list", "data": [error]})
    finally:
        results.close()
        batch.input_path.unlink(missing_ok=True)


# ---------------------------------------------------------------- handlers


def _file_or_404(store: BatchStore, file_id: str) -> _File | web.Response:
    entry = store.files.get(file_id)
    if entry is None:
        return _error(404, f"No such File object: {file_id}", None, "id")
    return entry


def _batch_or_404(store: BatchStore, batch_id: str) -> _Batch | web.Response:
    batch = store.batches.get(batch_id)
    if batch is None:
        return _error(404, f"No batch found with id '{batch_id}'.", None, "batch_id")
    return batch


async def _create_file(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        return _error(400, "Uploads must be multipart/form-data.", None, None)
    fields: dict[str, str] = {}
    path: Path | None = None
    filename = "upload"
    try:
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file" and path is None:
                filename = part.filename or filename
                path = store.new_path("upload")
                with path.open("wb") as out:
                    while chunk := await part.read_chunk(_CHUNK):
                        out.write(chunk)
            elif part.name:
                fields[part.name] = await part.text()
    except (ValueError, AssertionError) as exc:  # aiohttp's multipart parser on a bad body
        if path is not None:
            path.unlink(missing_ok=True)
        return _error(400, f"Could not parse the multipart body: {exc}", None, None)
    purpose = fields.get("purpose")
    problem = None
    if path is None:
        problem = _error(
            400, "Missing required parameter: 'file'.", "missing_required_parameter", "file"
        )
    elif purpose is None:
        msg = "Missing required parameter: 'purpose'."
        problem = _error(400, msg, "missing_required_parameter", "purpose")
    elif purpose not in UPLOAD_PURPOSES:
        msg = f"Invalid value: '{purpose}'. Supported values are: {list(UPLOAD_PURPOSES)}."
        problem = _error(400, msg, "invalid_value", "purpose")
    expires_in: int | None = _FILE_TTL if purpose == "batch" else None
    seconds = fields.get("expires_after[seconds]")
    if problem is None and seconds is not None:
        if not seconds.isdigit() or not 3600 <= int(seconds) <= _FILE_TTL:
            msg = "expires_after[seconds] must be between 3600 and 2592000."
            problem = _error(400, msg, "invalid_value", "expires_after.seconds")
        else:
            expires_in = int(seconds)
    if problem is not None:
        if path is not None:
            path.unlink(missing_ok=True)
        return problem
    assert path is not None and purpose is not None
    return json_response(store.add_file(state, path, filename, purpose, expires_in).obj)


def _limit(request: web.Request, default: int, most: int) -> int | web.Response:
    text = request.query.get("limit")
    if text is None:
        return default
    try:
        limit = int(text)
    except ValueError:
        limit = -1
    if not 1 <= limit <= most:
        msg = f"Invalid 'limit': expected an integer between 1 and {most}, got {text!r}."
        return _error(400, msg, "invalid_value", "limit")
    return limit


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: ``after`` is an exclusive item id (the SDK never reads last_id)."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }


async def _list_files(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    limit = _limit(request, 10000, 10000)
    if isinstance(limit, web.Response):
        return limit
    purpose = request.query.get("purpose")
    items = [f.obj for f in store.files.values() if purpose is None or f.obj["purpose"] == purpose]
    if request.query.get("order", "desc") != "asc":
        items.reverse()
    return json_response(_page(items, request.query.get("after"), limit))


async def _get_file(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    entry = _file_or_404(store, request.match_info["file_id"])
    return entry if isinstance(entry, web.Response) else json_response(entry.obj)


async def _file_content(
    request: web.Request, state: SimState, store: BatchStore
) -> web.StreamResponse:
    entry = _file_or_404(store, request.match_info["file_id"])
    if isinstance(entry, web.Response):
        return entry
    headers = {"Content-Type": "application/octet-stream"}
    return web.FileResponse(entry.path, chunk_size=_CHUNK, headers=headers)


async def _delete_file(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    file_id = request.match_info["file_id"]
    entry = _file_or_404(store, file_id)
    if isinstance(entry, web.Response):
        return entry
    store.remove_file(state, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


async def _create_batch(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    cfg = state.config
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return _error(400, "We could not parse the JSON body of your request.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            msg = f"Missing required parameter: '{name}'."
            return _error(400, msg, "missing_required_parameter", name)
    endpoint, window = body["endpoint"], body["completion_window"]
    if endpoint not in BATCH_ENDPOINTS:
        msg = f"Invalid value: '{endpoint}'. Supported values are: {list(BATCH_ENDPOINTS)}."
        return _error(400, msg, "invalid_value", "endpoint")
    if window not in COMPLETION_WINDOWS:
        msg = f"Invalid value: '{window}'. Supported values are: {list(COMPLETION_WINDOWS)}."
        return _error(400, msg, "invalid_value", "completion_window")
    metadata = body.get("metadata")
    bad = _check_metadata(metadata)
    if bad is not None:
        return bad
    source = _file_or_404(store, body["input_file_id"])
    if isinstance(source, web.Response):
        return _error(404, f"No such File object: {body['input_file_id']}", None, "input_file_id")

    # The batch keeps its own link to the input, so deleting the file cannot disturb it.
    input_path = store.new_path("input")
    try:
        os.link(source.path, input_path)
    except OSError:
        await asyncio.to_thread(shutil.copyfile, source.path, input_path)
    scan = await asyncio.to_thread(_scan, input_path, endpoint)
    key = _api_key(request)
    errors = _validation_errors(scan, cfg, store, key)  # no await from here to registration

    created = _now()
    batch_id = f"batch_{_hex(128)}"
    obj = {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + _WINDOW_SECONDS,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }
    batch = _Batch(obj, key, input_path, scan.lines, scan.tokens, errors)
    store.batches[batch_id] = batch
    state.stats.batches_created += 1
    state.stats.batch_lines += scan.lines
    task = asyncio.create_task(_work(state, store, batch), name=batch_id)
    store.tasks.add(task)
    task.add_done_callback(store.tasks.discard)
    return json_response(obj)


async def _get_batch(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    batch = _batch_or_404(store, request.match_info["batch_id"])
    return batch if isinstance(batch, web.Response) else json_response(batch.obj)


async def _list_batches(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    limit = _limit(request, 20, 100)
    if isinstance(limit, web.Response):
        return limit
    items = [b.obj for b in reversed(store.batches.values())]  # newest first
    return json_response(_page(items, request.query.get("after"), limit))


async def _cancel_batch(request: web.Request, state: SimState, store: BatchStore) -> web.Response:
    batch = _batch_or_404(store, request.match_info["batch_id"])
    if isinstance(batch, web.Response):
        return batch
    obj = batch.obj
    if obj["status"] in _FINISHED:
        # x-should-retry: the SDK retries 409s otherwise.
        msg = f"Cannot cancel a batch with status '{obj['status']}'."
        return _error(409, msg, None, None, {"x-should-retry": "false"})
    if not batch.cancel.is_set():
        obj.update(status="cancelling", cancelling_at=_now())
        loop = asyncio.get_running_loop()
        batch.cancel_deadline = loop.time() + state.config.batch_cancel_seconds
        batch.cancel.set()
        state.stats.batches_cancelled += 1
    return json_response(obj)


# ---------------------------------------------------------------- wiring


def _drop(request: web.Request) -> web.Response:
    """The sim's usual drop: a real FIN and no HTTP answer at all."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=499)


def _route(action: Any) -> Any:
    """Key check and ``batch_rate_drop`` (half before the action, half after) around a handler."""

    async def handler(request: web.Request) -> web.StreamResponse:
        state, store = request.app[STATE], request.app[BATCH_STORE]
        cfg = state.config
        if _unauthorized(request, cfg):
            return error_response(401, "Incorrect API key provided.", "invalid_api_key", cfg)
        drop_after = False
        if cfg.batch_rate_drop and state.rng.random() < cfg.batch_rate_drop:
            state.stats.batch_drops += 1
            if state.rng.random() < 0.5:
                return _drop(request)
            drop_after = True
        response = await action(request, state, store)
        return _drop(request) if drop_after else response

    return handler


async def _sync_files_live(request: web.Request, response: web.StreamResponse) -> None:
    # /sim/reset replaces Stats; the files are still stored, so the gauge is restored here.
    if BATCH_STORE in request.app:
        request.app[STATE].stats.files_live = len(request.app[BATCH_STORE].files)


def add_batch_routes(app: web.Application) -> None:
    """Register /v1/files and /v1/batches; call before any catch-all /v1 route."""
    store = app[BATCH_STORE] = BatchStore()
    app.on_cleanup.append(store.close)
    app.on_response_prepare.append(_sync_files_live)
    r = app.router
    r.add_post("/v1/files", _route(_create_file))
    r.add_get("/v1/files", _route(_list_files))
    r.add_get("/v1/files/{file_id}", _route(_get_file))
    r.add_delete("/v1/files/{file_id}", _route(_delete_file))
    r.add_get("/v1/files/{file_id}/content", _route(_file_content))
    r.add_post("/v1/batches", _route(_create_batch))
    r.add_get("/v1/batches", _route(_list_batches))
    r.add_get("/v1/batches/{batch_id}", _route(_get_batch))
    r.add_post("/v1/batches/{batch_id}/cancel", _route(_cancel_batch))
