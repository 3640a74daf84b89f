"""Continuous batching: one thread owns the backend; requests join and leave the running batch between steps.

Each loop iteration:

1. drops cancelled requests (their slot is free again before the next model call),
2. admits waiting requests into free cache slots (lowest slot first, so the decode batch, which spans rows
   [0, max slot], stays compact),
3. prefills admitted prompts in chunks of ``prefill_chunk`` tokens, at most about one chunk's worth of tokens
   per iteration so that a long prompt does not stall the streams already running; the first chunks of the
   requests prefilled together go through one ``backend.prefill`` call over their slots (so the many short
   prompts of one scoring request, as lm-eval sends them, run as one batch), and a request that scores its
   prompt (``prompt_logprobs``) gets the logits of every position (``all_logits``),
4. runs one batched decode step over every request that has a token to feed.

Sampling (prefill's last position and every decode step) goes through ``generate.sample_batch``: logprobs of
the raw logits, the rows' grammar masks, each row's sampler. A request with ``max_new_tokens=0`` (prompt
scoring) finishes after its prompt, without sampling.

Every request has its own sampler, detokenizer and stop handling (``generate.RowState``), so it gets the same
tokens whatever else shares the batch: a cache row's computation does not depend on the other rows (ONNX
Runtime's GroupQueryAttention reads only its row's cache up to its own ``seqlens_k``, and the projections are
row-wise), and chunk boundaries depend only on the prompt's length.

The scheduler knows nothing about HTTP or asyncio: a request reports through its ``emit`` callable, called on
the scheduler thread with :class:`Delta`, :class:`Done` or :class:`Failed` events (the server forwards them to
an asyncio queue with ``loop.call_soon_threadsafe``).

Prefix cache (``prefix_cache=True``, the default). A request that finishes (or is cancelled) leaves its slot's
cache in place: the slot becomes *cached*, remembering the token ids it holds (the prompt and every completion
token fed back to the model; the last sampled token never is). Admission looks for a cached slot whose
tokens the new prompt starts with, takes it, and prefills only the rest (``backend.extend``): the multi-turn
case, where the previous prompt plus its completion is a prefix of the next turn's prompt. Cached slots are
given up least recently used first, when one adds fewer rows to the decode batch than any empty slot would.
Which slot a prompt gets:

1. a cached slot whose whole sequence is a prefix of the prompt (the longest such), extended in place;
2. else, with full-length caches only and no empty slot left, the cached slot sharing the longest common
   prefix with the prompt, cut back to that prefix (``backend.lengths``: a full-length cache row holds every
   position, and keys past a row's length are never read and are overwritten in place);
3. else the slot that adds the fewest rows to the decode span (a decode step computes every row from the
   lowest to the highest running slot, so a hole in that span costs a row of every step while it lasts): an
   empty slot before a cached one at equal cost, cached ones least recently used first, emptied. With nothing
   running: the lowest empty slot, else the least recently used cached one. (With empty slots always taken
   first, the c=16 level of benchmarks/serve.py, 32 slots, computed 22.5 rows per step for 15 tokens.)

At least the prompt's last ``MIN_PREFILL`` = 2 tokens are always prefilled: the last one's logits are the first
token's, and two rows keep a prefill on the same kernels as a whole prompt's (ONNX Runtime's int4
MatMulNBits takes another path for a single row, which rounds differently and was seen to flip a greedy
token of an int4 1.2B-shaped bundle; fp32 kernels do not care, nor does our QMatMul kernel, which runs
quantized linears where it is available: runtime/kernels). Window-sized caches
(ort bundles of hybrid models: sliding layers keep only the last W keys, evicting on write) can only continue
from their exact end, so with them only rule 1 reuses anything; cutting such a row back would need the
evicted keys. Rejected: recomputing the sliding layers' window for a partial match (a prefill of W tokens
through every layer, since the graph has no sliding-only entry: it saves little over no reuse), and copying
a cached row into an empty slot (no row copy in the backend API; rows are device memory under TensorRT).
With reuse, a cached position's keys come from the earlier request's prefill chunks and decode steps instead
of this prompt's own chunks: the same row-wise arithmetic in differently shaped matrix products, so the
tokens are those of a run without reuse as long as those shapes round alike (they do on ONNX Runtime's CPU
kernels: tested, greedy, on a global and a hybrid window model far past the window), the same assumption
chunked prefill and batching already make.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ExaoneDeployError
from ..text.tokenizer import Tokenizer
from .backend import Backend, ContextLengthError
from .generate import PREFILL_CHUNK, GenerationResult, RowState, sample_batch
from .logprobs import TokenLogprob
from .sampling import SamplingParams

log = logging.getLogger(__name__)

MIN_PREFILL = 2  # prompt tokens a prefix-cache hit still prefills (module docstring)

__all__ = ["Scheduler", "Request", "Delta", "Done", "Failed", "QueueFull", "SchedulerClosed", "SchedulerObserver"]


class QueueFull(ExaoneDeployError, RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class SchedulerClosed(ExaoneDeployError, RuntimeError):
    """The scheduler is stopped (or its thread died); no new requests are accepted."""


@dataclass(frozen=True)
class Delta:
    index: int
    text: str  # may be "" (an unfinished UTF-8 character, text held back for stop strings)
    token_ids: tuple[int, ...]  # the tokens this step added
    logprobs: tuple[TokenLogprob, ...] = ()  # theirs, when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # on a scoring request's first Delta: the prompt's


@dataclass(frozen=True)
class Done:
    index: int
    result: GenerationResult  # token_ids, text, finish_reason ("stop" | "length" | "cancelled"), timings


@dataclass(frozen=True)
class Failed:
    index: int
    message: str


Event = Delta | Done | Failed


class Request:
    """One generation: prompt ids, sampling parameters (``max_new_tokens`` already bounded by the context), and
    a thread-safe ``emit(event)`` callable. ``index`` tells apart the choices of one HTTP request."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        *,
        index: int = 0,
        request_id: str | None = None,
    ):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.emit = emit
        self.index = index
        self.id = request_id or uuid.uuid4().hex
        self.cancelled = False
        self.state = "new"  # new -> waiting -> prefill -> decode -> finished
        self.slot: int | None = None
        self.row: RowState | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.reused = 0  # of which found in the prefix cache
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.finish_reason: str | None = None
        self.t_submit = self.t_admit = self.t_first = self.t_done = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.row.result.token_ids) if self.row else 0

    def __repr__(self) -> str:
        return f"Request({self.id[:8]}, state={self.state}, slot={self.slot}, prompt={len(self.prompt_ids)})"


