"""Generation over any :class:`~exaone_deploy.runtime.backend.Backend`: batched, streamed, chat-aware.

A prompt is a string (tokenized) or a sequence of token ids; ``generate`` and ``stream_rows`` take a batch of
them, or one bare string as a batch of one (a string is not taken as a sequence of one-character prompts).

One sampling step, for the offline :class:`Generator` and the serving scheduler alike (:func:`sample_batch`):
the float32 log-softmax of each row's *raw* logits for the rows that return logprobs (what OpenAI reports:
the model's distribution, before temperature, penalties, top-k/p and the grammar), then the rows' grammar
masks in one :func:`~exaone_deploy.runtime.grammar.apply_batch` (rows without a grammar are untouched, so
constrained and free requests share a batch), then each row's sampler; ``RowState.accept`` advances the
row's grammar past the chosen token and ends the row once the grammar allows nothing but EOS.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import BundleError, load_manifest
from ..errors import InputError
from ..text.chat import AssistantOutput, parse_assistant_output
from ..text.detok import IncrementalDecoder
from ..text.tokenizer import Tokenizer
from .backend import Backend, ContextLengthError, backend_class
from .grammar import GrammarConstraint, apply_batch
from .logprobs import TokenLogprob, log_softmax, top_logprobs
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per prefill step: the offline generator's and the server scheduler's default

__all__ = ["Generator", "GenerationResult", "RowState", "open_backend", "sample_batch"]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (eos / stop string) | "length"
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (the first unscored)

    @property
    def usage(self) -> dict[str, int]:
        n, m = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def parsed(self, reasoning_opened: bool = False) -> AssistantOutput:
        return parse_assistant_output(self.text, reasoning_opened=reasoning_opened)


class RowState:
    """Per-request decoding state: sampler, detokenizer, stop handling.

    ``owner`` provides ``.tokenizer`` and ``.eos_ids`` (a Generator, or the serving scheduler).
    """

    def __init__(self, gen, prompt: Sequence[int], params: SamplingParams, limit: int):
        self.params = params
        self.sampler = Sampler(params)
        self.result = GenerationResult(prompt_ids=list(prompt))
        self.detok = IncrementalDecoder(gen.tokenizer)
        self.eos = set() if params.ignore_eos else set(gen.eos_ids) | set(params.stop_token_ids)
        self.limit = limit  # max new tokens, already bounded by the context
        self.text = ""  # decoded so far (full, including held-back tail)
        self.emitted = 0  # chars of text released to the stream
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.done = False
        # per-request grammar state (compiled here, in the submitting thread: a bad grammar fails the submit)
        self.constraint = (
            GrammarConstraint(gen.tokenizer, params.grammar, int(gen.backend.spec.vocab_size))
            if params.grammar
            else None
        )
        if params.logprobs is not None:
            self.result.logprobs = []
        if params.prompt_logprobs is not None:
            self.result.prompt_logprobs = [TokenLogprob(self.result.prompt_ids[0], None)]

    @property
    def seen(self) -> Sequence[int]:
        """What the repetition penalty looks at (nothing when it is off)."""
        r = self.result
        return r.prompt_ids + r.token_ids if self.params.repetition_penalty != 1.0 else ()

    def score_prompt(self, start: int, logits: np.ndarray) -> None:
        """Record the logprobs of prompt tokens ``start + 1 ...`` from (S, V) logits of prompt positions
        ``start ...`` (a prefill chunk's all-position logits; rows past the prompt are ignored)."""
        prompt, k = self.result.prompt_ids, self.params.prompt_logprobs
        targets = prompt[start + 1 : start + 1 + len(logits)]
        if not targets:
            return
        rows = log_softmax(logits[: len(targets)])
        picked = rows[np.arange(len(targets)), targets]
        self.result.prompt_logprobs += [
            TokenLogprob(t, float(v), top_logprobs(row, k) if k else None) for t, v, row in zip(targets, picked, rows)
        ]

    def accept(self, token: int, logprobs: np.ndarray | None = None) -> str:
        """Record a sampled token (``logprobs``: the log-softmax of the raw logits it was drawn from, when the
        request returns logprobs); returns the text that can be released now."""
        r = self.result
        if token in self.eos:
            r.finish_reason, self.done = "stop", True
            return self._release(final=True)
        if self.constraint is not None:
            self.constraint.accept(token)
        r.token_ids.append(token)
        if r.logprobs is not None:
            k = self.params.logprobs
            r.logprobs.append(TokenLogprob(token, float(logprobs[token]), top_logprobs(logprobs, k) if k else None))
        self.text += self.detok.push(token)
        for s in self.params.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                r.finish_reason, self.done = "stop", True
                return self._release(final=True)
        if self.constraint is not None and self.constraint.is_finished():  # only EOS may follow: stop here
            self.text += self.detok.flush()
            r.finish_reason, self.done = "stop", True
            return self._release(final=True)
        if len(r.token_ids) >= self.limit:
            self.text += self.detok.flush()
            r.finish_reason, self.done = "length", True
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        if final:
            self.result.text = self.text
        return delta


def sample_batch(rows: Sequence[RowState], logits: np.ndarray) -> list[tuple[int, np.ndarray | None] | Exception]:
    """Choose the next token of each row from its row of (B, V) raw float32 ``logits`` (masked in place).

    Per row: ``(token, logprobs)`` (the log-softmax of the raw row when the request returns logprobs, else
    None), to pass to ``row.accept``; or the exception that row raised (the other rows go on).

    Rows that take the plain argmax (``SamplingParams.argmax``: greedy, no repetition penalty; the usual serving
    case) get it from one ``argmax`` over the batch, without the sampler's per-row copy of the logits."""
    raw = [log_softmax(x) if row.params.logprobs is not None else None for row, x in zip(rows, logits)]
    failed: dict[int, Exception] = {}
    constraints = [row.constraint for row in rows]
    if any(c is not None for c in constraints):
        try:
            apply_batch(logits, constraints)
        except Exception:  # noqa: BLE001 - find the rows at fault, mask the others
            for b, c in enumerate(constraints):
                try:
                    if c is not None:
                        c.apply(logits[b])
                except Exception as e:  # noqa: BLE001
                    failed[b] = e
    best = None  # every row's argmax, computed at the first plain greedy row
    out: list[tuple[int, np.ndarray | None] | Exception] = []
    for b, (row, x, lp) in enumerate(zip(rows, logits, raw)):
        try:
            if b in failed:
                raise failed[b]
            if row.params.argmax:
                best = np.argmax(logits, axis=-1) if best is None else best
                out.append((int(best[b]), lp))
            else:
                out.append((row.sampler(x, row.seen), lp))
        except Exception as e:  # noqa: BLE001 - e.g. non-finite probabilities: this row fails
            out.append(e)
    return out


class Generator:
    """Text generation on a backend (ONNX Runtime or TensorRT) with a tokenizer."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        eos_ids: Sequence[int] | None = None,
        *,
        prefill_chunk: int | None = PREFILL_CHUNK,
    ):
        """``prefill_chunk``: a prompt longer than this is prefilled in chunks of this many tokens (every row's
        first chunk in one step, the later ones row by row), the boundaries the server's scheduler uses by
        default, so a prompt runs through the same matrix shapes offline and served. Chunks bound the prompt
        step's activations: one 4000-token step of the 32B shape holds ~1.8 GB of MLP intermediates (4000 x
        27392 floats, three of them), a 512-token chunk a tenth of it; llama.cpp does the same (``-ub 512``).
        ``None``: the whole prompt in one step."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids if eos_ids is not None else tokenizer.eos_ids)
        self.prefill_chunk = prefill_chunk

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        *,
        device: str = "cpu",
        max_batch: int = 1,
        max_seq_len: int | None = None,
        verify: bool = True,
        capacity: int | None = None,
    ) -> Generator:
        """``capacity``: deprecated alias of ``max_seq_len`` (the cache's initial context; it grows on demand)."""
        manifest = load_manifest(bundle_dir, verify=verify)
        backend = open_backend(manifest, device=device, max_batch=max_batch, max_seq_len=max_seq_len or capacity)
        return cls(backend, Tokenizer.from_dir(manifest.root))

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prompts into slots 0..B-1, chunked by ``prefill_chunk``; (B, vocab) logits of each last token."""
        C, rows = self.prefill_chunk, list(range(len(prompts)))
        if C is None or max(len(p) for p in prompts) <= C:
            return self.backend.prefill(rows, prompts)
        logits = self.backend.prefill(rows, [p[:C] for p in prompts])
        for b, p in enumerate(prompts):
            for start in range(C, len(p), C):
                logits[b] = self.backend.extend(b, p[start : start + C])[-1]
        return logits

    # ---- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt is empty")
        vocab = self.backend.spec.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return ids

    def chat_prompt(self, messages, tools=None, enable_thinking: bool = False, **kwargs) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking, tokenize=True, **kwargs
        )

    def _limits(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[int]:
        ctx = self.backend.io.max_seq_len  # the backend grows its cache up to the bundle's context
        limits = []
        for p, sp in zip(prompts, params):
            if len(p) >= ctx:
                raise ContextLengthError(
                    f"the prompt has {len(p)} tokens but the context holds {ctx} (prompt plus at least one new token)"
                )
            limits.append(min(sp.max_new_tokens, ctx - len(p)))
        return limits

    # ---- generation ---------------------------------------------------------------------------
    def stream_rows(
        self, prompts: str | Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> Iterator[tuple[int, str, RowState]]:
        """Generate for a batch; yields (row, text delta, state) as tokens arrive. Rows share decode steps."""
        prompts = [self.encode(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        for p in params:
            if p.validate().prompt_logprobs is not None:
                raise InputError(
                    "prompt_logprobs: the offline generator does not score prompts (Backend.score "
                    "does; the server's completions endpoint with echo and logprobs does too)"
                )
        limits = self._limits(prompts, params)
        B = len(prompts)
        need = max(len(p) + n for p, n in zip(prompts, limits))
        self.backend.ensure(B, need)
        rows = [RowState(self, p, sp, n) for p, sp, n in zip(prompts, params, limits)]
        t0 = time.perf_counter()
        logits = self._prefill(prompts)
        t1 = time.perf_counter()
        active = list(range(B))
        n_decode = 0
        while active:
            tokens = []
            for b, picked in zip(active, sample_batch([rows[b] for b in active], logits)):
                if isinstance(picked, Exception):
                    raise picked
                tok, lp = picked
                delta = rows[b].accept(tok, lp)
                if delta or rows[b].done:
                    yield b, delta, rows[b]
                tokens.append(tok)
            if n_decode == 0:
                t_first = time.perf_counter()
            keep = [i for i, b in enumerate(active) if not rows[b].done]
            active = [active[i] for i in keep]
            if not active:
                break
            logits = self.backend.decode(active, [tokens[i] for i in keep])
            n_decode += 1
        t2 = time.perf_counter()
        for b in range(B):
            self.backend.release(b)
            n_new = len(rows[b].result.token_ids)
            rows[b].result.timings = {
                "prefill_s": t1 - t0,
                "ttft_s": t_first - t0,
                "decode_s": t2 - t_first,
                "prefill_tokens_per_s": sum(len(p) for p in prompts) / max(t1 - t0, 1e-9),
                "decode_tokens_per_s": (n_new - 1) / (t2 - t_first) if n_new > 1 and t2 > t_first else 0.0,
                "decode_steps": n_decode,
            }

    def generate(
        self,
        prompts: str | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> list[GenerationResult]:
        """Results in prompt order (a bare string is one prompt: a list of one result)."""
        results: dict[int, GenerationResult] = {}
        for b, _, row in self.stream_rows(prompts, params):
            results[b] = row.result
        return [results[b] for b in sorted(results)]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas for one prompt; the final GenerationResult is left in ``self.last_result``."""
        for _, delta, row in self.stream_rows([prompt], params):
            self.last_result = row.result
            if delta:
                yield delta


def open_backend(
    manifest, *, device: str = "cpu", max_batch: int = 1, max_seq_len: int | None = None, capacity: int | None = None
) -> Backend:
    """The backend of a bundle's target (``backend.BACKENDS``: ONNX Runtime for 'ort', TensorRT for engine
    bundles). ``capacity``: deprecated alias of ``max_seq_len``."""
    if not manifest.spec.head.is_lm:
        raise BundleError(
            f"{manifest.root}: a {manifest.spec.head.task} bundle generates no text; run it with "
            f"`exaone-deploy {'qa' if manifest.spec.head.task == 'question-answering' else 'classify'}`"
        )
    cls = backend_class(manifest.target, manifest.root)
    return cls.open(manifest, device=device, max_batch=max_batch, max_seq_len=max_seq_len or capacity)
