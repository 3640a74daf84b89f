"""Prefix-cache reuse in the scheduler: a prompt that extends a cached slot's tokens prefills only its suffix.

Every check compares against the same scheduler with ``prefix_cache=False`` (greedy, so the tokens must be
equal), on a global-attention model (1.2b preset) and a hybrid model with window-sized sliding caches (32b
preset: LLLG, window 8), with conversations far past the window.
"""

from __future__ import annotations

import queue
import random
import time
import warnings
from collections import OrderedDict

import numpy as np
import pytest

from exaone_deploy.bundle import load_manifest
from exaone_deploy.runtime.generate import open_backend
from exaone_deploy.runtime.sampling import SamplingParams
from exaone_deploy.runtime.scheduler import Done, Failed, Request, Scheduler
from exaone_deploy.text.tokenizer import Tokenizer

CONTEXT = 2048


@pytest.fixture(scope="module", params=["1.2b", "32b", "1.2b-int4"])
def bundle(request, tiny_dirs, tmp_path_factory):
    """fp32 bundles of both presets, and an int4-rtn one (MatMulNBits: its kernels round by row count)."""
    from exaone_deploy import api
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    preset, _, quant = request.param.partition("-")
    root = tmp_path_factory.mktemp(f"prefix-{request.param}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_bundle(tiny_dirs[preset], root / "bundle", ExportOptions(max_seq_len=CONTEXT), progress=False)
        return api.quantize(out, root / "int4", "int4-rtn") if quant else out


class Sched:
    """A started scheduler over a fresh backend; ``run(prompt)`` serves one request and waits for it."""

    def __init__(self, bundle, *, prefix_cache: bool, max_batch: int = 2, prefill_chunk: int = 64):
        self.backend = open_backend(load_manifest(bundle), max_batch=max_batch, max_seq_len=CONTEXT)
        self.tok = Tokenizer.from_dir(bundle)
        self.s = Scheduler(self.backend, self.tok, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache).start()

    def submit(self, prompt, n: int = 8) -> tuple[Request, queue.Queue]:
        events: queue.Queue = queue.Queue()
        req = Request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), events.put)
        self.s.submit(req)
        return req, events

    @staticmethod
    def wait(req_events, timeout: float = 60.0):
        req, events = req_events
        deadline = time.monotonic() + timeout
        while True:
            e = events.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(e, Failed):
                raise AssertionError(e.message)
            if isinstance(e, Done):
                return e.result.token_ids, req.reused, e.result.timings["ttft_s"]

    def run(self, prompt, n: int = 8):
        return self.wait(self.submit(prompt, n))

    def close(self):
        self.s.stop()
        self.backend.close()


@pytest.fixture
def scheds(bundle):
    made = []

    def make(**kw) -> Sched:
        made.append(Sched(bundle, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 500) for _ in range(n)]


def conversation(s: Sched, system: list[int], turns: int, seed: int, n_new: int = 8):
    """A multi-turn conversation: each prompt is the previous prompt, its whole completion and a new user turn."""
    rng = random.Random(seed)
    prompt, out = list(system), []
    for _ in range(turns):
        prompt = prompt + _words(rng, 12)
        ids, reused, ttft = s.run(prompt, n_new)
        out.append((list(prompt), ids, reused, ttft))
        prompt = prompt + ids
    return out


def test_multi_turn_reuses_the_whole_history(scheds):
    """Turn k prefills only its new user tokens: the cache held turn k-1's prompt and all but the last completion
    token (never fed back), so reuse = previous prompt + completion - 1; tokens equal a run without reuse,
    far past the sliding window (8) of the hybrid model. Two interleaved conversations on two slots."""
    system = _words(random.Random(0), 40)
    on, off = scheds(prefix_cache=True), scheds(prefix_cache=False)
    a_on, b_on = conversation(on, system, 6, seed=1), conversation(on, system, 6, seed=2)
    a_off, b_off = conversation(off, system, 6, seed=1), conversation(off, system, 6, seed=2)
    assert [t[1] for t in a_on + b_on] == [t[1] for t in a_off + b_off]
    assert all(t[2] == 0 for t in a_off + b_off)
    for conv in (a_on, b_on):
        assert conv[0][2] in (0, 40)  # b's first turn may share the system prompt with a's cache (global only)
        for (prev_prompt, prev_ids, _, _), (_, _, reused, _) in zip(conv, conv[1:]):
            assert reused == len(prev_prompt) + len(prev_ids) - 1
    st = on.s.stats()
    assert st["prefix_hits"] >= 10 and st["prefix_lookups"] == 12
    assert st["prefix_tokens_reused"] == sum(t[2] for t in a_on + b_on)
    assert st["prefix_cached_slots"] == 2 and st["slots_used"] == 0 and st["cache_tokens"] == 0


