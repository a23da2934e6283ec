"""The token counts an answer reports: from its parsed body, or straight from its bytes.

One rule for both: `input_tokens` (Responses, Messages) where the usage has it, else
`prompt_tokens` (chat, completions, embeddings); `output_tokens` else `completion_tokens`;
cached and reasoning tokens from the `*_details` objects. A count that is not a positive
integer reads as 0. Reading from bytes decodes only `usage` (msgspec, in C) instead of walking
the parsed dicts in Python, on every answer's path. Anything unusual there (a count of another
type, negative, past 63 bits, both names' details) is left to the parsed body's reading, so
both give the same numbers. The bytes must already have parsed (orjson decides what is JSON):
msgspec's skipping is more lenient (numbers past a double's range, strings' UTF-8).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

Tokens = tuple[int, int, int, int]  # input, output, cached, reasoning
NO_TOKENS: Tokens = (0, 0, 0, 0)


def tokens_of(body: Any) -> Tokens:
    """The counts in a parsed answer (any JSON value: no usage reads as none)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return NO_TOKENS
    get = usage.get
    inp = get("input_tokens", _MISSING)
    if inp is _MISSING:
        inp = get("prompt_tokens")
    out = get("output_tokens", _MISSING)
    if out is _MISSING:
        out = get("completion_tokens")
    cached = reasoning = 0
    details = get("input_tokens_details") or get("prompt_tokens_details")
    if details:
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    details = get("output_tokens_details") or get("completion_tokens_details")
    if details:
        reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    return _count(inp), _count(out), cached, reasoning


_MISSING = object()


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


# A count as the parsed reading takes it: a negative one (read as 0) or one past 64 bits (which
# orjson may read as a float) is not read here, but left to it.
_Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class _Details(msgspec.Struct, gc=False):
    cached_tokens: _Count | None = None
    reasoning_tokens: _Count | None = None


class _Usage(msgspec.Struct, gc=False):
    input_tokens: _Count | None | UnsetType = UNSET
    prompt_tokens: _Count | None = None
    output_tokens: _Count | None | UnsetType = UNSET
    completion_tokens: _Count | None = None
    input_tokens_details: _Details | None = None
    prompt_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None


class _Answer(msgspec.Struct, gc=False):
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def read_tokens(raw: bytes) -> Tokens | None:
    """The counts in a parsed answer's bytes when they are a JSON object whose usage holds only
    what the usual answers hold; None for anything else: tokens_of the parsed body."""
    try:
        usage = _decode_answer(raw).usage
    except (msgspec.DecodeError, RecursionError):  # a count not read here; nested deeper than
        return None  # msgspec follows (Python's recursion limit), less than orjson's 1,023
    if usage is None:
        return NO_TOKENS
    inp = usage.input_tokens
    if inp is UNSET:
        inp = usage.prompt_tokens
    out = usage.output_tokens
    if out is UNSET:
        out = usage.completion_tokens
    if (
        usage.input_tokens_details
        is usage.prompt_tokens_details
        is usage.output_tokens_details
        is usage.completion_tokens_details
        is None
    ):
        return inp or 0, out or 0, 0, 0
    return _with_details(usage, inp or 0, out or 0)


def _with_details(usage: _Usage, inp: int, out: int) -> Tokens | None:
    """The counts of a usage with `*_details` (hosted APIs send them on every answer)."""
    inp_details, prompt_details = usage.input_tokens_details, usage.prompt_tokens_details
    out_details, completion_details = usage.output_tokens_details, usage.completion_tokens_details
    if (inp_details is not None and prompt_details is not None) or (
        out_details is not None and completion_details is not None
    ):
        return None  # both names: which one counts depends on what they hold
    cached = (inp_details or prompt_details or _NO_DETAILS).cached_tokens
    reasoning = (out_details or completion_details or _NO_DETAILS).reasoning_tokens
    return inp, out, cached or 0, reasoning or 0


_NO_DETAILS = _Details()
