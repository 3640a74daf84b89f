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
- ``stats()`` (slots, queue, counters, ``alive``), ``max_seq_len``, ``start()`` / ``stop()``, and ``drain(grace)``
  (SIGTERM: refuse new work at once, end what still runs after ``grace`` seconds).
- ``await encode(text)`` / ``await encode_chat(messages, tools, **kwargs)``: prompt ids, computed in a worker
  thread with a tokenizer call that releases the GIL (``tokenizers.Tokenizer.encode_batch``), so a long prompt
  does not stall the event loop (other streams, ``/health``). A text longer than ``max_prompt_bytes`` raises
  :class:`PromptTooLarge` *before* tokenizing: every token of a tokenizer without a normalizer covers at most
  ``max_token_bytes`` bytes of text (the longest vocabulary entry, computed once), so more than
  ``context * max_token_bytes`` bytes can never fit the context.

Admission: a group fits when it has room among the free cache slots plus the free queue places (the scheduler's
``_room_locked``), else ``QueueFull`` (retry later); a group larger than ``max_batch + max_queue`` sequences could
never fit and raises :class:`TooManySequences` (a ``ValueError``: the client must ask for less).

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
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..bundle import load_manifest
from ..errors import ExaoneDeployError
from ..runtime.backend import ContextLengthError
from ..runtime.generate import open_backend
from ..runtime.sampling import SamplingParams
from ..runtime.scheduler import Delta, Done, Event, Failed, QueueFull, Request, Scheduler, SchedulerClosed
from ..text.tokenizer import Tokenizer
from .metrics import Metrics

log = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "Delta",
    "Done",
    "Event",
    "Failed",
    "Generation",
    "PromptTooLarge",
    "QueueFull",
    "SchedulerClosed",
    "TooManySequences",
    "max_token_bytes",
]


class PromptTooLarge(ContextLengthError):
    """A prompt text with more bytes than ``context`` tokens can cover (refused without tokenizing it)."""


class TooManySequences(ExaoneDeployError, ValueError):
    """A group of more sequences than the server can ever hold at once (``max_batch + max_queue``)."""


class ServerMemoryError(ExaoneDeployError, RuntimeError):
    """The KV cache asked for (``--max-batch`` x ``--context``) does not fit the memory available."""


def max_token_bytes(tokenizer: Tokenizer) -> int | None:
    """The most bytes of input text one token can stand for, or None where no such bound holds (a tokenizer with
    a normalizer may fold several input characters into one). Taken over every id, added tokens included, as the
    larger of the vocabulary entry's UTF-8 length and its decoded text's (a byte-level entry spells each byte as
    one character of up to 2 UTF-8 bytes; a partial UTF-8 sequence decodes to U+FFFD, 3 bytes: both overestimate,
    the safe side for a bound)."""
    backend = tokenizer.backend
    if backend.normalizer is not None:
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        return None
    decoded = backend.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
    return max(
        max(len(t.encode("utf-8", "surrogatepass")) for t in vocab),
        max(len(t.encode("utf-8", "surrogatepass")) for t in decoded),
        1,
    )