class SchedulerObserver:
    """Hooks for metrics; called on the scheduler thread. The defaults do nothing."""

    def on_admit(self, req: Request) -> None: ...

    def on_first_token(self, req: Request) -> None: ...

    def on_finish(self, req: Request) -> None: ...

    def on_prefill(self, tokens: int, seconds: float) -> None: ...

    def on_decode(self, batch: int, seconds: float, rows: int) -> None:
        """A decode step of ``batch`` tokens that computed ``rows`` cache rows (the slot span; rows - batch idle)."""

    def on_prefix(self, req: Request) -> None:
        """Admitted with a prefix-cache lookup: ``req.reused`` prompt tokens came from the cache (0: a miss)."""


class Scheduler:
    """Runs requests on a backend's cache slots with continuous batching, in a dedicated thread."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        *,
        eos_ids: Sequence[int] | None = None,
        max_queue: int = 256,
        prefill_chunk: int = PREFILL_CHUNK,
        observer: SchedulerObserver | None = None,
        prefix_cache: bool = True,
    ):
        if max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_queue must be >= 0 and prefill_chunk >= 1, got {max_queue}, {prefill_chunk}")
        self.backend = backend
        self.tokenizer = tokenizer  # RowState reads .tokenizer and .eos_ids from us
        self.eos_ids = list(eos_ids if eos_ids is not None else tokenizer.eos_ids)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.observer = observer or SchedulerObserver()
        self.context = int(backend.max_seq_len)  # tokens per slot: prompt + completion
        self.max_batch = int(backend.max_batch)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admitted: holding a slot (prefill or decode)
        self._free = list(range(self.max_batch))  # a heap: lowest slot first
        self.prefix_cache = prefix_cache
        self._cached: OrderedDict[int, np.ndarray] = OrderedDict()  # slot -> token ids it holds, LRU first
        self.prefix_lookups = self.prefix_hits = self.prefix_tokens_reused = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        # counters (read by /health)
        self.steps = 0
        self.finished = 0
        self.cancelled = 0
        self.failed = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="exaone-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("scheduler thread did not stop within %.0f s", timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none). Raises QueueFull, SchedulerClosed, or ContextLengthError/ValueError
        (a bad request fails here, in the caller's thread, never in the scheduler's)."""
        for req in requests:
            n = len(req.prompt_ids)
            if n == 0:
                raise ValueError("the prompt is empty")
            if n + req.params.max_new_tokens > self.context:
                raise ContextLengthError(
                    f"{n} prompt tokens + {req.params.max_new_tokens} new tokens exceed the "
                    f"context of {self.context} tokens"
                )
            req.row = RowState(self, req.prompt_ids, req.params, req.params.max_new_tokens)  # validates the params
        with self._cond:
            if self._stopping or self.error is not None or self._thread is None:
                raise SchedulerClosed("the scheduler is not running")
            if len(requests) > self._room_locked():
                raise QueueFull(
                    f"no room for {len(requests)} more sequences ({self.max_batch} slots, "
                    f"{len(self._waiting)} of {self.max_queue} queue places taken)"
                )
            now = time.perf_counter()
            for req in requests:
                req.state, req.t_submit = "waiting", now
                self._waiting.append(req)
            self._cond.notify()

    def _room_locked(self) -> int:
        """Sequences that can be submitted now: free cache slots (empty, or holding a finished sequence's prefix
        cache, which is evicted when needed) plus free queue places (waiting requests take the free slots first).
        So ``max_queue=0`` still fills idle slots, and a group fits while slots are free."""
        return len(self._free) + len(self._cached) + self.max_queue - len(self._waiting)

    def cancel(self, req: Request) -> None:
        """Drop a request (client gone): its slot is freed before the next model call."""
        if req.state == "finished":
            return
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            running = list(self._running)
            waiting = len(self._waiting)
            free = len(self._free)
            cached = sum(len(t) for t in self._cached.values())
            cached_slots = len(self._cached)
        return {
            "slots_total": self.max_batch,
            "slots_used": self.max_batch - free - cached_slots,  # held by running requests
            "queue_depth": waiting,
            "queue_max": self.max_queue,
            "running": len(running),
            "decoding": sum(r.state == "decode" for r in running),
            "cache_tokens": int(np.sum(self.backend.lengths)) - cached,  # tokens of running requests in the cache
            "prefix_cached_slots": cached_slots,
            "prefix_cached_tokens": cached,
            "prefix_lookups": self.prefix_lookups,
            "prefix_hits": self.prefix_hits,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "context": self.context,
            "steps": self.steps,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "alive": self.alive,
        }

    # ---- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted, dropped = self._admit_locked()
                for req in dropped:  # cancelled while waiting: no slot to free
                    req.state, req.finish_reason, req.t_done = "finished", "cancelled", time.perf_counter()
                    self.cancelled += 1
                    self.observer.on_finish(req)
                for req in admitted:
                    self.observer.on_admit(req)
                    if self.prefix_cache:
                        self.observer.on_prefix(req)
                self._step()
        except BaseException as e:  # noqa: BLE001 - reported to every request and to /health
            log.exception("scheduler thread crashed")
            self.error = e
        finally:
            with self._cond:
                self._stopping = True
                left = list(self._running) + list(self._waiting)
                self._waiting.clear()
            reason = "server shutting down" if self.error is None else f"scheduler failed: {self.error}"
            for req in left:
                self._fail(req, reason)

    def _admit_locked(self) -> tuple[list[Request], list[Request]]:
        """Move waiting requests into free slots; drop cancelled waiting ones (so a full queue drains at once)."""
        admitted, dropped = [], [r for r in self._waiting if r.cancelled]
        if dropped:
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        while self._waiting and (self._free or self._cached):
            req = self._waiting.popleft()
            req.slot = self._take_slot_locked(req)
            req.state, req.t_admit = "prefill", time.perf_counter()
            self._running.append(req)
            admitted.append(req)
        return admitted, dropped

    def _take_slot_locked(self, req: Request) -> int:
        """A slot for ``req`` by the rules of the module docstring; sets ``req.prefilled = req.reused``."""
        prompt = np.asarray(req.prompt_ids, dtype=np.int64)
        best, best_len, full = None, 0, False
        for slot, held in self._cached.items():
            n = max(0, min(len(held), len(prompt) - MIN_PREFILL))
            common = int(np.argmin(np.append(held[:n] == prompt[:n], False)))  # common prefix length
            is_full = common == len(held)
            if (is_full, common) > (full, best_len) and (is_full or not self.backend.windowed):
                best, best_len, full = slot, common, is_full
        if self.prefix_cache:
            self.prefix_lookups += 1
        if best is not None and best_len and (full or not self._free):
            del self._cached[best]
            self.backend.lengths[best] = best_len  # a no-op for a full match; a cut for a partial one
            req.prefilled = req.reused = best_len
            self.prefix_hits += 1
            self.prefix_tokens_reused += best_len
            return best
        # Keep the decode batch compact: a step computes every row from the lowest to the highest running slot,
        # so take the slot that adds the fewest rows to that span: a hole inside it first (an empty one, else a
        # cached one, least recently used first), else the nearest empty slot, else the nearest cached one.
        held = [r.slot for r in self._running if r.slot is not None]
        lo, hi = (min(held), max(held)) if held else (0, -1)

        def cost(slot: int) -> int:
            return max(0, lo - slot) + max(0, slot - hi) if held else 0

        best_empty = min(((cost(x), x) for x in self._free), default=None)
        best_cached = min(((cost(x), rank, x) for rank, x in enumerate(self._cached)), default=None)
        if best_empty is not None and (best_cached is None or best_empty[0] <= best_cached[0]):
            self._free.remove(best_empty[1])
            heapq.heapify(self._free)
            return best_empty[1]
        slot = best_cached[2]
        del self._cached[slot]
        self.backend.release(slot)
        return slot

    def _step(self) -> None:
        for req in [r for r in self._running if r.cancelled]:
            self._finish(req, "cancelled")

        budget, work = self.prefill_chunk, []
        for req in [r for r in self._running if r.state == "prefill"]:
            if budget <= 0:
                break
            work.append((req, req.prompt_ids[req.prefilled : req.prefilled + self.prefill_chunk]))
            budget -= len(work[-1][1])
        ready = []  # prompts now wholly in the cache, with their last position's logits
        for group, scores in self._prefill_groups(work):
            t = time.perf_counter()
            try:
                if group[0][0].prefilled == 0:
                    out = self.backend.prefill([r.slot for r, _ in group], [c for _, c in group], all_logits=scores)
                else:
                    out = self.backend.extend(group[0][0].slot, group[0][1], all_logits=scores)
                    out = out[None] if scores else out[-1:]
            except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
                log.exception("prefill failed for %r", [r for r, _ in group])
                for req, _ in group:
                    self._fail(req, f"prefill failed: {e}")
                continue
            self.observer.on_prefill(sum(len(c) for _, c in group), time.perf_counter() - t)
            for (req, chunk), logits in zip(group, out):
                if scores:
                    req.row.score_prompt(req.prefilled, logits[: len(chunk)])
                    logits = logits[len(chunk) - 1]
                req.prefilled += len(chunk)
                if req.prefilled == len(req.prompt_ids):
                    ready.append((req, logits))
        for req, _ in ready:
            if req.row.limit == 0:  # scoring only: no token to sample
                self._finish(req, "length")
        ready = [x for x in ready if x[0].row.limit > 0]
        if ready:
            self._sample([r for r, _ in ready], np.stack([x for _, x in ready]))

        batch = sorted((r for r in self._running if r.state == "decode"), key=lambda r: r.slot)
        if batch:
            t = time.perf_counter()
            try:
                logits = self.backend.decode([r.slot for r in batch], [r.next_token for r in batch])
            except Exception as e:  # noqa: BLE001
                log.exception("decode step failed (batch of %d)", len(batch))
                for req in batch:
                    self._fail(req, f"decode failed: {e}")
                return
            self.observer.on_decode(len(batch), time.perf_counter() - t, batch[-1].slot - batch[0].slot + 1)
            self.steps += 1
            self._sample(batch, logits)

    @staticmethod
    def _prefill_groups(work: list[tuple[Request, list[int]]]) -> list[tuple[list[tuple[Request, list[int]]], bool]]:
        """Backend calls for one iteration's prefill chunks: the first chunks of requests that score their prompt
        in one call, those of the others in another (slot order), each later chunk on its own; with whether
        the call returns every position's logits."""
        groups = []
        for scores in (False, True):
            mine = [(r, c) for r, c in work if (r.params.prompt_logprobs is not None) == scores]
            fresh = sorted((x for x in mine if x[0].prefilled == 0), key=lambda x: x[0].slot)
            if fresh:
                groups.append((fresh, scores))
            groups += [([x], scores) for x in mine if x[0].prefilled > 0]
        return groups

    def _sample(self, reqs: list[Request], logits: np.ndarray) -> None:
        """Choose the next token of each request from its row of (B, V) logits; emit, finish or go on."""
        for req, picked in zip(reqs, sample_batch([r.row for r in reqs], logits)):
            row = req.row
            ids = row.result.token_ids
            n = len(ids)
            try:
                if isinstance(picked, Exception):
                    raise picked
                token, lp = picked
                delta = row.accept(token, lp)
            except Exception as e:  # noqa: BLE001 - e.g. non-finite probabilities: this request fails, not the loop
                log.exception("sampling failed for %r", req)
                self._fail(req, f"sampling failed: {e}")
                continue
            if not req.t_first:
                req.t_first = time.perf_counter()
                self.observer.on_first_token(req)
            if delta or len(ids) > n:  # (an end-of-sequence token is not part of the completion)
                lps = tuple(row.result.logprobs[n:]) if row.result.logprobs is not None else ()
                scored = row.result.prompt_logprobs
                self._emit(
                    req,
                    Delta(
                        req.index, delta, tuple(ids[n:]), lps, tuple(scored) if n == 0 and scored is not None else None
                    ),
                )
            if row.done:
                self._finish(req, row.result.finish_reason)
            else:
                req.state, req.next_token = "decode", token

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (its event loop closed): stop work on it
            log.debug("could not deliver an event for %r; cancelling it", req, exc_info=True)
            req.cancelled = True

    def _release(self, req: Request, keep: bool = False) -> None:
        """Give the slot back: emptied, or (``keep``, with the prefix cache on) cached with the tokens it holds."""
        if req.slot is not None:
            held = int(self.backend.lengths[req.slot])
            seq = req.prompt_ids + (req.row.result.token_ids if req.row else [])
            keep = keep and self.prefix_cache and 0 < held <= len(seq)
            if not keep:
                self.backend.release(req.slot)
            with self._cond:
                if req in self._running:
                    self._running.remove(req)
                if keep:
                    self._cached[req.slot] = np.asarray(seq[:held], dtype=np.int64)
                else:
                    heapq.heappush(self._free, req.slot)
            req.slot = None

    def _finish(self, req: Request, reason: str) -> None:
        self._release(req, keep=True)
        req.state, req.finish_reason, req.t_done = "finished", reason, time.perf_counter()
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.finished += 1
        result = req.row.result
        if reason == "cancelled":
            result.finish_reason = "cancelled"
        t_first = req.t_first or req.t_done
        result.timings = {
            "queue_s": req.t_admit - req.t_submit,
            "ttft_s": t_first - req.t_submit,
            "total_s": req.t_done - req.t_submit,
            "decode_tokens_per_s": (len(result.token_ids) - 1) / (req.t_done - t_first)
            if len(result.token_ids) > 1 and req.t_done > t_first
            else 0.0,
        }
        self.observer.on_finish(req)
        if not req.cancelled:
            self._emit(req, Done(req.index, result))

    def _fail(self, req: Request, message: str) -> None:
        try:
            self._release(req)
        except Exception:  # noqa: BLE001
            log.exception("releasing slot %s failed", req.slot)
        req.state, req.finish_reason, req.t_done = "finished", "error", time.perf_counter()
        self.failed += 1
        self.observer.on_finish(req)
        self._emit(req, Failed(req.index, message))
