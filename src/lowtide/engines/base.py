"""The one small interface every engine implements, local or remote."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import msgspec

from lowtide.engines.usage import Tokens
from lowtide.errors import error_envelope
from lowtide.ids import new_request_id


class EngineResponse(msgspec.Struct, gc=False):
    """What an engine answered: an HTTP-like status, the JSON body, and retry hints."""

    status_code: int
    parsed: Any  # the JSON body (`body`)
    request_id: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] | None = None  # rate-limit headers, for admission to learn from
    # The upstream's own bytes for `body` (one line of JSON), written into the result line as
    # they are: an embedding's thousands of floats are not encoded again. None where the body
    # was built here; replacing `body` sets it to None.
    body_json: bytes | None = None
    # The token counts, where the engine read them with the answer (engines/usage.py); None:
    # read them from `body`.
    tokens: Tokens | None = None

    @property
    def body(self) -> Any:
        return self.parsed

    @body.setter
    def body(self, value: Any) -> None:
        """A body replaced (a translation): the upstream's bytes and counts are not its own."""
        self.parsed = value
        self.body_json = None
        self.tokens = None


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str = "invalid_request_error",
) -> EngineResponse:
    """An engine's own error, in the envelope lowtide.errors shapes for the whole API."""
    return EngineResponse(status, error_envelope(message, type, param, code), new_request_id())


class TransientEngineError(Exception):
    """The request may succeed if tried again (timeout, dropped connection, refused)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "request_timeout" | "connection_error"
        self.message = message


class Engine(ABC):
    name: str
    max_concurrency: int

    async def start(self) -> None:
        """Acquire resources (connection pools, models); called once before first use."""

    @abstractmethod
    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        """Run one request. Raise TransientEngineError for failures worth retrying."""

    def for_endpoint(self, endpoint: str) -> Engine:
        """The engine that runs this endpoint's requests: itself, or the engine a wrapper
        would only pass them through to (looked up once per line, not a layer per request)."""
        return self

    def count_input_tokens(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[int] | None:
        """Each request's input tokens exactly as this engine will report them in `usage`, or
        None when it has no tokenizer here (an upstream; the caller then approximates).

        Called off the event loop (estimates run it on a worker thread), so it may block to
        load a tokenizer; it must not need the model's weights.
        """
        return None

    def default_max_output_tokens(self, endpoint: str) -> int | None:
        """The output limit of a request that sets none (per choice); None: unknown here."""
        return None

    async def close(self) -> None:
        """Release resources."""
