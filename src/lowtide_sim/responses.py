"""Response bodies and token estimates for each POST /v1 endpoint.

Answers echo the input, so tests can tell which request an answer belongs to. A chat body
with ``sim_content`` (a string) gets exactly that as its message content instead, every time
(to test what a client does with, say, malformed JSON). Anthropic's /v1/messages answers the
same way (``sim_content`` included); an echo that contains one of the body's
``stop_sequences`` is cut before it (``stop_reason`` "stop_sequence").
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from lowtide_sim.config import SimConfig

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DEFAULT_MAX_TOKENS",
    "EMBEDDINGS",
    "MESSAGES",
    "RESPONSES",
    "Endpoint",
    "note_cached",
]

# Completion budget when a request names none (OpenAI's legacy default).
DEFAULT_MAX_TOKENS = 16

# build(body, rid, cfg, n_out): n_out is the exact completion length (engine on) or None.
Builder = Callable[[dict[str, Any], str, SimConfig, int | None], dict[str, Any]]


# ---------------------------------------------------------------- helpers


def _tokens(text: str) -> int:
    """Cheap deterministic token estimate: whitespace-separated words, min 1."""
    return max(1, len(text.split()))


def _text(content: Any) -> str:
    """Flatten OpenAI message content (string or list of parts) to plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet")


def _fit(text: str, n_out: int | None) -> tuple[str, str]:
    """(answer, finish_reason): the echo as-is, or cut / padded to exactly ``n_out`` words."""
    if n_out is None:
        return text, "stop"
    words = text.split()[:n_out]
    if len(words) < n_out:
        words.extend(itertools.islice(itertools.cycle(_FILLER), n_out - len(words)))
    return " ".join(words), "length"


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------- chat


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


def _chat_prompt(body: dict[str, Any]) -> int:
    return max(1, sum(len(_text(m.get("content")).split()) for m in _chat_messages(body)))


def _chat(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    messages = _chat_messages(body)
    user = [m for m in messages if m.get("role") == "user"] or messages
    answer, finish = _fit("echo: " + (_text(user[-1].get("content")) if user else ""), n_out)
    content = body.get("sim_content")
    if isinstance(content, str):  # a test sets the answer's exact content (e.g. broken JSON)
        answer, finish = content, "stop"
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": _usage(_chat_prompt(body), _tokens(answer) if n_out is None else n_out),
        "system_fingerprint": "fp_lowtide_sim",
    }


# ---------------------------------------------------------------- completions


def _completion_prompts(body: dict[str, Any]) -> list[Any]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return prompt
    return [prompt]


def _completion_prompt(body: dict[str, Any]) -> int:
    return sum(_tokens(p) if isinstance(p, str) else 1 for p in _completion_prompts(body))


def _completion(
    body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None
) -> dict[str, Any]:
    prompts = _completion_prompts(body)
    texts = ["echo: " + (p if isinstance(p, str) else orjson.dumps(p).decode()) for p in prompts]
    fitted = [_fit(t, n_out) for t in texts]
    completion = sum(_tokens(t) for t in texts) if n_out is None else n_out * len(texts)
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", cfg.models[0]),
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": finish}
            for i, (t, finish) in enumerate(fitted)
        ],
        "usage": _usage(
            sum(_tokens(t) - 1 for t in texts) or 1,  # minus the "echo:" word
            completion,
        ),
    }


# ---------------------------------------------------------------- embeddings


def _vector(item: Any, dim: int) -> list[float]:
    """Unit vector seeded by a stable hash of the input (same input, same vector)."""
    data = item.encode() if isinstance(item, str) else orjson.dumps(item)
    seed = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    rng = random.Random(seed)
    vec = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _embedding_inputs(body: dict[str, Any]) -> list[Any]:
    raw = body.get("input", "")
    if isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        return [raw]  # a single pre-tokenized input
    if isinstance(raw, list):
        return raw
    return [raw]


def _embedding_tokens(item: Any) -> int:
    if isinstance(item, str):
        return _tokens(item)
    return max(1, len(item)) if isinstance(item, list) else 1


def _embedding_prompt(body: dict[str, Any]) -> int:
    return sum(_embedding_tokens(item) for item in _embedding_inputs(body))


