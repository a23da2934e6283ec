"""One streaming pass over an input file: check every line, and cut the shard plan as we go.

Memory stays bounded: lines are checked as they stream past, and duplicate `custom_id`s are
found from their 64-bit hashes, spilled to disk past a fixed number (see duplicates.py). Only
when a hash repeats does a second pass read the file again to name the offending lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from lowtide.admission.estimate import estimate_prompt_tokens
from lowtide.config import BatchLimits, ModelRoute
from lowtide.runner.duplicates import DuplicateFinder
from lowtide.vocabulary import ENDPOINTS, MESSAGES_ENDPOINT, UTF8_BOM

MAX_LINE_BYTES = 64 * 1024 * 1024
_UNSEEN = object()

# A route's check of one line's body: None, or (code, param without "body.", message).
LineChecker = Callable[[dict[str, Any]], tuple[str, str, str] | None]


def iter_request_lines(data: bytes) -> list[bytes]:
    """The request lines in a byte range, skipping blank ones exactly as validation does."""
    return [line for line in data.split(b"\n") if line.strip()]


async def stream_lines(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-blank lines of a byte stream (a blob, a download), a line at a time."""
    buffer = b""
    async for piece in pieces:
        buffer += piece
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


@dataclass
class ValidationResult:
    total: int
    shards: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    error_count: int
    models: list[str]
    possible_duplicates: list[tuple[int, int]] = field(default_factory=list)
    # Input tokens of the valid lines, about (~4 characters a token), by model: what the
    # budgets weigh before the batch may start.
    input_tokens: dict[str, int] = field(default_factory=dict)
    # Provider batches to send, cut to the provider's limits: {idx, route, line_count, bytes}.
    chunks: list[dict[str, Any]] = field(default_factory=list)


