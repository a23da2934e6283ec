"""Object ids in the formats the hosted APIs use, so clients that eyeball prefixes are happy."""

from __future__ import annotations

import functools
import hashlib
import random
import secrets
import string
from collections.abc import Callable

_BASE62 = string.digits + string.ascii_letters


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice(_BASE62) for _ in range(24))


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def new_message_batch_id() -> str:
    """A batch created through Anthropic's Message Batches API (the prefix its SDK users know)."""
    return "msgbatch_" + "".join(secrets.choice(_BASE62) for _ in range(24))


def request_line_id(batch_id: str, index: int) -> str:
    """Deterministic per line, so a resumed shard writes the same id it would have written:
    32 hex digits as the hosted API's, 20 from a hash of the batch id and 12 the line's index
    (unique in the batch; no hash per line, on every line's path)."""
    return f"{_line_id_prefix(batch_id)}{index:012x}"


def request_line_ids(batch_id: str) -> Callable[[int], str]:
    """request_line_id(batch_id, index) as a function of the index alone, for a shard that
    names every line of one batch: a string's format method, called without a Python frame."""
    return (_line_id_prefix(batch_id) + "{:012x}").format


@functools.lru_cache(maxsize=1024)
def _line_id_prefix(batch_id: str) -> str:
    return "batch_req_" + hashlib.blake2b(batch_id.encode(), digest_size=10).hexdigest()


def new_request_id() -> str:
    """Request ids only need to be unique, not secret: the fast PRNG is 10x cheaper than urandom."""
    return f"req_{random.getrandbits(128):032x}"


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(16)


def new_delivery_id() -> str:
    """A webhook delivery's id: the `webhook-id` header, the same on every attempt."""
    return "msg_" + secrets.token_hex(16)


def new_worker_id() -> str:
    return "w_" + secrets.token_hex(6)
