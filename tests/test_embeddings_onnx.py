"""MiniLM on ONNX Runtime gives the numpy encoder's vectors (cosine >= 0.999 for every text),
through the engine's own batching, padding and length-sorting; the built graph is cached once."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from lowtide.engines.bert import BertSentenceEncoder
from lowtide.engines.bert_onnx import OnnxSentenceEncoder, prepare_graph
from lowtide.engines.embeddings import EmbeddingsEngine, _groups, _Job, load_encoder
from lowtide.engines.model_files import ModelFileMissing, minilm_folder

try:
    FOLDER = minilm_folder()
except ModelFileMissing as exc:  # `lowtide models install` has not run
    pytest.skip(str(exc), allow_module_level=True)


def _texts() -> list[str]:
    """A few dozen texts of every length: one word to past the 256-token truncation."""
    rng = random.Random(7)
    words = (FOLDER / "vocab.txt").read_text().split()[2000:12000]
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
        "hi",
        "?",
        "Ticket 12: my robot order arrived damaged, please refund.",
        "Über-naïve café owners in São Paulo sell crème brûlée — 5 € each!",
        "def f(x):\n    return {'a': [1, 2, 3]}  # code, too",
        "https://example.com/a/b?c=d&e=f",
        "numbers 3.14159 2.71828 1.41421 and 1,000,000",
        "The quick brown fox jumps over the lazy dog. " * 40,  # truncated at 256 tokens
    ]
    texts += [" ".join(rng.choice(words) for _ in range(n)) for n in range(1, 300, 11)]
    return texts


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], np.ndarray]:
    """The numpy encoder, one text at a time (no padding at all)."""
    texts = _texts()
    encoder = BertSentenceEncoder(FOLDER)
    return texts, np.concatenate([encoder.encode_ids([ids]) for ids in encoder.tokenize(texts)])


def _min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    assert vectors.shape == reference.shape
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    return float((vectors * reference).sum(axis=1).min())


def test_embeddings_through_the_engine_match_the_numpy_encoder(reference, tmp_path):
    texts, expected = reference
    engine = EmbeddingsEngine("all-MiniLM-L6-v2", 64, None, batch_size=8, cache_dir=tmp_path)

    async def run() -> list[dict]:
        # Two requests at once, so the engine pools, sorts by length and pads across them.
        half = len(texts) // 2
        bodies = [{"input": texts[:half]}, {"input": texts[half:], "encoding_format": "float"}]
        responses = await asyncio.gather(
            *(engine.execute("/v1/embeddings", body) for body in bodies)
        )
        await engine.close()
        return [item for r in responses for item in r.body["data"]]

    data = asyncio.run(run())
    assert isinstance(engine._encoder, OnnxSentenceEncoder)
    vectors = np.array([item["embedding"] for item in data], dtype=np.float32)
    assert _min_cosine(vectors, expected) >= 0.999


@pytest.mark.parametrize("q8", [True, False], ids=["q8", "f32"])
def test_embeddings_onnx_graphs_match_the_numpy_encoder(reference, q8):
    texts, expected = reference
    encoder = OnnxSentenceEncoder(FOLDER, q8=q8)
    ids = encoder.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    vectors = np.empty_like(expected)
    for start in range(0, len(order), 16):  # padded batches of mixed lengths
        chunk = order[start : start + 16]
        vectors[chunk] = encoder.encode_ids([ids[i] for i in chunk])
    assert _min_cosine(vectors, expected) >= (0.999 if q8 else 0.99999)
    # The value sentence-transformers documents for this pair.
    assert abs(float(vectors[0] @ vectors[1]) - 0.7553) < 0.002


def test_embeddings_onnx_graph_is_built_once_and_cached(tmp_path):
    first = prepare_graph(FOLDER, tmp_path)
    assert first.parent == tmp_path and first.suffix == ".onnx"
    built = first.stat().st_mtime_ns
    assert prepare_graph(FOLDER, tmp_path) == first
    assert first.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    # q8 named: left out, each encoder would time both graphs and could pick the other one.
    cached = OnnxSentenceEncoder(FOLDER, tmp_path, q8=True)
    in_memory = OnnxSentenceEncoder(FOLDER, q8=True)
    ids = cached.tokenize(["cached or not, the same vector"])
    assert np.array_equal(cached.encode_ids(ids), in_memory.encode_ids(ids))


def test_embeddings_encoder_choice(monkeypatch):
    monkeypatch.setenv("LOWTIDE_EMBEDDINGS_ENCODER", "numpy")
    assert isinstance(load_encoder(FOLDER), BertSentenceEncoder)
    monkeypatch.setenv("LOWTIDE_EMBEDDINGS_ENCODER", "torch")
    with pytest.raises(ValueError):
        load_encoder(FOLDER)


def test_embeddings_onnx_graph_choice_is_timed_once_and_remembered(tmp_path):
    """Without q8 given, the faster graph on this CPU is chosen and the choice kept on disk; a
    later load reads it instead of timing again (here: a choice edited by hand is obeyed)."""
    first = OnnxSentenceEncoder(FOLDER, tmp_path, threads=1)
    (choice,) = tmp_path.glob("choice.*.json")
    recorded = json.loads(choice.read_text())
    assert recorded["q8"] is first.q8
    assert recorded["ms"]["q8"] > 0 and recorded["ms"]["f32"] > 0
    choice.write_text(json.dumps({**recorded, "q8": not first.q8}))
    second = OnnxSentenceEncoder(FOLDER, tmp_path, threads=1)
    assert second.q8 is (not first.q8)
    ids = second.tokenize(["A man is eating food.", "A man is eating a piece of bread."])
    a, b = second.encode_ids(ids)
    assert abs(float(a @ b) - 0.7553) < 0.002


@pytest.mark.parametrize(
    ("cores", "window", "calls", "threads"),
    [(2, 256, 2, 1), (16, 256, 2, 8), (16, 1024, 8, 2), (2, 64, 1, 2), (1, 256, 1, 1)],
)
def test_embeddings_batches_side_by_side_leave_half_the_window_to_gather(
    monkeypatch, cores, window, calls, threads
):
    """Batches encoded at once: at most one per core, and half the route's window stays free
    to gather the next ones; the cores are shared out between them."""
    monkeypatch.setattr("lowtide.engines.embeddings.os.cpu_count", lambda: cores)
    engine = EmbeddingsEngine("all-MiniLM-L6-v2", window, None, batch_size=64)
    assert (engine._parallel_calls(), engine._threads_per_call()) == (calls, threads)


def test_embeddings_groups_respect_inputs_and_padded_tokens():
    # Sorted lengths, one input each: at most 3 inputs and 100 padded tokens a group.
    assert _groups([1] * 6, [5, 10, 20, 30, 40, 200], 3, 100) == [0, 3, 5]
    # A request of many inputs counts them all; one too big for any group stands alone.
    assert _groups([2, 5, 1], [10, 10, 10], 4, 1000) == [0, 1, 2]
    assert _groups([1, 1], [3000, 3000], 64, 2048) == [0, 1]


def test_embeddings_next_batch_is_the_oldest_request_with_its_nearest_lengths():
    engine = EmbeddingsEngine("all-MiniLM-L6-v2", 256, None, batch_size=3)
    lengths = [100, 10, 12, 200, 11, 101, 9]  # arrival order; one input per request
    engine._pending = [_Job([[1] * n], None) for n in lengths]  # type: ignore[arg-type]
    taken = engine._take_batch()
    assert [job.longest for job in taken] == [100, 12, 101]  # in arrival order
    assert [job.longest for job in engine._pending] == [10, 200, 11, 9]
    # Every later batch starts from the oldest that is left: nothing waits for ever.
    while engine._pending:
        oldest = engine._pending[0]
        assert oldest in engine._take_batch()
