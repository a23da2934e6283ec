"""The one small interface every engine implements, local or remote."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class EngineResponse:
    """What an engine answered: an HTTP-like status, the JSON body, and retry hints."""

    status_code: int
    body: Any
    request_id: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] | None = None  # rate-limit headers, for admission to learn from


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

    async def close(self) -> None:
        """Release resources."""
