"""One streaming pass that sizes a batch before it runs: its lines, input tokens and output
limits, by model.

Pure: it reads chunks and asks two callables, the route of a model and the engine of a route
(for its tokenizer); prices, history and queues are the service's. Memory is one chunk plus a
tally per model (past MAX_MODELS distinct names, further models are tallied under their route's
name). Lines that validation would refuse are counted as invalid and skipped; duplicate
`custom_id`s are not looked for here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from lowtide.admission.estimate import (
    CHARS_PER_TOKEN,
    DEFAULT_COMPLETION,
    estimate_prompt_tokens,
)
from lowtide.config import ModelRoute
from lowtide.runner.validation import MAX_LINE_BYTES
from lowtide.vocabulary import ENDPOINTS, UTF8_BOM

MAX_MODELS = 256


class TokenCounter(Protocol):
    """What an engine offers estimates (engines/base.py)."""

    def count_input_tokens(
        self, endpoint: str, bodies: list[dict[str, Any]]
    ) -> list[int] | None: ...

    def default_max_output_tokens(self, endpoint: str) -> int | None: ...


@dataclass(slots=True)
class ModelTally:
    model: str
    route: ModelRoute
    default_output: int  # per choice, for a line that sets no limit
    counter: TokenCounter | None  # None: approximate (~4 characters a token)
    lines: int = 0
    input_tokens: int = 0
    counted_lines: int = 0  # lines whose input tokens a tokenizer counted
    max_output_tokens: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)  # bodies waiting to be counted


@dataclass(slots=True)
class FileTally:
    lines: int
    invalid_lines: int
    bytes: int
    models: list[ModelTally]


class Estimator:
    """Feed chunks on the event loop (it builds engines through the router, which is not
    thread-safe); run `count_pending` (tokenizers, which may block) on a thread in between."""

    def __init__(
        self,
        endpoint: str,
        route_for: Callable[[str], ModelRoute | None],
        engine_for: Callable[[ModelRoute], TokenCounter],
    ) -> None:
        self.endpoint = endpoint
        self._required = ENDPOINTS[endpoint][0]
        self._route_for = route_for
        self._engine_for = engine_for
        self._tallies: dict[str, ModelTally | None] = {}  # by model; None: not served here
        self._models = 0
        self._buffer = b""
        self._at_start = True
        self._skipping = False  # inside a line longer than MAX_LINE_BYTES
        self.lines = 0
        self.invalid_lines = 0
        self.bytes = 0
        self.pending = 0  # bodies waiting for a tokenizer

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        data = self._buffer + chunk if self._buffer else chunk
        if self._at_start:
            if len(data) < len(UTF8_BOM) and UTF8_BOM.startswith(data):
                self._buffer = data
                return
            self._at_start = False
            data = data.removeprefix(UTF8_BOM)
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if self._skipping and lines:
            self._skipping = False
            lines = lines[1:]  # the rest of the long line
        self._lines(lines)
        if len(self._buffer) > MAX_LINE_BYTES and not self._skipping:
            self.invalid_lines += 1
            self._skipping = True
        if self._skipping:
            self._buffer = b""

    def end(self) -> None:
        """The input is over: its last line may have no newline."""
        if self._buffer and not self._skipping:
            self._lines([self._buffer])
        self._buffer = b""

    def result(self) -> FileTally:
        assert not self.pending, "count_pending() first"
        models = [t for t in self._tallies.values() if t is not None and t.lines]
        return FileTally(self.lines, self.invalid_lines, self.bytes, models)

    def count_pending(self) -> None:
        """Count the bodies fed since the last call with their tokenizers (blocking)."""
        for tally in self._tallies.values():
            if tally is None or not tally.pending:
                continue
            bodies, tally.pending = tally.pending, []
            counts = None
            if tally.counter is not None:
                counts = tally.counter.count_input_tokens(self.endpoint, bodies)
            if counts is None:  # the engine has no tokenizer after all
                tally.counter = None
                tally.input_tokens += sum(estimate_prompt_tokens(self.endpoint, b) for b in bodies)
            else:
                tally.input_tokens += sum(counts)
                tally.counted_lines += len(bodies)
        self.pending = 0

    # -- lines -------------------------------------------------------------------------
    def _lines(self, lines: list[bytes]) -> None:
        """The hot loop: one function, locals only, sums kept locally while the model stays
        the same (this is most of an estimate's time).

        A line counts if validation would take it (runner/validation.py's rules; a test keeps
        the two in step).
        """
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        endpoint, required, tallies = self.endpoint, self._required, self._tallies
        chat = endpoint == "/v1/chat/completions"
        invalid = pending = 0
        tally: ModelTally | None = None
        model_of_tally, default_output, counting = None, 0, False
        lines_sum = output_sum = input_sum = 0  # of `tally`, not yet added to it
        for raw in lines:
            try:
                obj = loads(raw)
            except decode_error:
                if raw and not raw.isspace():  # blank lines are skipped, not refused
                    invalid += 1
                continue
            if type(obj) is not dict:
                invalid += 1
                continue
            body = obj.get("body")
            if type(body) is not dict:
                invalid += 1
                continue
            model, custom_id = body.get("model"), obj.get("custom_id")
            if (
                type(model) is not str
                or not model
                or type(custom_id) is not str
                or not custom_id
                or obj.get("method") != "POST"
                or obj.get("url") != endpoint
                or body.get("stream")
            ):
                invalid += 1
                continue
            source = body.get(required)
            if model != model_of_tally:
                found = tallies.get(model) or self._tally(model)
                if found is None or source is None:
                    invalid += 1
                    continue
                if tally is not None:
                    self._add(tally, lines_sum, output_sum, input_sum)
                    lines_sum = output_sum = input_sum = 0
                tally, model_of_tally = found, model
                default_output, counting = found.default_output, found.counter is not None
            elif source is None:
                invalid += 1
                continue
            lines_sum += 1
            limit = body.get(
                "max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens"))
            )
            if type(limit) is not int or limit < 0:
                limit = default_output
            n = body.get("n")
            output_sum += limit * n if type(n) is int and n > 1 else limit
            if counting:
                tally.pending.append(body)  # type: ignore[union-attr]
                pending += 1
                continue
            # estimate_prompt_tokens, quicker for the usual shapes (a test checks they agree).
            chars = -1
            if not chat:
                text = body.get("input", body.get("prompt"))
                if type(text) is str:
                    chars = len(text)
            elif type(source) is list:
                chars = 0
                for message in source:
                    # {"role", "content": str}: its characters are its content's.
                    if type(message) is dict and len(message) == 2 and "role" in message:
                        content = message.get("content")
                        if type(content) is str:
                            chars += len(content)
                            continue
                    chars = -1
                    break
            if chars >= 0:
                input_sum += int(chars / CHARS_PER_TOKEN) + 4
            else:
                input_sum += estimate_prompt_tokens(endpoint, body)
        if tally is not None:
            self._add(tally, lines_sum, output_sum, input_sum)
        self.invalid_lines += invalid
        self.pending += pending

    def _add(self, tally: ModelTally, lines: int, output_tokens: int, input_tokens: int) -> None:
        tally.lines += lines
        tally.max_output_tokens += output_tokens
        tally.input_tokens += input_tokens
        self.lines += lines

    def _tally(self, model: str) -> ModelTally | None:
        if model in self._tallies:
            return self._tallies[model]
        route = self._route_for(model)
        if route is None or self.endpoint not in route.served_endpoints():
            if len(self._tallies) < 10_000:
                self._tallies[model] = None
            return None
        key = model if self._models < MAX_MODELS else route.name
        tally = self._tallies.get(key)
        if tally is None:
            engine = self._engine_for(route)
            default = engine.default_max_output_tokens(self.endpoint)
            if default is None:
                default = DEFAULT_COMPLETION.get(self.endpoint, 256)
            tally = self._tallies[key] = ModelTally(key, route, default, engine)
            self._models += 1
        return tally


async def tally_file(
    chunks: AsyncIterator[bytes],
    endpoint: str,
    route_for: Callable[[str], ModelRoute | None],
    engine_for: Callable[[ModelRoute], TokenCounter],
) -> FileTally:
    """The whole pass: parse on the loop (like validation), count tokens on a thread."""
    estimator = Estimator(endpoint, route_for, engine_for)
    async for chunk in chunks:
        estimator.feed(chunk)
        if estimator.pending:
            await asyncio.to_thread(estimator.count_pending)
        else:
            await asyncio.sleep(0)  # let the API answer between chunks
    estimator.end()
    await asyncio.to_thread(estimator.count_pending)
    return estimator.result()