def test_partial_match_and_lru(scheds):
    """One slot: a prompt that shares only part of the cached sequence reuses the common prefix with full-length
    caches, nothing with window-sized ones (they cannot be cut back); a prompt equal to the cached one
    re-prefills its last two tokens; tokens always equal a run without reuse."""
    rng = random.Random(3)
    base = _words(rng, 50)
    prompts = [base, base[:30] + _words(rng, 25), base[:30] + _words(rng, 5), base[:30] + _words(rng, 5)]
    prompts.append(list(prompts[-1]))
    on, off = scheds(prefix_cache=True, max_batch=1), scheds(prefix_cache=False, max_batch=1)
    got = [on.run(p) for p in prompts]
    want = [off.run(p) for p in prompts]
    assert [g[0] for g in got] == [w[0] for w in want]
    windowed = on.backend.windowed
    expect = [0, 30, 30, 30, 33] if not windowed else [0, 0, 0, 0, 0]  # (at least 2 tokens prefilled)
    assert [g[1] for g in got] == expect


def test_lru_eviction_prefers_empty_slots(scheds):
    """Cached slots are given up only when no empty slot is left, least recently used first."""
    rng = random.Random(4)
    s = scheds(prefix_cache=True, max_batch=2)
    a, b, c = _words(rng, 20), _words(rng, 20), _words(rng, 20)
    ids_a = s.run(a)[0]
    s.run(b)
    assert s.s.stats()["prefix_cached_slots"] == 2
    s.run(a + ids_a + [7])  # a extended: a's slot, now the most recently used
    s.run(c)  # evicts b (least recently used)
    assert s.run(b + [5])[1] == 0  # evicts a
    # c's cached sequence (c and 7 completion tokens) is cut back to c: full-length caches only
    assert s.run(c + [5])[1] == (0 if s.backend.windowed else 19)


def test_turn_ten_ttft_stays_flat(scheds):
    """A 10-turn conversation with a long shared system prompt: with reuse, turn 10's time to first token is
    within 1.5x of turn 1's (it prefills ~12 tokens where turn 1 prefilled the system prompt); without reuse
    it grows with the history. Best of three runs per setting (a loaded machine)."""
    system = _words(random.Random(5), 600)

    def ttfts(prefix_cache: bool, seed: int):
        s = scheds(prefix_cache=prefix_cache, max_batch=1, prefill_chunk=2048)
        return [t[3] for t in conversation(s, system, 10, seed=seed, n_new=16)]

    on = np.min([ttfts(True, seed) for seed in range(3)], axis=0)
    off = np.min([ttfts(False, seed) for seed in range(3)], axis=0)
    assert on[9] <= 1.5 * on[0], (on, off)
    assert off[9] > on[9], (on, off)


def test_new_requests_keep_the_decode_span_compact():
    """A decode step computes every row from the lowest to the highest running slot: a request that reuses nothing
    takes the slot adding the fewest rows to that span (a hole first; an empty slot before a cached one at equal
    cost, cached ones least recently used first)."""

    class Backend:
        max_seq_len, max_batch, windowed = 64, 8, False
        lengths = np.zeros(8, np.int64)
        released: list[int] = []

        def release(self, slot):
            self.released.append(slot)

    class Tok:
        eos_ids = [1]

    def request(prompt):
        return Request(prompt, SamplingParams(max_new_tokens=4), lambda e: None)

    s = Scheduler(Backend(), Tok())
    s._running = [request([9, 9, 9]), request([8, 8, 8])]
    s._running[0].slot, s._running[1].slot = 2, 6
    s._free = [4, 7]
    s._cached = OrderedDict([(3, np.array([2, 2, 2])), (5, np.array([3, 3, 3])), (0, np.array([4, 4, 4]))])
    slots = []
    for _ in range(5):
        req = request([7, 7, 7, 7])
        req.slot = s._take_slot_locked(req)
        s._running.append(req)
        slots.append(req.slot)
    # the empty hole 4, the cached holes 3 and 5 (oldest first), then empty 7 (+1 row) before cached 0 (+2 rows)
    assert slots == [4, 3, 5, 7, 0]
    assert s.backend.released == [3, 5, 0]
    # nothing running: the lowest empty slot; a full prefix match wins over everything
    s._running, s._free, s._cached = [], [6, 1], OrderedDict([(2, np.array([5, 5, 5]))])
    assert s._take_slot_locked(request([1, 2, 3])) == 1
    assert s._take_slot_locked(request([5, 5, 5, 8, 8])) == 2