class FileValidator:
    def __init__(
        self,
        endpoint: str,
        endpoints_of: Callable[[str], tuple[str, ...] | None],
        limits: BatchLimits,
        served_models: list[str] | None = None,
        upstream_of: Callable[[str], ModelRoute | None] | None = None,
        checker_of: Callable[[str], LineChecker | None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        # What a model's route refuses in a body (parameters its engine does not honour, an
        # invalid schema): (code, param without "body.", message), or None.
        self._checker_of = checker_of or (lambda model: None)
        self._checkers: dict[str, LineChecker | None] = {}
        # The route of a model whose lines go out as provider batches (None: they run here).
        # Their lines get shards of their own, and shards are cut at provider-batch limits.
        self._upstream_of = upstream_of or (lambda model: None)
        self._upstreams: dict[str, ModelRoute | None] = {}  # model -> _upstream_of(model)
        # Messages lines are validated per line, as Anthropic does: a body a route cannot serve
        # fails that line when it runs (an `errored` result), never the whole batch. They run
        # synchronously (an upstream_batch route's provider speaks OpenAI's batch format).
        self._per_line = endpoint == MESSAGES_ENDPOINT
        if self._per_line:
            self._upstream_of = lambda model: None
        self._chunks: list[dict[str, Any]] = []
        self._open_chunk: dict[str, dict[str, Any]] = {}  # route name -> chunk being filled
        self._served = ", ".join(f"'{m}'" for m in served_models or [])
        self._endpoints_of = endpoints_of  # what a model's route serves; None: no route
        self._endpoints_cache: dict[str, tuple[str, ...] | None] = {}
        # Models whose route serves this endpoint, and their route's check of a line.
        self._serving: dict[str, LineChecker | None] = {}
        self._required = ENDPOINTS.get(endpoint, ("",))[0]  # the body's prompt field here
        self._limits = limits
        self._max_lines_plus_one = limits.max_lines + 1
        self._shard_lines, self._shard_bytes = limits.shard_lines, limits.shard_bytes
        self._buffer = b""
        self._buffer_offset = 0  # file offset of _buffer[0]
        self._past_bom = False
        self._skipping_long_line = False
        self._line_no = 0  # 1-based number of the last line seen
        self.total = 0
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.models: dict[str, None] = {}
        self.input_tokens: dict[str, int] = {}
        self._ids = DuplicateFinder()
        self._shards: list[dict[str, Any]] = []
        self._shard: dict[str, Any] | None = None

    # -- streaming -----------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        data = self._buffer + chunk
        base = self._buffer_offset
        start = 0
        if not self._past_bom:
            if len(data) < len(UTF8_BOM) and UTF8_BOM.startswith(data):
                self._buffer = data  # may still be a byte-order mark
                return
            self._past_bom = True
            if data.startswith(UTF8_BOM):
                start = len(UTF8_BOM)  # shards start after it; line 1 is the line after it
        last = data.rfind(b"\n")
        if last >= start:
            # The complete lines split in one call, not found one by one: on every line's path.
            line, at = self._line, base + start
            for raw in data[start:last].split(b"\n"):
                end = at + len(raw) + 1
                line(raw, at, end)
                at = end
            start = last + 1
        self._buffer = data[start:]
        self._buffer_offset = base + start
        if len(self._buffer) > MAX_LINE_BYTES and not self._skipping_long_line:
            self._line_no += 1
            self._error(
                "line_too_long",
                self._line_no,
                None,
                f"This line is longer than {MAX_LINE_BYTES} bytes.",
            )
            self._skipping_long_line = True
        if self._skipping_long_line:
            self._buffer_offset += len(self._buffer)
            self._buffer = b""

    def finish(self) -> ValidationResult:
        if self._buffer:
            end = self._buffer_offset + len(self._buffer)
            self._line(self._buffer, self._buffer_offset, end)
            self._buffer = b""
        self._close_shard()
        if self.total == 0 and self.error_count == 0:
            self._error("empty_batch", None, None, "The input file contains no requests.")
        try:
            duplicates = self._ids.repeats(self._limits.max_errors_reported)
        finally:
            self._ids.close()
        return ValidationResult(
            total=self.total,
            shards=self._shards,
            errors=self.errors,
            error_count=self.error_count,
            models=list(self.models),
            possible_duplicates=duplicates,
            input_tokens=self.input_tokens,
            chunks=self._chunks,
        )

    def close(self) -> None:
        """Drop any spill files of a validation that stopped before finish()."""
        self._ids.close()

    # -- one line ------------------------------------------------------------------------
    def _line(self, raw: bytes, start: int, end: int) -> None:
        if self._skipping_long_line:
            self._skipping_long_line = False
            self._not_a_request(end)
            return
        line = self._line_no = self._line_no + 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if not raw or raw.isspace():  # (not raw.strip(): a copy of every line)
                self._not_a_request(end)
                return
            obj = _UNSEEN
        # The usual line, checked and counted in one pass on every line's path: a model seen
        # before on this endpoint that runs here, nothing wrong. Anything else (or anything
        # wrong) goes the long way, which names the problem.
        if type(obj) is dict and not self._per_line:
            custom_id, body = obj.get("custom_id"), obj.get("body")
            if (
                type(custom_id) is str
                and custom_id
                and type(body) is dict
                and obj.get("method") == "POST"
                and obj.get("url") == self.endpoint
                and not body.get("stream")
                and body.get(self._required) is not None
            ):
                model = body.get("model")
                checker = self._serving.get(model, _UNSEEN) if type(model) is str else _UNSEEN
                if (
                    (checker is None or (checker is not _UNSEEN and checker(body) is None))
                    and self._upstreams.get(model, _UNSEEN) is None
                    and (shard := self._shard) is not None
                    and "chunk" not in shard
                ):
                    self._ids.add(hash(custom_id), line)
                    self._valid(model, body)
                    total = self.total = self.total + 1
                    if total == self._max_lines_plus_one:
                        self._too_many()
                    shard["byte_end"] = end
                    count = shard["request_count"] = shard["request_count"] + 1
                    if count >= self._shard_lines or end - shard["byte_start"] >= self._shard_bytes:
                        self._close_shard()
                    return
        if obj is _UNSEEN:
            self._error(
                "invalid_json_line", line, None, "This line is not parseable as valid JSON."
            )
            model = None
        else:
            model = self._check(obj, line)
        self.total += 1
        if self.total == self._max_lines_plus_one:
            self._too_many()
        route = None if model is None else _memo(self._upstreams, self._upstream_of, model)
        chunk = self._chunk_for(route, model or "", len(raw) + 1) if route is not None else None
        shard = self._shard
        if shard is None or shard.get("chunk") != chunk:
            # A shard's lines all run here, or all go in one chunk.
            self._close_shard()
            shard = self._shard = {
                "idx": len(self._shards),
                "first_request": self.total - 1,
                "request_count": 0,
                "first_line": self._line_no,
                "byte_start": start,
                "byte_end": end,
            }
            if chunk is not None:
                shard["chunk"] = chunk
        shard["byte_end"] = end
        count = shard["request_count"] = shard["request_count"] + 1
        if count >= self._shard_lines or end - shard["byte_start"] >= self._shard_bytes:
            self._close_shard()

    def _too_many(self) -> None:
        self._error(
            "too_many_tasks",
            None,
            None,
            f"The input file has more than {self._limits.max_lines:,} requests, the limit per batch.",
        )

    def _chunk_for(self, route: ModelRoute, model: str, size: int) -> int:
        """The provider batch this line goes in: the route's open one while it has room."""
        if route.upstream_model:
            size += max(0, len(route.upstream_model) - len(model))  # the name is swapped
        chunk = self._open_chunk.get(route.name)
        if chunk is not None and (
            chunk["line_count"] + 1 > route.upstream_batch_max_lines
            or chunk["bytes"] + size > route.upstream_batch_max_bytes
        ):
            chunk = None
        if chunk is None:
            chunk = {"idx": len(self._chunks), "route": route.name, "line_count": 0, "bytes": 0}
            self._chunks.append(chunk)
            self._open_chunk[route.name] = chunk
        chunk["line_count"] += 1
        chunk["bytes"] += size
        return int(chunk["idx"])

    def _not_a_request(self, end: int) -> None:
        """A blank line (or the rest of one too long): part of the open shard's bytes, if any;
        blank lines between shards belong to no shard."""
        if self._shard is not None:
            self._shard["byte_end"] = end

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shards.append(self._shard)
            self._shard = None

    def _error(self, code: str, line: int | None, param: str | None, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < self._limits.max_errors_reported:
            self.errors.append({"code": code, "line": line, "param": param, "message": message})

    def _check(self, obj: Any, line: int) -> str | None:
        """Record what is wrong with the line, if anything; the model of a valid line."""
        if not isinstance(obj, dict):
            self._error("invalid_json_line", line, None, "This line is not a JSON object.")
            return
        for name in ("custom_id", "method", "url", "body"):
            if name not in obj or obj[name] is None:
                self._error(
                    "missing_required_parameter",
                    line,
                    name,
                    f"Missing required parameter: '{name}'.",
                )
                return
        custom_id = obj["custom_id"]
        if not isinstance(custom_id, str) or not custom_id:
            self._error(
                "invalid_request", line, "custom_id", "The 'custom_id' must be a non-empty string."
            )
            return
        self._ids.add(hash(custom_id), line)
        if obj["method"] != "POST":
            self._error(
                "invalid_method",
                line,
                "method",
                f"Invalid method {obj['method']!r}: only 'POST' is supported.",
            )
            return
        if obj["url"] != self.endpoint:
            self._error(
                "invalid_url",
                line,
                "url",
                f"The URL provided for this request ({obj['url']!r}) does not match the batch "
                f"endpoint ({self.endpoint!r}).",
            )
            return
        body = obj["body"]
        if not isinstance(body, dict):
            self._error("invalid_request", line, "body", "The 'body' must be a JSON object.")
            return
        if self._per_line:
            return self._model_of_messages_line(body)
        required, label = ENDPOINTS[self.endpoint]
        if body.get("stream"):
            self._error(
                "streaming_unsupported",
                line,
                "body.stream",
                f"{label}: Streaming is not supported in the Batch API.",
            )
            return
        model = body.get("model")
        if not model:
            self._error("invalid_request", line, "body.model", "Model parameter is required.")
            return
        if not isinstance(model, str):
            self._error("invalid_request", line, "body.model", "Model parameter must be a string.")
            return
        endpoints = _memo(self._endpoints_cache, self._endpoints_of, model)
        if endpoints is None:
            served = f" Models served here: {self._served}." if self._served else ""
            self._error(
                "model_not_found",
                line,
                "body.model",
                f"The provided model '{model}' is not supported by the Batch API.{served}",
            )
            return
        if self.endpoint not in endpoints:
            self._error(
                "unsupported_endpoint",
                line,
                "body.model",
                f"The model '{model}' does not serve {self.endpoint} here; it serves "
                f"{', '.join(endpoints)}.",
            )
            return
        if body.get(required) is None:
            self._error(
                "invalid_request",
                line,
                f"body.{required}",
                f"{required.capitalize()} parameter is required.",
            )
            return
        checker = _memo(self._checkers, self._checker_of, model)
        if len(self._serving) < 10_000:
            self._serving[model] = checker  # the model's next lines take the one pass
        problem = checker(body) if checker is not None else None
        if problem is not None:
            code, param, message = problem
            self._error(code, line, f"body.{param}", message)
            return
        return self._valid(model, body)

    def _model_of_messages_line(self, body: dict[str, Any]) -> str | None:
        """A Messages line's model when a route here serves it (None: it fails when it runs)."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return None
        endpoints = _memo(self._endpoints_cache, self._endpoints_of, model)
        if endpoints is None or self.endpoint not in endpoints:
            return None
        return self._valid(model, body)

    def _valid(self, model: str, body: dict[str, Any]) -> str:
        """Count a line that will run on `model`: its model, and its input tokens."""
        if len(self.models) < 16:
            self.models.setdefault(model, None)
        if len(self.input_tokens) < 10_000 or model in self.input_tokens:
            tokens = estimate_prompt_tokens(self.endpoint, body)
            self.input_tokens[model] = self.input_tokens.get(model, 0) + tokens
        return model


def _memo(cache: dict[str, Any], compute: Callable[[str], Any], model: str) -> Any:
    """compute(model), remembered for up to 10,000 models (a file may name any number)."""
    found = cache.get(model, _UNSEEN)
    if found is _UNSEEN:
        found = compute(model)
        if len(cache) < 10_000:
            cache[model] = found
    return found


async def confirm_duplicates(
    chunks: AsyncIterator[bytes], pairs: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """Second pass, run only when hashes repeat: read just the flagged lines and compare ids."""
    wanted = {n for pair in pairs for n in pair}
    ids: dict[int, str] = {}
    buffer = b""
    line_no = 0

    def visit(raw: bytes) -> None:
        nonlocal line_no
        line_no += 1
        if line_no in wanted:
            ids[line_no] = orjson.loads(raw)["custom_id"]

    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            visit(raw)
        await asyncio.sleep(0)  # keep the API and lease renewals responsive
    if buffer:
        visit(buffer)
    return [
        {
            "code": "duplicate_custom_id",
            "line": line,
            "param": "custom_id",
            "message": f"The custom_id '{ids[line]}' is already used on line {earlier}; each must be unique.",
        }
        for line, earlier in pairs
        if ids.get(line) is not None and ids.get(line) == ids.get(earlier)
    ]


async def first_request_url(chunks: AsyncIterator[bytes]) -> str | None:
    """The `url` of the first request line, read no further than that line."""
    buffer = b""
    at_start = True
    async for chunk in chunks:
        buffer += chunk
        if at_start and len(buffer) >= len(UTF8_BOM):
            buffer, at_start = buffer.removeprefix(UTF8_BOM), False
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            if raw.strip():
                return _url_of(raw)
        if len(buffer) > MAX_LINE_BYTES:
            return None
    return _url_of(buffer) if buffer.strip() else None


def _url_of(raw: bytes) -> str | None:
    try:
        url = orjson.loads(raw).get("url")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return url if isinstance(url, str) else None