def available_memory() -> int | None:
    """Bytes of memory the system can still give (``MemAvailable``, else free pages), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


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

    def __init__(
        self,
        backend,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        defaults: dict[str, Any] | None = None,
        prefix_cache: bool = True,
    ):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            backend,
            tokenizer,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            observer=self.metrics,
            prefix_cache=prefix_cache,
        )
        self.metrics.bind(self.scheduler.stats, self.scheduler.max_batch)
        self.max_seq_len = self.scheduler.context  # tokens per sequence: prompt + completion
        self.max_batch = self.scheduler.max_batch
        self.max_queue = max_queue
        self.max_token_bytes = max_token_bytes(tokenizer)
        #: Prompt texts longer than this (UTF-8 bytes) cannot fit the context and are refused untokenized.
        self.max_prompt_bytes = None if self.max_token_bytes is None else self.max_seq_len * self.max_token_bytes
        self.draining = False
        self._drain_timer: threading.Timer | None = None
        self.vocab_size = int(backend.spec.vocab_size)
        self.defaults = dict(defaults or {})  # sampling defaults from the bundle's generation_config.json
        self.created = int(time.time())

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        *,
        max_batch: int = 8,
        context: int | None = None,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        model_name: str | None = None,
        device: str = "cpu",
        verify: bool = True,
        prefix_cache: bool = True,
    ) -> AsyncEngine:
        manifest = load_manifest(bundle_dir, verify=verify)
        check_memory(manifest, max_batch, manifest.io.default_context(context), device)
        backend = open_backend(
            manifest, device=device, max_batch=max_batch, max_seq_len=manifest.io.default_context(context)
        )
        defaults = {}
        gen_config = Path(manifest.root) / "generation_config.json"
        if gen_config.is_file():
            try:
                cfg = json.loads(gen_config.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{gen_config}: cannot read ({e})") from None
            defaults = {k: cfg[k] for k in SAMPLING_DEFAULTS if isinstance(cfg.get(k), (int, float))}
        return cls(
            backend,
            Tokenizer.from_dir(manifest.root),
            model_name=model_name or Path(manifest.root).name,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            defaults=defaults,
            prefix_cache=prefix_cache,
        )

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        await asyncio.to_thread(self.scheduler.stop)

    def drain(self, grace: float) -> None:
        """Stop admitting (``generate`` raises SchedulerClosed from now on) and, ``grace`` seconds later, end every
        sequence still queued or running with a Failed event ("server shutting down"). Safe to call from a signal
        handler; a second call changes nothing."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: new requests are refused; open ones end within %.1f s", grace)
        self._drain_timer = threading.Timer(grace, self.scheduler.stop)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def stats(self) -> dict:
        return self.scheduler.stats()

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Generation:
        """Submit one sequence per (prompt ids, params) pair, all or none; events carry the pair's index. Call
        from the event loop that will consume the events."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        if self.draining:
            raise SchedulerClosed("the server is shutting down")
        if len(prompts) > self.max_batch + self.max_queue:
            raise TooManySequences(
                f"this request asks for {len(prompts)} sequences (prompts x n) but this server holds at most "
                f"{self.max_batch + self.max_queue} at once ({self.max_batch} running + {self.max_queue} queued)"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        put = queue.put_nowait

        def emit(event: Event) -> None:  # scheduler thread
            loop.call_soon_threadsafe(put, event)

        requests = [Request(p, sp, emit, index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
        self.scheduler.submit(*requests)
        return Generation(self.scheduler, requests, queue)

    # ---- prompts ------------------------------------------------------------------------------
    def check_prompt_bytes(self, text: str) -> None:
        """Raise PromptTooLarge if ``text`` has more UTF-8 bytes than the context's tokens can cover."""
        limit = self.max_prompt_bytes
        if limit is not None and len(text) > limit // 4:  # (a character is at most 4 bytes: cheap test first)
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise PromptTooLarge(
                    f"This model's maximum context length is {self.max_seq_len} tokens. However, your prompt has "
                    f"{size} bytes of text, more than {self.max_seq_len} tokens can hold (at most {limit} bytes)."
                )

    def _encode_now(self, text: str) -> list[int]:
        return self.tokenizer.backend.encode_batch([text], add_special_tokens=False)[0].ids

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (added tokens spelled in it become their ids, as ``Tokenizer.encode``), computed
        in a worker thread that releases the GIL; PromptTooLarge without tokenizing if it cannot fit."""
        self.check_prompt_bytes(text)  # a flood of huge prompts is refused here, without a thread hop
        return await asyncio.to_thread(self._encode_now, text)

    def _encode_chat_now(
        self, messages: list[dict], tools: list[dict] | None, kwargs: dict[str, Any]
    ) -> tuple[list[int], str]:
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
        self.check_prompt_bytes(text)
        return self.tokenizer.apply_chat_template(messages, tools=tools, **kwargs), text

    async def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, **kwargs: Any
    ) -> tuple[list[int], str]:
        """(prompt ids, prompt text) of a chat through the template (control tokens spelled in client text stay
        text: ``Tokenizer.apply_chat_template``), in a worker thread. The rendered text is size-checked before
        it is tokenized (PromptTooLarge); template errors propagate as raised."""
        return await asyncio.to_thread(self._encode_chat_now, messages, tools, kwargs)


def check_memory(manifest, max_batch: int, context: int, device: str) -> None:
    """Refuse (ServerMemoryError) a CPU KV cache larger than the memory available, before allocating it: an
    allocation that large would be killed by the OOM killer, or swap, long after startup printed success."""
    if device != "cpu":
        return
    io = manifest.io
    item = 2 if io.dtype in ("float16", "bfloat16") else 4
    need = manifest.spec.kv_cache_bytes(context, batch=max_batch, bytes_per_elem=item, windowed=io.window_cache)
    have = available_memory()
    log.info(
        "KV cache: %d slots x %d tokens = %.1f MiB (available: %s)",
        max_batch,
        context,
        need / 2**20,
        "unknown" if have is None else f"{have / 2**20:.0f} MiB",
    )
    if have is not None and need > have:
        per_slot = max(1, need // max_batch)
        raise ServerMemoryError(
            f"--max-batch {max_batch} with --context {context} needs {need / 2**30:.1f} GiB of KV cache but only "
            f"{have / 2**30:.1f} GiB of memory is available: use --max-batch {max(1, have // per_slot - 1)} or a "
            f"smaller --context"
        )
