"""Find repeated `custom_id`s in a file of millions of lines, in memory that does not grow with it.

Each id is kept as a 64-bit hash and its line number (12 bytes). Up to `memory_entries` of
them stay in RAM; past that they are spilled, split by the hash's top byte, into partition
files in a temporary folder. At the end each partition is loaded and sorted on its own, so
the peak is one partition (about 1/256 of the file's entries), not the whole file. A repeated
hash only flags a pair of lines; the caller compares the real ids in a second pass.
"""

from __future__ import annotations

import tempfile
from array import array
from pathlib import Path

import numpy as np

_RECORD = np.dtype([("hash", "<i8"), ("line", "<u4")])  # packed: 12 bytes
_PARTITIONS = 256


class DuplicateFinder:
    def __init__(self, memory_entries: int = 1 << 18, spill_root: str | None = None) -> None:
        self._memory_entries = memory_entries
        self._spill_root = spill_root
        self._spill: tempfile.TemporaryDirectory[str] | None = None
        # Two flat arrays, appended to in C: on every line's path, where a numpy record
        # assignment cost more than the rest of the line's check.
        self._hashes = array("q")
        self._lines = array("I")

    def add(self, value: int, line: int) -> None:
        self._hashes.append(value)
        self._lines.append(line)
        if len(self._lines) == self._memory_entries:
            self._flush()

    def repeats(self, cap: int) -> list[tuple[int, int]]:
        """Up to `cap` (line, earlier line) pairs whose hashes match, lowest lines first."""
        if self._spill is None:
            return _repeats_in(self._records(), cap)
        self._flush()
        best: list[tuple[int, int]] = []
        for path in sorted(Path(self._spill.name).iterdir()):
            found = _repeats_in(np.fromfile(path, dtype=_RECORD), cap)
            if found:
                best = sorted(best + found)[:cap]
        return best

    def close(self) -> None:
        """Remove the spill files; safe to call more than once."""
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def _records(self) -> np.ndarray:
        """The entries held in memory, as records."""
        block = np.empty(len(self._lines), dtype=_RECORD)
        block["hash"] = np.frombuffer(self._hashes, dtype=np.int64) if self._hashes else 0
        block["line"] = np.frombuffer(self._lines, dtype=np.uint32) if self._lines else 0
        return block

    def _flush(self) -> None:
        if not self._lines:
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="lowtide-ids-", dir=self._spill_root)
        block = self._records()
        self._hashes, self._lines = array("q"), array("I")
        part = (block["hash"] >> 56) & 0xFF
        order = np.argsort(part, kind="stable")  # stable: line order survives within a partition
        block, part = block[order], part[order]
        bounds = np.searchsorted(part, np.arange(_PARTITIONS + 1))
        root = Path(self._spill.name)
        for p in range(_PARTITIONS):
            lo, hi = bounds[p], bounds[p + 1]
            if hi > lo:
                with open(root / f"{p:03d}", "ab") as fh:
                    block[lo:hi].tofile(fh)


def _repeats_in(records: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Repeated hashes among records kept in line order: (line, first line with that hash)."""
    if len(records) < 2 or cap <= 0:
        return []
    order = np.argsort(records["hash"], kind="stable")
    hashes, lines = records["hash"][order], records["line"][order]
    starts = np.ones(len(hashes), dtype=bool)
    starts[1:] = hashes[1:] != hashes[:-1]
    repeated = ~starts
    if not repeated.any():
        return []
    first_of_group = lines[np.maximum.accumulate(np.where(starts, np.arange(len(lines)), 0))]
    dup_lines, earlier = lines[repeated], first_of_group[repeated]
    keep = np.argsort(dup_lines, kind="stable")[:cap]
    return list(zip(dup_lines[keep].tolist(), earlier[keep].tolist(), strict=True))
