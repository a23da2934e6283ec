"""The blob key scheme, in one place: where file bodies and result segments live in the store.

    files/<file id>                                      uploaded and published files
    segments/<batch id>/<shard>-<first line>-<nonce>.jsonl   committed (or orphaned) results
    segments/<batch id>/chunk-<idx>-<nonce>.jsonl        results of an upstream chunk
    segments/<batch id>/chunk-<idx>-<nonce>.lines        the lines a retry chunk sends
    segments/<batch id>/prev-<shard>-<nonce>.jsonl       a rerun shard's previous results

The sweeper reads these back to find what a crash left behind, so parse beside build.
"""

from __future__ import annotations

import uuid

FILES = "files/"
SEGMENTS = "segments/"


def file_key(file_id: str) -> str:
    return FILES + file_id


def file_id_of(key: str) -> str:
    """files/<file id> -> the file id."""
    return key.removeprefix(FILES)


def segment_key(batch_id: str, shard_idx: int, first: int) -> str:
    """A fresh key per write: a retried commit must never overwrite a committed blob."""
    return f"{SEGMENTS}{batch_id}/{shard_idx:07d}-{first:07d}-{uuid.uuid4().hex}.jsonl"


def chunk_result_key(batch_id: str, idx: int) -> str:
    return f"{SEGMENTS}{batch_id}/chunk-{idx:07d}-{uuid.uuid4().hex}.jsonl"


def chunk_lines_key(batch_id: str) -> str:
    """Written before the chunk's index is known (that comes with its commit)."""
    return f"{SEGMENTS}{batch_id}/chunk-next-{uuid.uuid4().hex}.lines"


def previous_results_key(batch_id: str, shard_idx: int) -> str:
    return f"{SEGMENTS}{batch_id}/prev-{shard_idx:07d}-{uuid.uuid4().hex}.jsonl"


def batch_of_segment(key: str) -> str:
    """segments/<batch id>/<name> -> the batch id ("" for a key of another shape)."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and key.startswith(SEGMENTS) else ""
