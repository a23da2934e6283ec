"""Result lines in the exact shape of the hosted Batch APIs, plus the usage they carry."""

from __future__ import annotations

from typing import Any

import orjson
from orjson import Fragment

from lowtide.engines.base import EngineResponse
from lowtide.engines.usage import tokens_of
from lowtide.ids import new_request_id
from lowtide.runner.segment_lines import ResultLine
from lowtide.store.rows import Usage

CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def usage_of(body: Any) -> Usage:
    """Read usage from chat/completions/embeddings (`prompt_tokens`) or responses (`input_tokens`)."""
    return Usage(*tokens_of(body))


def response_line(
    line_id: str, custom_id: str, response: EngineResponse, error: dict[str, str] | None = None
) -> ResultLine:
    """A line for the output file (2xx) or the error file (any other status, or an `error` the
    caller found in a 2xx answer).

    For an HTTP error we fill both `response` (as the engine answered, the hosted API's shape)
    and `error` (code and message), because some clients read only one of the two.
    """
    ok = error is None and 200 <= response.status_code < 300
    if ok and response.body_json is not None:
        # The usual line, on every answer's path: the upstream's bytes dropped into the line's
        # shape as they are (no dicts built and walked; the same bytes the general path gives).
        return ResultLine(
            True,
            _ANSWERED
            % (
                line_id.encode(),
                orjson.dumps(custom_id),
                response.status_code,
                orjson.dumps(response.request_id or new_request_id()),
                response.body_json,
            ),
        )
    if error is None and not ok:
        error = _error_from_body(response.status_code, response.body)
    line = {
        "id": line_id,
        "custom_id": custom_id,
        "response": {
            "status_code": response.status_code,
            "request_id": response.request_id or new_request_id(),
            # The upstream's bytes where there are some (they parsed): not encoded again.
            "body": response.body if response.body_json is None else Fragment(response.body_json),
        },
        "error": error,
    }
    return ResultLine(ok, orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY))


# `id` is always ours (ASCII, nothing to escape); `custom_id` and `request_id` are encoded.
_ANSWERED = (
    b'{"id":"%s","custom_id":%s,"response":{"status_code":%d,"request_id":%s,"body":%s},'
    b'"error":null}'
)


def error_line(line_id: str, custom_id: str, code: str, message: str) -> ResultLine:
    line = {
        "id": line_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return ResultLine(False, orjson.dumps(line))


def _error_from_body(status: int, body: Any) -> dict[str, str]:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or f"http_{status}"
        message = err.get("message") or f"The request failed with HTTP {status}."
        return {"code": str(code), "message": str(message)}
    if isinstance(err, str):
        return {"code": f"http_{status}", "message": err}
    return {"code": f"http_{status}", "message": f"The request failed with HTTP {status}."}
