"""The order a shard's lines go out in: lines that share a prompt prefix together.

An upstream with a prefix cache (vLLM, SGLang, the embedded engine) skips the prefill of a
prompt prefix it computed recently. A file that mixes several long instructions (an
evaluation set of many tasks, rows sorted by date rather than by prompt) makes a cache of
limited size evict each instruction before its next use; sending the lines of one instruction
one after another keeps it warm. llm-d groups by system-prompt hash; Lowtide groups by the
first ``KEY_BYTES`` bytes of the prompt as it stands in the line, short of the last message,
found without parsing JSON (this runs for every line).

Only the order of sending changes. Groups go out in the order of their first line, lines within
a group in file order, and results are still committed as the shard's in-order prefix — so a
shard holds more finished lines in memory before they commit (at most the shard).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from itertools import islice

__all__ = ["KEY_BYTES", "dispatch_order", "prefix_key"]

# Long enough to tell instructions apart, short enough to stay inside a shared instruction.
KEY_BYTES = 256
# Where a prompt starts in a request body, whichever API: the first of these keys in the line.
_PROMPT_KEYS = (b'"system"', b'"instructions"', b'"messages"', b'"prompt"', b'"input"')
# Any of them, the leftmost found in one scan (at most one can start at a given byte).
_PROMPT_KEY = re.compile(b"|".join(re.escape(key) for key in _PROMPT_KEYS))


def prefix_key(raw: bytes) -> bytes:
    """The first bytes of a line's prompt (from its earliest prompt key on), short of its last
    message when it has several (the system prompt, the examples: not the document), or b""
    when it has none. A quoted key cannot occur inside a JSON string (its quotes would be
    escaped)."""
    body = raw.find(b'"body"')
    found = _PROMPT_KEY.search(raw, body if body > 0 else 0)
    if found is None:
        return b""
    at = found.start()
    end = at + KEY_BYTES
    last = raw.rfind(b'"role"', at)
    if last > at and raw.find(b'"role"', at) < last:  # two messages or more
        end = min(end, last)
    return raw[at:end]


def dispatch_order(lines: Sequence[bytes], start: int, end: int) -> Iterable[int]:
    """Indexes ``start..end`` of ``lines``, grouped by prefix key; file order when no key
    repeats (or all are one)."""
    # Keys by map and the distinct ones by set, in C: most shards keep file order (every key
    # differs, or all are one), and then this is only the keys' cost on every line.
    keys = list(map(prefix_key, islice(lines, start, end)))
    distinct = len(set(keys))
    if distinct <= 1 or distinct == end - start:
        return range(start, end)
    groups: dict[bytes, list[int]] = {}
    for index, key in enumerate(keys, start):
        groups.setdefault(key, []).append(index)
    return [index for group in groups.values() for index in group]
