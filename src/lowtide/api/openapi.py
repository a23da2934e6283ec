"""/openapi.json as the server really behaves, and /docs (api/docs.py) to read it.

FastAPI's generated document is close but not true: it offers 422 responses that the server never
sends (validation errors are 400s, api/responses.py), and it cannot know about bearer auth
(checked by the front door, not a FastAPI dependency) or the server's completion_window range
(configuration). This fixes the document once, when it is first asked for.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI

from lowtide.api.docs import install_docs
from lowtide.config import parse_duration

BEARER = "bearerAuth"
_FASTAPI_422_SCHEMAS = ("HTTPValidationError", "ValidationError")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def install_openapi(app: FastAPI) -> None:
    """Post-process `app.openapi()` and serve /docs offline."""
    install_docs(app)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _tell_the_truth(generate(), app)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _tell_the_truth(doc: dict[str, Any], app: FastAPI) -> None:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in _FASTAPI_422_SCHEMAS:
        schemas.pop(name, None)
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from [auth] api_keys (any key when none is configured).",
    }
    for path, item in doc.get("paths", {}).items():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
            if path.startswith("/v1/"):
                operation["security"] = [{BEARER: []}]
    limits = app.state.runtime.config.batches
    window = schemas.get("CreateBatch", {}).get("properties", {}).get("completion_window")
    if window is not None:
        low = parse_duration(limits.min_completion_window)
        high = parse_duration(limits.max_completion_window)
        window["pattern"] = duration_pattern(low, high)
        window["description"] = (
            f"A duration from {limits.min_completion_window} to {limits.max_completion_window}"
            " (this server's range), e.g. '24h', '90m', '7d'. The pattern spells the whole-number"
            " forms; a decimal such as '1.5h' is accepted too."
        )
    hook = schemas.get("CreateBatch", {}).get("properties", {}).get("webhook_url")
    if hook is not None:
        hosts = app.state.runtime.config.batch_webhooks.allowed_hosts
        hook.clear()
        hook.update(webhook_url_schema(hosts))


def webhook_url_schema(allowed_hosts: list[str]) -> dict[str, Any]:
    """`webhook_url` as this server takes it: null only, with no [batch_webhooks] allowed_hosts;
    otherwise an http(s) URL on one of them (the pattern spells the lower-case form)."""
    if not allowed_hosts:
        return {
            "type": "null",
            "description": "Extension: a URL that also gets this batch's webhook events. This "
            "server accepts none ([batch_webhooks] allowed_hosts is empty).",
        }
    names = []
    for host in allowed_hosts:
        if host.startswith("*."):
            names.append(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*" + host[1:].replace(".", r"\."))
        elif ":" in host:  # an IPv6 address
            names.append(r"\[" + host + r"\]")
        else:
            names.append(host.replace(".", r"\."))
    pattern = rf"^https?://(?:{'|'.join(names)})(?::[0-9]{{1,5}})?(?:[/?#][!-~]*)?$"
    return {
        "anyOf": [{"type": "string", "maxLength": 2048, "pattern": pattern}, {"type": "null"}],
        "description": "Extension: a URL that also gets this batch's webhook events, signed "
        f"with the server's [batch_webhooks] secret. Hosts allowed: {', '.join(allowed_hosts)}.",
    }


def duration_pattern(low: float, high: float) -> str:
    """A regex for the whole-number durations ('90m', '24h', ...) from `low` to `high` seconds."""
    alternatives = []
    for unit, seconds in _UNITS.items():
        numbers = integer_range(max(1, math.ceil(low / seconds)), math.floor(high / seconds))
        if numbers:
            alternatives.append(f"(?:{'|'.join(numbers)}){unit}")
    return f"^(?:{'|'.join(alternatives)})$"


def integer_range(low: int, high: int) -> list[str]:
    """Regex alternatives matching exactly the decimal integers low..high (no leading zeros)."""
    out: list[str] = []
    while low <= high:
        top = min(high, 10 ** len(str(low)) - 1)  # stay within one number of digits
        out += _same_width(str(low), str(top))
        low = top + 1
    return out


def _same_width(a: str, b: str) -> list[str]:
    if a == b:
        return [a]
    head_a, head_b, rest = a[0], b[0], len(a) - 1
    if set(a[1:]) <= {"0"} and set(b[1:]) <= {"9"}:
        # [0-9], not \d: Python's \d (what fuzzers generate from) takes any Unicode digit.
        tail = f"[0-9]{{{rest}}}" if rest > 1 else ("[0-9]" if rest else "")
        return [f"{_digits(head_a, head_b)}{tail}"]
    if head_a == head_b:
        inner = _same_width(a[1:], b[1:])
        return [head_a + (inner[0] if len(inner) == 1 else f"(?:{'|'.join(inner)})")]
    low_part = _same_width(a, head_a + "9" * rest)
    high_part = _same_width(head_b + "0" * rest, b)
    middle = []
    if int(head_b) - int(head_a) > 1:
        middle = _same_width(str(int(head_a) + 1) + "0" * rest, str(int(head_b) - 1) + "9" * rest)
    return low_part + middle + high_part


def _digits(a: str, b: str) -> str:
    return a if a == b else f"[{a}-{b}]"
