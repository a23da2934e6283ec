"""A request's options as the embedded chat engine reads them, checked.

One function for both places that need it: validation (runner, before a batch starts: a line
the engine would refuse fails the batch with its line number) and the engine itself (a line
that reaches it anyway gets a per-line 400). It reads no model files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowtide.engines.structured import (
    ResponseFormat,
    ResponseFormatError,
    grammar_for,
    parse_response_format,
)

MAX_N = 16
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs, as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs, as OpenAI allows


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token to report; None: no logprobs

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.frequency_penalty or self.presence_penalty)


@dataclass
class Options:
    sampling: SamplingParams
    n: int = 1
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # GBNF for response_format


class OptionError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def read_options(body: dict[str, Any], chat: bool, context: int) -> Options:
    """The request's options; OptionError(message, param) for one the engine refuses."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = context if chat else 16
    if not _is_int(max_tokens) or max_tokens < 1:
        raise OptionError("'max_tokens' must be a positive integer.", "max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise OptionError("'temperature' must be a number from 0 to 2.", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise OptionError("'top_p' must be a number in (0, 1].", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise OptionError("'seed' must be an integer.", "seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise OptionError("'stop' must be a string or up to 4 non-empty strings.", "stop")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise OptionError(f"'n' must be an integer from 1 to {MAX_N}.", "n")
    penalties = {}
    for name in ("frequency_penalty", "presence_penalty"):
        penalties[name] = _number(body, name, 0.0)
        if not -2 <= penalties[name] <= 2:
            raise OptionError(f"'{name}' must be a number from -2 to 2.", name)
    bias = _logit_bias(body.get("logit_bias"))
    params = SamplingParams(
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        penalties["frequency_penalty"],
        penalties["presence_penalty"],
        bias,
        _logprobs(body, chat),
    )
    options = Options(params, n)
    if chat:
        try:
            options.response_format = parse_response_format(body.get("response_format"))
            if options.response_format is not None:
                options.grammar = grammar_for(options.response_format)
        except ResponseFormatError as exc:
            raise OptionError(exc.message, "response_format") from None
    return options


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:  # completions: logprobs is the number of alternatives, 0-5
        value = body.get("logprobs")
        if value is None:
            return None
        if not _is_int(value) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
            raise OptionError(
                f"'logprobs' must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}.", "logprobs"
            )
        return value
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise OptionError("'logprobs' must be a boolean.", "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise OptionError(
                f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}.", "top_logprobs"
            )
        if not wanted:
            raise OptionError("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    message = "'logit_bias' must map token ids (as strings) to numbers from -100 to 100."
    if not isinstance(value, dict) or len(value) > 1024:
        raise OptionError(message, "logit_bias")
    bias = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise OptionError(message, "logit_bias") from None
        if (
            token < 0
            or isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not -100 <= amount <= 100
        ):
            raise OptionError(message, "logit_bias")
        if amount:
            bias[token] = float(amount)
    return bias


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"'{name}' must be a number.", name)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
