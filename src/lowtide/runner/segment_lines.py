"""The segment blob format: result lines, each tagged for the output file or the error file.

A segment is written once by the shard that ran its lines and read by finalize (into the two
files) and by partial results (while the batch runs); both read it through `decode`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

_OK = b"o"
_ERROR = b"e"


@dataclass(slots=True)
class ResultLine:
    ok: bool  # True: a line of the output file; False: of the error file
    line: bytes  # the JSON line, without its newline


def encode(results: Iterable[ResultLine]) -> bytes:
    return b"".join((_OK if r.ok else _ERROR) + r.line + b"\n" for r in results)


def decode(data: bytes) -> Iterator[ResultLine]:
    for raw in data.split(b"\n"):
        if raw:
            yield ResultLine(raw[:1] == _OK, raw[1:])


async def stream(pieces: AsyncIterator[bytes]) -> AsyncIterator[ResultLine]:
    """`decode` over a blob read piece by piece: a chunk's results may be hundreds of MB."""
    from lowtide.runner.validation import stream_lines

    async for raw in stream_lines(pieces):
        yield ResultLine(raw[:1] == _OK, raw[1:])
