"""The continuous-batching loop: many requests decoded together in one llama.cpp context.

One context holds `slots` sequences, each with its own KV cells. A decoder thread runs the loop:
every step it puts the next token of every running sequence, plus prompt tokens of newly admitted
ones, into one `llama_decode` call, samples each sequence's next token, and retires finished
sequences so waiting requests can take their slots at once. The event loop only tokenizes,
queues and awaits; the C call releases the GIL.

A sequence may carry a grammar (structured outputs: a llama.cpp grammar sampler of its own).
Its token is drawn as usual and then checked against the grammar alone (microseconds); only a
token the grammar refuses makes the grammar judge more candidates: the best 256 by logit, then
4,096, then the whole vocabulary (~15 ms for SmolLM2's 49,152 tokens). Greedy choice is exact
that way; sampling is exact too (drawing again after a refusal, then from the masked
distribution, is drawing from the masked distribution), up to the candidates left out, whose
probability must be under 0.1% of what the grammar allows among those judged.

Shared prompt prefixes (`prefix_cache`, on by default): a slot keeps its last prompt's KV cells
when its sequence ends, and a new sequence starts from the longest common prefix any slot holds
(its own cells, or a copy of another slot's), so a batch that repeats one long instruction
computes it once per slot at most, and usually once. Waiting requests are admitted best-prefix
first (with a bound on how often one can be passed over), and a request whose prefix a running
sequence is computing right now waits the step or two until it can copy it. See prefixes.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowtide.engines.llamacpp.options import SamplingParams
from lowtide.engines.llamacpp.prefixes import PrefixCache, block_chain
from lowtide.engines.llamacpp.weights import quiet_llama

log = logging.getLogger("lowtide.llamacpp")

_MAX_BATCH_TOKENS = 2048
# Under a grammar: candidates judged after a refusal (then the whole vocabulary), draws tried
# before masking when sampling, and the share of the allowed probability that the candidates
# left out may hold.
_GRAMMAR_CANDIDATES = (256, 4096)
_SAMPLE_TRIES = 4
_TAIL_SHARE = 1e-3
# Waiting requests: how many are looked at for a shared prefix, and how many admissions one
# may be passed over for requests with a longer cached prefix before it goes first.
_SCAN = 128
_MAX_SKIPS = 64

__all__ = ["BatchedDecoder", "Finished", "SamplingParams", "Sequence", "TokenLogprob"]


@dataclass(slots=True)
class TokenLogprob:
    """One generated token with its log probability and the most likely alternatives."""

    piece: bytes
    logprob: float
    top: list[tuple[bytes, float]]


@dataclass(slots=True)
class Finished:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0  # prompt tokens whose KV cells were reused, not computed


@dataclass
class Sequence:
    """One choice being generated; only the decoder thread touches it once submitted."""

    prompt: list[int]
    params: SamplingParams
    future: asyncio.Future[Finished]
    loop: asyncio.AbstractEventLoop
    grammar: Any = None  # a llama_sampler* of this sequence's own; the decoder frees it
    rng: np.random.Generator | None = None
    slot: int = -1
    n_past: int = 0
    pending: list[int] = field(default_factory=list)
    generated: int = 0
    last: int = -1
    text: bytearray = field(default_factory=bytearray)
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, for penalties
    logprobs: list[TokenLogprob] | None = None
    chain: list[int] | None = None  # block keys of the prompt (prefix cache)
    cached: int = 0  # prompt tokens reused from cells already computed
    skipped: int = 0  # admissions that went to later requests while this one waited

    def finish(self, reason: str) -> None:
        text = self.text.decode("utf-8", errors="replace")
        cut = False
        for stop in self.params.stop:
            at = text.find(stop)
            if at >= 0:
                text, reason, cut = text[:at], "stop", True
        logprobs = self.logprobs
        if logprobs is not None and cut:  # the tokens of the text kept
            keep, offset = len(text.encode("utf-8", errors="replace")), 0
            for i, entry in enumerate(logprobs):
                if offset >= keep:
                    logprobs = logprobs[:i]
                    break
                offset += len(entry.piece)
        result = Finished(text, reason, self.generated, logprobs, self.cached)
        self.loop.call_soon_threadsafe(_resolve, self.future, result)

    def fail(self, exc: Exception) -> None:
        self.loop.call_soon_threadsafe(_reject, self.future, exc)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


class BatchedDecoder:
    """The continuous-batching loop over one llama.cpp context, on its own thread."""

    def __init__(
        self,
        model_path: Path,
        *,
        slots: int,
        context_per_slot: int,
        threads: int,
        prefix_cache: bool = True,
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        quiet_llama()
        self._llama = self.llama = llama_cpp  # the bindings (the engine builds grammars with them)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = LlamaModel(path_model=str(model_path), params=model_params, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * context_per_slot
        params.n_batch = _MAX_BATCH_TOKENS
        params.n_ubatch = 512
        params.n_seq_max = slots
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(_MAX_BATCH_TOKENS, 0, 1)
        self.slots = slots
        self.context_per_slot = context_per_slot
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self._pieces: dict[int, bytes] = {}
        # Candidates a grammar judges (token id, logit, p): one buffer, the decoder thread's.
        self._candidates = (llama_cpp.llama_token_data * self.n_vocab)()
        self._candidate_view = np.ctypeslib.as_array(self._candidates)
        self._candidate_array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._candidates, llama_cpp.llama_token_data_p),
            size=0,
            selected=-1,
            sorted=False,
        )
        self._all_tokens = np.arange(self.n_vocab, dtype=np.int32)
        # Copying a slot's cells copies its whole KV stream (context_per_slot cells): worth it
        # when it saves computing at least this many prompt tokens.
        self.prefixes: PrefixCache | None = None
        if prefix_cache and not (
            llama_cpp.llama_model_is_recurrent(self.model.model)
            or llama_cpp.llama_model_is_hybrid(self.model.model)
        ):
            self.prefixes = PrefixCache(slots, min_copy=max(32, context_per_slot // 32))
        self._waiting: list[Sequence] = []
        self._queue: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llamacpp-decoder", daemon=True)
        self._thread.start()

    # -- tokens --------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (cached: the same few thousand tokens recur)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._llama.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._llama.llama_token_to_piece(
                    self.model.vocab, token, buf, len(buf), 0, False
                )
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def is_end(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.model.vocab, token))

    # -- the loop ------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        self._queue.put(seq)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._llama.llama_batch_free(self.batch)
        self._llama.llama_free(self.ctx)

    def _run(self) -> None:
        free = list(range(self.slots))  # a heap: the lowest free slot is taken first
        active: dict[int, Sequence] = {}
        while True:
            if not self._admit(free, active):
                return
            for seq in [s for s in active.values() if s.future.done()]:
                self._release(seq, free, active)  # its caller gave up: free the slot now
            if not active:
                continue
            try:
                rows = self._step(active)
            except Exception as exc:  # fail the sequences in this step, keep serving others
                log.exception("llama_decode failed")
                for seq in list(active.values()):
                    seq.fail(exc)
                    self._release(seq, free, active)
                self._forget_all()  # what the cells hold now is unknown
                continue
            if self.prefixes is not None:
                for seq in active.values():
                    if seq.n_past <= len(seq.prompt):  # still prefilling (or just done)
                        self.prefixes.progress(seq.slot, seq.n_past)
            for seq, index in rows:
                self._advance(seq, index, free, active)

    def _admit(self, free: list[int], active: dict[int, Sequence]) -> bool:
        """Move waiting requests into free slots; block only when nothing is running."""
        waiting = self._waiting
        block = not active and not waiting
        while True:
            try:
                seq = self._queue.get(block=block)
            except queue.Empty:
                break
            block = False
            if seq is None:
                return False
            waiting.append(seq)
        if any(seq.future.done() for seq in waiting):  # callers that gave up (cancel, shutdown)
            for seq in waiting:
                if seq.future.done():
                    self._free_grammar(seq)
            waiting[:] = [seq for seq in waiting if not seq.future.done()]
        while free and waiting:
            pick = self._pick(can_wait=bool(active))
            if pick is None:  # every request waits for a prefix being computed now
                break
            self._place(waiting.pop(pick), free, active)
        return True

    def _pick(self, *, can_wait: bool) -> int | None:
        """Which waiting request goes next: first come, first served without the prefix cache;
        with it, the one with the longest prefix already in some slot's cells, unless the
        oldest has been passed over _MAX_SKIPS times."""
        prefixes, waiting = self.prefixes, self._waiting
        if prefixes is None:
            return 0
        best, best_held = None, -1
        for i, seq in enumerate(waiting[:_SCAN]):
            if seq.chain is None:
                seq.chain = block_chain(seq.prompt)
            if can_wait and prefixes.should_wait(seq.chain):
                continue
            if seq.skipped >= _MAX_SKIPS:
                best = i
                break
            held = prefixes.held(seq.chain)
            if held > best_held:
                best, best_held = i, held
        if best is not None:
            for seq in waiting[:best]:
                seq.skipped += 1
        return best

    def _place(self, seq: Sequence, free: list[int], active: dict[int, Sequence]) -> None:
        """Give the request a free slot, starting from the longest prefix any slot holds."""
        llama, memory, prefixes = self._llama, self.memory, self.prefixes
        if prefixes is None:
            seq.slot = heapq.heappop(free)
            llama.llama_memory_seq_rm(memory, seq.slot, -1, -1)
            seq.pending = list(seq.prompt)
            active[seq.slot] = seq
            return
        if seq.chain is None:
            seq.chain = block_chain(seq.prompt)
        plan = prefixes.plan(seq.prompt, seq.chain, free)
        slot, reuse = plan.slot, plan.reuse
        free.remove(slot)
        heapq.heapify(free)
        if reuse and plan.source != slot:  # the whole stream is copied before the next decode
            llama.llama_memory_seq_cp(memory, plan.source, slot, -1, -1)
        if not reuse or not llama.llama_memory_seq_rm(memory, slot, reuse, -1):
            llama.llama_memory_seq_rm(memory, slot, -1, -1)
            reuse = 0
        prefixes.assign(slot, seq.prompt, seq.chain, reuse)
        seq.slot, seq.n_past, seq.cached = slot, reuse, reuse
        seq.pending = list(seq.prompt[reuse:])
        active[slot] = seq

    def _forget_all(self) -> None:
        for slot in range(self.slots):
            self._llama.llama_memory_seq_rm(self.memory, slot, -1, -1)
            if self.prefixes is not None:
                self.prefixes.forget(slot)

    def _step(self, active: dict[int, Sequence]) -> list[tuple[Sequence, int]]:
        batch = self.batch
        n = 0
        rows: list[tuple[Sequence, int]] = []
        # Rows in slot order, slots lowest-first: the same requests always decode the same way.
        ordered = [active[slot] for slot in sorted(active)]
        for seq in ordered:  # one token for every sequence that is generating
            if not seq.pending:
                self._put(n, seq.last, seq.n_past, seq.slot, True)
                seq.n_past += 1
                rows.append((seq, n))
                n += 1
        budget = _MAX_BATCH_TOKENS - n
        for seq in ordered:  # prompt tokens, in chunks, for sequences still prefilling
            if not seq.pending or budget <= 0:
                continue
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            for j, token in enumerate(chunk):
                last = not seq.pending and j == len(chunk) - 1
                self._put(n, token, seq.n_past, seq.slot, last)
                seq.n_past += 1
                if last:
                    rows.append((seq, n))
                n += 1
            budget -= len(chunk)
        batch.n_tokens = n
        rc = self._llama.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return rows

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot
        batch.logits[i] = logits

    def _advance(
        self, seq: Sequence, index: int, free: list[int], active: dict[int, Sequence]
    ) -> None:
        if seq.future.done():
            self._release(seq, free, active)
            return
        logits = np.ctypeslib.as_array(
            self._llama.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,)
        )
        try:
            token, logprobs = self._choose(seq, logits)
        except Exception as exc:  # fail this sequence, keep serving the others
            log.exception("sampling failed")
            seq.fail(exc)
            self._release(seq, free, active)
            return
        if self.is_end(token):
            seq.finish("stop")
            self._release(seq, free, active)
            return
        seq.generated += 1
        seq.last = token
        piece = self.piece(token)
        seq.text += piece
        if seq.grammar is not None:
            self._llama.llama_sampler_accept(seq.grammar, token)
        if seq.params.frequency_penalty or seq.params.presence_penalty:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        if logprobs is not None:
            self._note_logprobs(seq, token, piece, logprobs)
        if seq.params.stop and _hit_stop(seq):
            seq.finish("stop")
        elif seq.generated >= seq.params.max_tokens or seq.n_past >= self.context_per_slot:
            seq.finish("length")
        else:
            return
        self._release(seq, free, active)

    def _release(self, seq: Sequence, free: list[int], active: dict[int, Sequence]) -> None:
        if active.pop(seq.slot, None) is not None:
            heapq.heappush(free, seq.slot)
            if self.prefixes is not None:
                self.prefixes.release(seq.slot)
        self._free_grammar(seq)

    def _free_grammar(self, seq: Sequence) -> None:
        if seq.grammar is not None:
            self._llama.llama_sampler_free(seq.grammar)
            seq.grammar = None

    # -- choosing a token ------------------------------------------------------------------
    def _choose(self, seq: Sequence, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        """The next token, and the log-probabilities it was drawn from when the request asks
        for logprobs: log-softmax of the logits after logit_bias, penalties and the grammar,
        before temperature (so greedy's choice is always the most likely token)."""
        params = seq.params
        if params.adjusts_logits:
            logits = _adjusted(logits, seq)
        want = params.logprobs is not None
        grammar = seq.grammar
        if grammar is None:
            return _sample(logits, seq), (_log_softmax(logits) if want else None)
        if not want:
            for _ in range(1 if params.temperature <= 0 else _SAMPLE_TRIES):
                token = _sample(logits, seq)
                if self._judge(grammar, np.array([token], dtype=np.int32))[0]:
                    return token, None
        exact_argmax = params.temperature <= 0 and not want
        scale = 1.0 / params.temperature if params.temperature > 1 else 1.0
        masked = self._mask(grammar, logits, exact_argmax, scale)
        return _sample(masked, seq), (_log_softmax(masked) if want else None)

    def _mask(
        self, grammar: Any, logits: np.ndarray, argmax_only: bool, scale: float
    ) -> np.ndarray:
        """The logits with what the grammar refuses at -inf. Only the best candidates are
        judged when that settles it: for a greedy choice, any allowed token among them; else,
        when the candidates left out hold under _TAIL_SHARE of the allowed probability."""
        total = None
        for k in _GRAMMAR_CANDIDATES:
            if k >= self.n_vocab:
                break
            top = np.argpartition(logits, -k)[-k:].astype(np.int32)
            allowed = top[self._judge(grammar, top)]
            if not allowed.size:
                continue
            if not argmax_only:
                z = logits.astype(np.float64) * scale
                peak = z.max()
                if total is None:
                    total = float(np.exp(z - peak).sum())
                tail = total - float(np.exp(z[top] - peak).sum())
                if tail > _TAIL_SHARE * float(np.exp(z[allowed] - peak).sum()):
                    continue
            masked = np.full(self.n_vocab, -np.inf, dtype=np.float32)
            masked[allowed] = logits[allowed]
            return masked
        allowed = self._all_tokens[self._judge(grammar, self._all_tokens)]
        if not allowed.size:
            raise RuntimeError("the grammar allows no token here")
        masked = np.full(self.n_vocab, -np.inf, dtype=np.float32)
        masked[allowed] = logits[allowed]
        return masked

    def _judge(self, grammar: Any, tokens: np.ndarray) -> np.ndarray:
        """Which of these tokens the grammar allows next (a boolean per token)."""
        k = len(tokens)
        view = self._candidate_view
        view["id"][:k] = tokens
        view["logit"][:k] = 0.0
        array = self._candidate_array
        array.size, array.selected, array.sorted = k, -1, False
        self._llama.llama_sampler_apply(grammar, ctypes.byref(array))
        return np.isfinite(view["logit"][:k])

    def _note_logprobs(self, seq: Sequence, token: int, piece: bytes, logprobs: np.ndarray) -> None:
        top: list[tuple[bytes, float]] = []
        k = seq.params.logprobs or 0
        if k:
            best = np.argpartition(-logprobs, k)[:k] if k < len(logprobs) else np.arange(k)
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = [
                (self.piece(int(t)), float(logprobs[t])) for t in best if np.isfinite(logprobs[t])
            ]
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(TokenLogprob(piece, float(logprobs[token]), top))


def _hit_stop(seq: Sequence) -> bool:
    tail = seq.text[-(max(len(s.encode()) for s in seq.params.stop) + 8) :].decode(
        "utf-8", errors="ignore"
    )
    return any(stop in tail for stop in seq.params.stop)


def _adjusted(logits: np.ndarray, seq: Sequence) -> np.ndarray:
    """The logits after logit_bias and the frequency/presence penalties (on a copy)."""
    params = seq.params
    out = logits.copy()
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias, dtype=np.int64, count=len(params.logit_bias))
        out[ids] += np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(ids))
    if seq.counts:
        ids = np.fromiter(seq.counts, dtype=np.int64, count=len(seq.counts))
        counts = np.fromiter(seq.counts.values(), dtype=np.float32, count=len(ids))
        out[ids] -= counts * params.frequency_penalty + params.presence_penalty
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x


def _sample(logits: np.ndarray, seq: Sequence) -> int:
    params = seq.params
    if params.temperature <= 0:
        return int(np.argmax(logits))
    if seq.rng is None:
        seq.rng = np.random.default_rng(params.seed)
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_p < 1.0:
        order = np.argsort(-scaled)
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[seq.rng.choice(keep, p=probs)])
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(seq.rng.choice(len(probs), p=probs))
