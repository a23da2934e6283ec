"""Answers checked against the request's schema, on any route.

A route with `validate_schema = true`, or a line whose body sets `"lowtide_validate_schema":
true` (the line's setting wins; Lowtide removes the field before the request goes anywhere),
has each answer checked: the message content must parse as JSON and match the request's
`response_format` schema (`json_schema`; with `json_object`, be a JSON object). An answer that
does not is asked for again, at most min(max_retries, 2) times, and then written to the error
file with code `schema_violation` and the reason, the answer beside it.

Also here: the per-line check that validation runs for a line's route (parameters the engine
does not honour, options it refuses, a schema to check against that is not a JSON Schema).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from lowtide.config import ModelRoute
from lowtide.engines.base import EngineResponse
from lowtide.engines.params import Problem, forwards_everything, request_problem
from lowtide.engines.structured import (
    ResponseFormat,
    ResponseFormatError,
    check_json_schema,
    parse_response_format,
    schema_validator,
)
from lowtide.runner.results import response_line
from lowtide.runner.segment_lines import ResultLine

EXTENSION = "lowtide_validate_schema"
MAX_SCHEMA_RETRIES = 2
CODE = "schema_violation"


def split_extension(body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The body as engines get it (without Lowtide's extension field), and the field's value."""
    if EXTENSION not in body:
        return body, None
    return {k: v for k, v in body.items() if k != EXTENSION}, body[EXTENSION]


def response_format_of(endpoint: str, body: dict[str, Any]) -> ResponseFormat | None:
    """The format the request asks for: chat's `response_format`, or the Responses API's
    `text.format` (the same fields, not wrapped in `json_schema`)."""
    if endpoint == "/v1/responses":
        text = body.get("text")
        spec = text.get("format") if isinstance(text, dict) else None
        if isinstance(spec, dict) and spec.get("type") == "json_schema":
            inner = {k: v for k, v in spec.items() if k != "type"}
            return parse_response_format({"type": "json_schema", "json_schema": inner})
        return parse_response_format(spec)
    if endpoint == "/v1/chat/completions":
        return parse_response_format(body.get("response_format"))
    return None


def line_checker(route: ModelRoute, endpoint: str) -> Callable[[dict[str, Any]], Problem | None]:
    """`line_problem` for the route's lines, as validation calls it on each of them. A route
    that forwards every parameter and checks no schema finds nothing in a line that does not
    ask for a check itself: those lines skip the call (most lines, on a route to a server)."""
    check = functools.partial(line_problem, route, endpoint)
    if route.validate_schema or not forwards_everything(route.engine, endpoint):
        return check
    return lambda body: check(body) if EXTENSION in body else None


def line_problem(route: ModelRoute, endpoint: str, body: dict[str, Any]) -> Problem | None:
    """What validation refuses in one line for its route (None: nothing)."""
    body, flag = split_extension(body)
    if flag is not None and not isinstance(flag, bool):
        return Problem("invalid_request", EXTENSION, f"'{EXTENSION}' must be true or false.")
    problem = request_problem(route, endpoint, body)
    if problem is not None:
        return problem
    if not (route.validate_schema if flag is None else flag):
        return None
    try:
        fmt = response_format_of(endpoint, body)
        if fmt is not None:
            check_json_schema(fmt)
    except ResponseFormatError as exc:
        param = "text.format" if endpoint == "/v1/responses" else "response_format"
        return Problem("invalid_request", param, exc.message)
    if fmt is None and flag:
        return Problem(
            "invalid_request",
            EXTENSION,
            f"'{EXTENSION}' needs a response_format of type json_schema or json_object to "
            "check the answer against.",
        )
    return None


@dataclass(frozen=True, slots=True)
class AnswerCheck:
    fmt: ResponseFormat | None
    problem: str | None = None  # the schema itself cannot be checked against
    retries: int = MAX_SCHEMA_RETRIES

    def violation(self, endpoint: str, body: Any) -> str | None:
        """Why the answer does not match (None: it does)."""
        if self.problem is not None or self.fmt is None:
            return self.problem
        texts = _answer_texts(endpoint, body)
        if not texts:
            return "The answer has no message content to check against the schema."
        for where, text in texts:
            if not isinstance(text, str):
                return f"{where} has no text content (a refusal?)."
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                return f"{where} is not valid JSON: {exc}."
            if self.fmt.type == "json_object":
                if not isinstance(value, dict):
                    return f"{where} is JSON but not a JSON object."
                continue
            error = _first_error(schema_validator(self.fmt), value)
            if error is not None:
                return f"{where} does not match the schema: {error}"
        return None


def answer_check(
    route: ModelRoute, endpoint: str, body: dict[str, Any], flag: Any
) -> AnswerCheck | None:
    """How this line's answers are checked (None: they are not)."""
    if not (route.validate_schema if flag is None else flag is True):
        return None
    retries = min(route.max_retries, MAX_SCHEMA_RETRIES)
    try:
        fmt = response_format_of(endpoint, body)
        if fmt is None:
            return None
        check_json_schema(fmt)
    except ResponseFormatError as exc:  # validation refuses these; a line may still get here
        return AnswerCheck(None, exc.message, 0)
    return AnswerCheck(fmt, None, retries)


def violation_line(
    line_id: str, custom_id: str, response: EngineResponse, reason: str
) -> ResultLine:
    """An error-file line: the answer as the engine gave it, and why it was not accepted."""
    return response_line(line_id, custom_id, response, {"code": CODE, "message": reason})


def _answer_texts(endpoint: str, body: Any) -> list[tuple[str, Any]]:
    if not isinstance(body, dict):
        return []
    if endpoint == "/v1/responses":
        texts = []
        for i, item in enumerate(body.get("output") or []):
            if isinstance(item, dict) and item.get("type") == "message":
                parts = [
                    p.get("text")
                    for p in item.get("content") or []
                    if isinstance(p, dict) and p.get("type") == "output_text"
                ]
                text = "".join(p for p in parts if isinstance(p, str)) if parts else None
                texts.append((f"output[{i}]", text))
        return texts
    texts = []
    for i, choice in enumerate(body.get("choices") or []):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        texts.append((f"choices[{i}].message.content", content))
    return texts


def _first_error(validator: Any, value: Any) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}{f' (at {where})' if where else ''}."
