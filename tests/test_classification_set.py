"""bench/classification.py's labelled set and answer parsing (no model: the bench runs those)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import classification  # noqa: E402


def test_the_set_is_balanced_labelled_and_unique():
    rows = [json.loads(line) for line in (BENCH / "data" / "classification.jsonl").open()]
    assert len({r["id"] for r in rows}) == len(rows) == 300
    assert len({r["text"] for r in rows}) == 300
    counts = Counter((r["task"], r["label"]) for r in rows)
    assert counts == {
        ("sentiment", "positive"): 100,
        ("sentiment", "negative"): 100,
        ("ticket", "billing"): 25,
        ("ticket", "shipping"): 25,
        ("ticket", "technical"): 25,
        ("ticket", "account"): 25,
    }
    for r in rows:
        assert r["label"] in classification.TASKS[r["task"]]["labels"]


def test_free_text_answers_are_parsed_leniently():
    labels = ["positive", "negative"]
    parse = classification.free_text_label
    assert parse("Positive.", labels) == "positive"
    assert parse("The sentiment of this review is NEGATIVE", labels) == "negative"
    assert parse("negative, not positive", labels) == "negative"  # the first one named
    assert parse("The blender broke after two days.", labels) is None  # a repeated review
    assert parse("nonpositive", labels) is None  # whole words only


def test_schema_answers_and_request_lines():
    labels = classification.TASKS["ticket"]["labels"]
    assert classification.schema_label('{"label": "billing"}', labels) == "billing"
    assert classification.schema_label('{"label": "sales"}', labels) is None
    assert classification.schema_label("billing", labels) is None
    item = {"id": "t1", "text": "My parcel is late."}
    line = classification.request_line("m", "ticket", "json_schema", item)
    schema = line["body"]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["label"]["enum"] == labels
    free = classification.request_line("m", "ticket", "free text", item)
    assert "response_format" not in free["body"] and free["custom_id"] == "t1"
