"""Local sentence embeddings, batched across requests.

Requests wait in one pool; each batch is the oldest waiting request with those nearest to it in
length (little padding is computed, nothing waits for ever), capped in inputs and in padded
tokens. Batches are encoded on worker threads, several side by side (one per core), and the
encoder releases the GIL, so the event loop keeps serving and gathers the next batches meanwhile.

The encoder is MiniLM on ONNX Runtime (`bert_onnx.py`: the graph built once from the
safetensors weights, with ONNX Runtime's fused transformer kernels); without onnxruntime
installed it falls back to the numpy encoder (`bert.py`), which gives the same vectors slower.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowtide.engines.base import Engine, EngineResponse, error_response
from lowtide.engines.model_files import minilm_folder
from lowtide.engines.params import unhonoured, unsupported_message
from lowtide.ids import new_request_id

log = logging.getLogger("lowtide.embeddings")


# Padded tokens one encoder call holds at most: long texts go fewer to a call. Many long
# sequences at once spill the caches (the attention scores alone grow with length squared):
# mixed 10-250-token texts ran 1.3x faster in calls of 2,048 tokens than of 64 texts.
BATCH_TOKENS = 2048


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future[np.ndarray]
    longest: int = field(init=False)

    def __post_init__(self) -> None:
        self.longest = max(len(seq) for seq in self.ids)


class EmbeddingsEngine(Engine):
    def __init__(
        self,
        name: str,
        max_concurrency: int,
        model_path: str | None,
        batch_size: int = 64,
        cache_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.max_concurrency = max_concurrency
        self._model_path = model_path
        self._batch_size = batch_size
        self._cache_dir = cache_dir  # where the built ONNX graph is kept; None: built in memory
        self._encoder: Any = None
        self._counting: Any = None  # the tokenizer alone, for estimates
        self._counting_lock = threading.Lock()
        self._load_error: str | None = None
        self._load_lock = asyncio.Lock()
        self._pending: list[_Job] = []  # requests waiting for the encoder, oldest first
        self._wake: asyncio.Event | None = None
        self._runners: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        async with self._load_lock:
            if self._encoder is not None or self._load_error is not None:
                return
            try:
                folder = self._folder()
                started = time.monotonic()
                self._encoder = await asyncio.to_thread(
                    load_encoder, folder, self._cache_dir, threads=self._threads_per_call()
                )
                log.info(
                    "loaded embeddings model %s from %s in %.2fs (%s)",
                    self.name,
                    folder,
                    time.monotonic() - started,
                    type(self._encoder).__name__,
                )
            except Exception as exc:  # a broken model fails its lines, not the server
                self._load_error = f"The embeddings model '{self.name}' could not be loaded: {exc}"
                log.error(self._load_error)
                return
            self._wake = asyncio.Event()
            calls = self._parallel_calls() if self._encoder.concurrent else 1
            self._runners = [asyncio.create_task(self._run_batches()) for _ in range(calls)]

    def _parallel_calls(self) -> int:
        """Batches encoded side by side (ONNX Runtime). Threads that split each operator wait for
        each other at every step, and the event loop's share of a core stalls them all; whole
        batches in parallel lose nothing to it (bench/embeddings.py). Half the window stays
        free to gather the next batches while these encode."""
        cores = os.cpu_count() or 1
        return max(1, min(cores, self.max_concurrency // (2 * self._batch_size)))

    def _threads_per_call(self) -> int:
        return max(1, (os.cpu_count() or 1) // self._parallel_calls())

    async def execute(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if endpoint != "/v1/embeddings":
            return error_response(
                400, f"Model '{self.name}' serves /v1/embeddings only, not {endpoint}.", param="url"
            )
        refused = unhonoured("embeddings", endpoint, body)
        if refused is not None:
            message = unsupported_message(self.name, "embeddings", endpoint, refused)
            return error_response(400, message, param=refused, code="unsupported_parameter")
        texts = _texts(body)
        if isinstance(texts, str):
            return error_response(400, texts, param="input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return error_response(
                400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        await self.start()
        if self._load_error:
            raise RuntimeError(self._load_error)
        dims = body.get("dimensions")
        if dims is not None and dims != self._encoder.dim:
            return error_response(
                400,
                f"Model '{self.name}' produces {self._encoder.dim} dimensions only.",
                param="dimensions",
            )
        ids = self._encoder.tokenize(texts)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(ids, future))
        assert self._wake is not None
        self._wake.set()
        vectors = await future
        tokens = _usage_tokens(ids)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(vec.astype("<f4").tobytes()).decode()
                if fmt == "base64"
                else vec,
            }
            for i, vec in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return EngineResponse(
            200,
            {"object": "list", "data": data, "model": body.get("model", self.name), "usage": usage},
            new_request_id(),
        )

    async def _run_batches(self) -> None:
        """Encode what is waiting, a batch at a time: the requests that arrive meanwhile make
        the next batch, so the encoder never waits for the event loop to answer the last one
        (with a route's max_concurrency a few times batch_size). Runs once per parallel call."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                jobs = self._take_batch()
                try:
                    results = await asyncio.to_thread(self._encode_jobs, jobs)
                except Exception as exc:
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                for job, vectors in zip(jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(vectors)

    def _take_batch(self) -> list[_Job]:
        """The waiting requests to encode next: the oldest, with those closest to it in length,
        up to batch_size inputs and BATCH_TOKENS padded tokens. Lengths sorted across everything
        that waits pad far less than arrival order (mixed 10-250-token texts: 81% of the tokens
        computed are real from a pool of 256, 53% in batches of 64 as they come), and the oldest
        always goes, so no request waits behind shorter ones for ever."""
        pending = self._pending
        order = sorted(range(len(pending)), key=lambda i: pending[i].longest)
        sizes = [len(pending[i].ids) for i in order]
        lengths = [pending[i].longest for i in order]
        starts = _groups(sizes, lengths, self._batch_size, BATCH_TOKENS)
        group = bisect.bisect_right(starts, order.index(0)) - 1  # the oldest request's group
        end = starts[group + 1] if group + 1 < len(starts) else len(order)
        chosen = set(order[starts[group] : end])
        self._pending = [job for i, job in enumerate(pending) if i not in chosen]
        return [pending[i] for i in sorted(chosen)]

    def _encode_jobs(self, jobs: list[_Job]) -> list[np.ndarray]:
        """Encode every input of every job, shortest first in calls of similar length, and hand
        each job its rows."""
        flat = [seq for job in jobs for seq in job.ids]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        lengths = [len(flat[i]) for i in order]
        starts = _groups([1] * len(order), lengths, self._batch_size, BATCH_TOKENS)
        out = np.empty((len(flat), self._encoder.dim), dtype=np.float32)
        for start, end in zip(starts, [*starts[1:], len(order)], strict=True):
            chunk = order[start:end]
            out[chunk] = self._encoder.encode_ids([flat[i] for i in chunk])
        results, offset = [], 0
        for job in jobs:
            results.append(out[offset : offset + len(job.ids)])
            offset += len(job.ids)
        return results

    def count_input_tokens(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[int] | None:
        """`usage.prompt_tokens` of each request, from the tokenizer alone (no weights)."""
        if endpoint != "/v1/embeddings":
            return None
        tokenizer = self._encoder.tokenizer if self._encoder is not None else self._tokenizer()
        if tokenizer is None:
            return None
        inputs = [_texts(body) for body in bodies]
        flat = [t for texts in inputs if isinstance(texts, list) for t in texts]
        ids = iter([enc.ids for enc in tokenizer.encode_batch(flat)] if flat else [])
        return [
            _usage_tokens([next(ids) for _ in texts]) if isinstance(texts, list) else 0
            for texts in inputs
        ]

    def default_max_output_tokens(self, endpoint: str) -> int | None:
        return 0

    def _folder(self) -> Path:
        return Path(self._model_path) if self._model_path else minilm_folder()

    def _tokenizer(self) -> Any:
        from lowtide.engines.bert import load_tokenizer

        with self._counting_lock:
            if self._counting is None:
                try:
                    self._counting = load_tokenizer(self._folder())
                except Exception as exc:  # no tokenizer: estimates approximate instead
                    log.warning("%s: cannot load the tokenizer to count tokens: %s", self.name, exc)
                    self._counting = False
            return self._counting or None

    async def close(self) -> None:
        for runner in self._runners:
            runner.cancel()


def load_encoder(folder: Path, cache_dir: Path | None = None, threads: int | None = None) -> Any:
    """The ONNX Runtime encoder; the numpy one where onnxruntime is not installed, or where
    LOWTIDE_EMBEDDINGS_ENCODER=numpy asks for it (benchmarks compare the two)."""
    choice = os.environ.get("LOWTIDE_EMBEDDINGS_ENCODER", "onnx")
    if choice not in ("onnx", "numpy"):
        raise ValueError(f"LOWTIDE_EMBEDDINGS_ENCODER must be 'onnx' or 'numpy', not {choice!r}")
    if choice == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            log.warning("%s: encoding with the numpy encoder instead (several times slower)", exc)
        else:
            from lowtide.engines.bert_onnx import OnnxSentenceEncoder

            return OnnxSentenceEncoder(folder, cache_dir, threads=threads)
    from lowtide.engines.bert import BertSentenceEncoder

    return BertSentenceEncoder(folder)


def _groups(sizes: list[int], lengths: list[int], max_inputs: int, max_tokens: int) -> list[int]:
    """Where each group starts when items sorted by length (`lengths` ascending, `sizes` inputs
    each) are cut in order into groups of at most `max_inputs` inputs and `max_tokens` padded
    tokens (inputs x the longest); an item too big for any group is a group of its own."""
    starts: list[int] = []
    inputs = 0
    for i, (size, length) in enumerate(zip(sizes, lengths, strict=True)):
        if starts and inputs + size <= max_inputs and (inputs + size) * length <= max_tokens:
            inputs += size
        else:
            starts.append(i)
            inputs = size
    return starts


def _texts(body: dict[str, Any]) -> list[str] | str:
    """The inputs of a request, or why the engine refuses it."""
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "'input' must be a non-empty string or a non-empty array of strings."
    if any(not t for t in texts):
        return "'input' cannot contain empty strings."
    return texts


def _usage_tokens(ids: list[list[int]]) -> int:
    return sum(max(len(seq) - 2, 1) for seq in ids)  # without [CLS] and [SEP]
