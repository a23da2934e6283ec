"""Every request parameter is honoured or refused: what each engine acts on, per endpoint.

`HONOURED` is the one table (docs/engines.md explains each entry). A body parameter that is not
in its engine's set for the endpoint is refused: at validation when the line's model is known
then (`unsupported_parameter`, param `body.<name>`, with its line number), and by the engine
itself, as a per-line 400, for a line that reaches it anyway. A parameter set to its neutral
value (null, false, `n: 1`, `response_format: {"type": "text"}`, an empty list or object) is
not "set", so it is never refused.

`openai` forwards everything: the upstream decides. `echo` answers with the prompt whatever the
sampling parameters say, so it accepts all of them except those that promise an answer of
another shape (`ECHO_REFUSED`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lowtide.config import ModelRoute
from lowtide.vocabulary import ENDPOINTS

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"

# Accepted by every engine, and none changes the answer: routing, and bookkeeping fields that
# a hosted API keeps for its own purposes (Lowtide's record of a line is its result line).
# `stream: true` is refused earlier by validation (streaming_unsupported).
INERT = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "stream",
    }
)
_SAMPLING = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
    }
)

# Per engine, per endpoint: the parameters it honours (None: every parameter is passed on).
HONOURED: dict[str, dict[str, frozenset[str] | None]] = {
    "openai": {endpoint: None for endpoint in ENDPOINTS},
    "llamacpp": {
        CHAT: INERT
        | _SAMPLING
        | {"messages", "max_completion_tokens", "top_logprobs", "response_format"},
        COMPLETIONS: INERT | _SAMPLING | {"prompt"},
    },
    "embeddings": {EMBEDDINGS: INERT | {"input", "encoding_format", "dimensions"}},
    "echo": {endpoint: None for endpoint in ENDPOINTS},
}

# What echo refuses although it takes any other parameter: each asks for an answer that is
# not the echo (a JSON shape, log probabilities, tool calls, several choices, audio).
ECHO_REFUSED = frozenset(
    {
        "response_format",
        "text",  # /v1/responses: text.format
        "logprobs",
        "top_logprobs",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "n",
        "best_of",
        "echo",
        "suffix",
        "audio",
        "modalities",
        "prediction",
    }
)


class Problem(NamedTuple):
    code: str
    param: str  # the body field, without "body."
    message: str


def honoured(engine: str, endpoint: str) -> frozenset[str] | None:
    """The parameters the engine honours on the endpoint (None: all of them)."""
    return HONOURED.get(engine, {}).get(endpoint)


def is_unset(name: str, value: Any) -> bool:
    """A neutral value: asking for nothing, so never refused."""
    if value is None or value is False or value == [] or value == {}:
        return True
    if name in ("n", "best_of"):
        return value == 1 and not isinstance(value, bool)
    if name == "response_format":
        return value == {"type": "text"}
    if name == "text":  # /v1/responses: only text.format asks for a shape
        return isinstance(value, dict) and value.get("format") in (None, {"type": "text"})
    return False


def forwards_everything(engine: str, endpoint: str) -> bool:
    """The engine refuses no parameter on the endpoint: the upstream decides."""
    return engine != "echo" and honoured(engine, endpoint) is None


def unhonoured(engine: str, endpoint: str, body: dict[str, Any]) -> str | None:
    """The first parameter set in `body` that the engine does not honour (None: none)."""
    allowed = honoured(engine, endpoint)
    if allowed is None:
        if forwards_everything(engine, endpoint):
            return None
        refused = ECHO_REFUSED
        return next((k for k, v in body.items() if k in refused and not is_unset(k, v)), None)
    return next((k for k, v in body.items() if k not in allowed and not is_unset(k, v)), None)


def unsupported_message(route_name: str, engine: str, endpoint: str, name: str) -> str:
    allowed = honoured(engine, endpoint)
    listed = (
        f"; it honours {', '.join(sorted(allowed - INERT))} (and {', '.join(sorted(INERT))}, "
        "which change nothing)"
        if allowed is not None
        else ""
    )
    return (
        f"The model '{route_name}' ({engine} engine) does not support '{name}' on {endpoint}"
        f"{listed}. Remove it, or send the line to a route that supports it."
    )


def request_problem(route: ModelRoute, endpoint: str, body: dict[str, Any]) -> Problem | None:
    """What the route's engine would refuse in this request body, if anything: a parameter it
    does not honour, or (embedded chat engine) an option it cannot take, such as a schema its
    grammar cannot enforce."""
    name = unhonoured(route.engine, endpoint, body)
    if name is not None:
        return Problem(
            "unsupported_parameter",
            name,
            unsupported_message(route.name, route.engine, endpoint, name),
        )
    if route.engine == "llamacpp" and endpoint in (CHAT, COMPLETIONS):
        from lowtide.engines.llamacpp.options import OptionError, read_options

        try:
            read_options(body, endpoint == CHAT, route.context_size)
        except OptionError as exc:
            return Problem("invalid_request", exc.param, exc.message)
    return None
