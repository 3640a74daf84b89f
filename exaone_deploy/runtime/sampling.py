"""Sampling parameters and a NumPy sampler (per request: its own parameters and random stream).

Besides how to sample, ``SamplingParams`` says what a request wants back and what constrains it:
``logprobs`` (the log-probability of every generated token and its ``logprobs`` best alternatives, from the
raw logits: see :mod:`~exaone_deploy.runtime.logprobs`), ``prompt_logprobs`` (score every prompt token the
same way; with ``max_new_tokens=0`` a request only scores its prompt) and ``grammar`` (llguidance grammar
text, e.g. ``GrammarConstraint.json_schema(...).grammar``: each row compiles its own matcher from it, so the
parameters stay a plain value and the per-request state lives in ``generate.RowState``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ExaoneDeployError
from .logprobs import MAX_TOP_LOGPROBS

__all__ = ["SamplingParams", "Sampler", "SamplingError"]


_FMAX = float(np.finfo(np.float32).max)


class SamplingError(ExaoneDeployError, ValueError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each generated token's logprob and its k best alternatives
    prompt_logprobs: int | None = None  # None: none; k: score every prompt token (and its k best alternatives)
    grammar: str | None = None  # llguidance grammar the output must match (runtime/grammar.py)

    def validate(self) -> SamplingParams:
        checks = [
            (
                self.max_new_tokens >= (0 if self.prompt_logprobs is not None else 1),
                f"max_new_tokens must be >= 1 (0 only to score the prompt), got {self.max_new_tokens}",
            ),
            (0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise SamplingError(msg)
        return self

    @property
    def greedy(self) -> bool:
        # Temperatures this small make every logit difference overflow float32: they mean greedy.
        return self.temperature < 1e-5

    @property
    def argmax(self) -> bool:
        """The token is the argmax of the (grammar-masked) logits as they are: greedy, no repetition penalty."""
        return self.greedy and self.repetition_penalty == 1.0


@dataclass
class Sampler:
    """Turns one row of logits into a token; keeps the request's RNG and seen tokens."""

    params: SamplingParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.params.validate()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, seen: Sequence[int] = ()) -> int:
        p = self.params
        x = logits.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0 and len(seen):
            # transformers' RepetitionPenaltyLogitsProcessor: divide positive, multiply negative logits.
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            vals = x[idx]
            with np.errstate(over="ignore", divide="ignore"):  # an extreme penalty overflows: clipped below
                x[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        with np.errstate(over="ignore"):
            x /= p.temperature
        # A tiny repetition penalty or temperature can overflow float32: inf - inf would make every probability NaN.
        np.clip(x, -_FMAX, _FMAX, out=x)
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        probs = np.exp(x)
        probs /= probs.sum()
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, p.top_p)) + 1  # smallest prefix with mass >= top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[:cut]] = True
            probs[~mask] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
