"""Sampling parameters and a NumPy sampler (per request: its own parameters and random stream)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ExaoneDeployError

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

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SamplingError(msg)
        return self

    @property
    def greedy(self) -> bool:
        # Temperatures this small make every logit difference overflow float32: they mean greedy.
        return self.temperature < 1e-5


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
