"""The async engine facade: what the serving layer sees of the model (vLLM's ``EngineClient``).

:class:`AsyncEngine` owns the tokenizer, the :class:`~exaone_deploy.runtime.scheduler.Scheduler` thread and its
metrics, and offers:

- ``generate(prompts, params) -> Generation``: submits one group of sequences (one per choice of an HTTP request)
  at once, all admitted or none, and returns an async iterator of their events:
  :class:`~exaone_deploy.runtime.scheduler.Delta` (new text and token ids of sequence ``index``),
  :class:`~exaone_deploy.runtime.scheduler.Done` (its :class:`GenerationResult`) and
  :class:`~exaone_deploy.runtime.scheduler.Failed` (its error message); the iterator ends after every sequence
  has sent Done or Failed. Submission errors raise at the call, before any event: ``QueueFull``,
  ``SchedulerClosed``, ``ValueError`` (context length, sampling parameters).
- Cancellation: ``await gen.aclose()`` (or leaving ``async with gen``) cancels what is still running; the
  scheduler frees those slots before its next model call. Closing a finished group is a no-op.
- ``stats()`` (slots, queue, counters, ``alive``), ``max_seq_len``, ``start()`` / ``stop()``.

The thread bridge: the scheduler calls a request's ``emit`` on its own thread; ``emit`` hands the event to the
consumer's event loop with ``loop.call_soon_threadsafe`` (if that loop is gone, the scheduler cancels the
request). The engine knows nothing about HTTP: mapping its errors to status codes is the serving layer's job.

Rejected: ``generate`` as an ``async def`` generator (submission errors would surface only at the first
``__anext__``, after a streamed response had already sent its 200; and an unstarted async generator's
``aclose()`` skips its ``finally``, which would leak the submitted requests); one ``generate`` per choice (a
full queue could admit half of an HTTP request).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..bundle import load_manifest
from ..runtime.generate import open_backend
from ..runtime.sampling import SamplingParams
from ..runtime.scheduler import Delta, Done, Event, Failed, QueueFull, Request, Scheduler, SchedulerClosed
from ..text.tokenizer import Tokenizer
from .metrics import Metrics

__all__ = ["AsyncEngine", "Delta", "Done", "Event", "Failed", "Generation", "QueueFull", "SchedulerClosed"]

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class Generation:
    """The events of one submitted group of sequences (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, requests: list[Request], queue: asyncio.Queue):
        self._scheduler = scheduler
        self.requests = requests
        self._queue = queue
        self._open = len(requests)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if not self._open:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, (Done, Failed)):
            self._open -= 1
        return event

    def cancel(self) -> None:
        """Cancel every sequence still running or waiting (idempotent)."""
        for req in self.requests:
            self._scheduler.cancel(req)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class AsyncEngine:
    """Tokenizer + scheduler thread + metrics, and the served model's name and sampling defaults."""

    def __init__(self, backend, tokenizer: Tokenizer, *, model_name: str, max_queue: int = 256,
                 prefill_chunk: int = 512, defaults: dict[str, Any] | None = None, prefix_cache: bool = True):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = Metrics()
        self.scheduler = Scheduler(backend, tokenizer, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   observer=self.metrics, prefix_cache=prefix_cache)
        self.metrics.bind(self.scheduler.stats, self.scheduler.max_batch)
        self.max_seq_len = self.scheduler.context  # tokens per sequence: prompt + completion
        self.max_batch = self.scheduler.max_batch
        self.vocab_size = int(backend.spec.vocab_size)
        self.defaults = dict(defaults or {})  # sampling defaults from the bundle's generation_config.json
        self.created = int(time.time())

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, max_batch: int = 8, context: int | None = None,
                    max_queue: int = 256, prefill_chunk: int = 512, model_name: str | None = None,
                    device: str = "cpu", verify: bool = True, prefix_cache: bool = True) -> AsyncEngine:
        manifest = load_manifest(bundle_dir, verify=verify)
        backend = open_backend(manifest, device=device, max_batch=max_batch,
                               max_seq_len=manifest.io.default_context(context))
        defaults = {}
        gen_config = Path(manifest.root) / "generation_config.json"
        if gen_config.is_file():
            try:
                cfg = json.loads(gen_config.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{gen_config}: cannot read ({e})") from None
            defaults = {k: cfg[k] for k in SAMPLING_DEFAULTS if isinstance(cfg.get(k), (int, float))}
        return cls(backend, Tokenizer.from_dir(manifest.root), model_name=model_name or Path(manifest.root).name,
                   max_queue=max_queue, prefill_chunk=prefill_chunk, defaults=defaults, prefix_cache=prefix_cache)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    def stats(self) -> dict:
        return self.scheduler.stats()

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Generation:
        """Submit one sequence per (prompt ids, params) pair, all or none; events carry the pair's index. Call
        from the event loop that will consume the events."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        put = queue.put_nowait

        def emit(event: Event) -> None:  # scheduler thread
            loop.call_soon_threadsafe(put, event)

        requests = [Request(p, sp, emit, index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
        self.scheduler.submit(*requests)
        return Generation(self.scheduler, requests, queue)