def _embedding(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    inputs = _embedding_inputs(body)
    dim = body.get("dimensions")
    if not isinstance(dim, int) or dim < 1:
        dim = cfg.embedding_dim
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    prompt = 0
    for i, item in enumerate(inputs):
        vec = _vector(item, dim)
        prompt += _tokens(item) if isinstance(item, str) else max(1, len(item))
        embedding: Any = vec
        if as_base64:  # what the openai SDK asks for by default
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", cfg.models[0]),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }


# ---------------------------------------------------------------- responses


def _response_input(body: dict[str, Any]) -> tuple[str, str]:
    """(last user text, everything the model saw) of a /v1/responses body."""
    raw = body.get("input", "")
    if isinstance(raw, list):
        items = [m for m in raw if isinstance(m, dict)]
        user = [m for m in items if m.get("role") == "user"] or items
        last = _text(user[-1].get("content")) if user else ""
        seen = " ".join(_text(m.get("content")) for m in items)
    else:
        last = seen = _text(raw)
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        seen = instructions + " " + seen
    return last, seen


def _response_prompt(body: dict[str, Any]) -> int:
    return _tokens(_response_input(body)[1])


def _response(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    last, seen = _response_input(body)
    answer, _ = _fit("echo: " + last, n_out)
    input_tokens = _tokens(seen)
    output_tokens = _tokens(answer) if n_out is None else n_out
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "model": body.get("model", cfg.models[0]),
        "output": [
            {
                "type": "message",
                "id": f"msg_{rid}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


# ---------------------------------------------------------------- Anthropic messages


def _anthropic_seen(body: dict[str, Any]) -> str:
    """Everything the model saw: the system prompt and every message's text."""
    parts = [_text(body.get("system"))]
    parts += [_text(m.get("content")) for m in _chat_messages(body)]
    return " ".join(p for p in parts if p)


def _message_prompt(body: dict[str, Any]) -> int:
    return _tokens(_anthropic_seen(body))


def _cut_at_stop(answer: str, body: dict[str, Any]) -> tuple[str, str | None]:
    """The answer up to the earliest of the body's ``stop_sequences`` it contains, and which."""
    stops = body.get("stop_sequences")
    if not isinstance(stops, list):
        return answer, None
    found = [(answer.find(s), s) for s in stops if isinstance(s, str) and s and s in answer]
    if not found:
        return answer, None
    at, stop = min(found, key=lambda f: f[0])
    return answer[:at], stop


def _message(body: dict[str, Any], rid: str, cfg: SimConfig, n_out: int | None) -> dict[str, Any]:
    messages = _chat_messages(body)
    user = [m for m in messages if m.get("role") == "user"] or messages
    answer, finish = _fit("echo: " + (_text(user[-1].get("content")) if user else ""), n_out)
    stop_reason = "max_tokens" if finish == "length" else "end_turn"
    answer, stop = _cut_at_stop(answer, body)
    output_tokens = _tokens(answer) if n_out is None else n_out
    if stop is not None:
        stop_reason = "stop_sequence"
        output_tokens = _tokens(answer)
    content = body.get("sim_content")
    if isinstance(content, str):  # a test sets the answer's exact content
        answer, stop_reason, stop, output_tokens = content, "end_turn", None, _tokens(content)
    return {
        "id": f"msg_{rid}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", cfg.models[0]),
        "content": [{"type": "text", "text": answer}],
        "stop_reason": stop_reason,
        "stop_sequence": stop,
        "usage": {
            "input_tokens": _message_prompt(body),
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


# ---------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """One POST /v1 endpoint: body builder, prompt estimate, completion-budget fields."""

    build: Builder
    prompt: Callable[[dict[str, Any]], int]
    out_fields: tuple[str, ...]  # empty: no generation (embeddings)
    sequences: Callable[[dict[str, Any]], int] = lambda body: 1
    anthropic: bool = False  # Anthropic's headers, auth and error envelope (server.py)
    # The prompt's tokens in order, for the prefix cache (prefill.py); None: no prefill.
    prompt_words: Callable[[dict[str, Any]], list[str]] | None = None

    def max_out(self, body: dict[str, Any]) -> int:
        if not self.out_fields:
            return 0
        value = _int_field(body, *self.out_fields)
        return DEFAULT_MAX_TOKENS if value is None else value


CHAT = Endpoint(
    _chat,
    _chat_prompt,
    ("max_completion_tokens", "max_tokens"),
    prompt_words=lambda body: [
        w for m in _chat_messages(body) for w in _text(m.get("content")).split()
    ],
)
COMPLETIONS = Endpoint(
    _completion,
    _completion_prompt,
    ("max_tokens",),
    lambda body: len(_completion_prompts(body)),
    prompt_words=lambda body: _text(_completion_prompts(body)[0]).split(),
)
EMBEDDINGS = Endpoint(_embedding, _embedding_prompt, ())
RESPONSES = Endpoint(
    _response,
    _response_prompt,
    ("max_output_tokens",),
    prompt_words=lambda body: _response_input(body)[1].split(),
)
MESSAGES = Endpoint(
    _message,
    _message_prompt,
    ("max_tokens",),
    anthropic=True,
    prompt_words=lambda body: _anthropic_seen(body).split(),
)


def note_cached(payload: dict[str, Any], cached: int) -> None:
    """Report ``cached`` prompt tokens in an answer's usage, in each API's own field."""
    usage = payload.get("usage")
    if not isinstance(usage, dict) or cached <= 0:
        return
    if "prompt_tokens" in usage:  # chat, completions
        usage["prompt_tokens_details"] = {"cached_tokens": min(cached, usage["prompt_tokens"])}
    elif isinstance(usage.get("input_tokens_details"), dict):  # responses
        usage["input_tokens_details"]["cached_tokens"] = min(cached, usage["input_tokens"])
    elif "cache_read_input_tokens" in usage:  # Anthropic: input_tokens excludes cache reads
        cached = min(cached, usage["input_tokens"])
        usage["cache_read_input_tokens"] = cached
        usage["input_tokens"] -= cached
