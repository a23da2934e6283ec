"""The segment blob format: result lines, each tagged for the output file or the error file.

A segment is written once by the shard that ran its lines and read by finalize (into the two
files) and by partial results (while the batch runs); both read it through `decode`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

import msgspec

_OK = b"o"
_ERROR = b"e"


class ResultLine(msgspec.Struct, gc=False):
    ok: bool  # True: a line of the output file; False: of the error file
    line: bytes  # the JSON line, without its newline


def encode(results: Iterable[ResultLine]) -> bytes:
    # Each line copied once, into the segment: `tag + line + newline` would copy it twice more
    # (an embedding's answer is ~30 KB, a segment's thousand of them ~40 ms of CPU that way).
    parts: list[bytes] = []
    add = parts.extend
    for r in results:
        add((_OK if r.ok else _ERROR, r.line, b"\n"))
    return b"".join(parts)


def decode(data: bytes) -> Iterator[ResultLine]:
    for raw in data.split(b"\n"):
        if raw:
            yield ResultLine(raw[:1] == _OK, raw[1:])


def decode_views(data: bytes) -> Iterator[tuple[bool, memoryview]]:
    """`decode` for whoever only writes the lines on (finalize): each line a view into its
    split piece, not one more copy of it."""
    for raw in data.split(b"\n"):
        if raw:
            yield raw[:1] == _OK, memoryview(raw)[1:]


async def stream(pieces: AsyncIterator[bytes]) -> AsyncIterator[ResultLine]:
    """`decode` over a blob read piece by piece: a chunk's results may be hundreds of MB."""
    from lowtide.runner.validation import stream_lines

    async for raw in stream_lines(pieces):
        yield ResultLine(raw[:1] == _OK, raw[1:])
