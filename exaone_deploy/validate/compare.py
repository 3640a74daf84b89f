"""``exaone-deploy compare``: the same inputs through two bundles, output by output.

Any two runnable bundles of one checkpoint (ONNX Runtime vs TensorRT engine, float32 vs float16, float16 vs
an FP8 engine, ...) are opened with their own backend (:func:`~exaone_deploy.runtime.generate.open_backend`)
and driven through the backend API:

* ``prompt``: the logits at every position of one random prompt (``Backend.score``);
* ``step 0``: the prefill's last-position logits; ``step k``: the logits after k decode steps. Both sides
  are fed the same tokens: bundle A's greedy choice (teacher forcing), so errors do not compound through
  diverging text and every step compares like with like.

For each output: max and mean absolute error, relative error (max abs error over max |A|), relative L2 error,
cosine similarity and greedy agreement (argmax of A == argmax of B; for ``prompt`` the fraction of positions).

The teacher-forced loop is :func:`teacher_forced` over any two backends; ``verify`` runs it with the PyTorch
reference (:class:`~exaone_deploy.validate.reference.ReferenceBackend`) as A.

Polygraphy's ``Comparator`` is not used: it runs stateless runners on feed dicts, while our bundles are
stateful (KV-cache slots, prefill then decode), and a ``trt`` graph's plugin nodes do not run in ONNX
Runtime, so the ORT-vs-TRT comparison must go through the two backends anyway. Polygraphy is installable
without TensorRT, but what would remain of it here (error statistics over two arrays) is the few NumPy lines
of :func:`error_stats`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..bundle import BundleError, load_manifest
from ..runtime.backend import Backend, ContextLengthError
from ..runtime.generate import open_backend
from ..spec import ModelSpec

__all__ = ["compare_bundles", "error_stats", "teacher_forced", "default_prompt_len"]


def default_prompt_len(spec: ModelSpec) -> int:
    """Longer than the longest window, so the sliding-window rule takes part."""
    return max(16, 2 * max((layer.window for layer in spec.layers), default=0) + 3)


def teacher_forced(
    a: Backend, b: Backend, prompt: Sequence[int], steps: int, *, slot: int = 0
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(step, logits of A, logits of B), (vocab,) each: step 0 is the prompt's last position, step k the
    logits after k decode steps. Both sides get A's greedy token, so errors do not compound through diverging
    text. ``slot`` is released on both sides at the end."""
    try:
        la, lb = a.prefill([slot], [prompt])[0], b.prefill([slot], [prompt])[0]
        for step in range(steps + 1):
            yield step, la, lb
            if step == steps:
                break
            token = int(np.argmax(la))
            la, lb = a.decode([slot], [token])[0], b.decode([slot], [token])[0]
    finally:
        a.release(slot), b.release(slot)


def error_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Errors of ``b`` against reference ``a`` (same shape; last axis = vocabulary)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(b64 - a64)
    scale = float(np.abs(a64).max()) or 1.0
    norm_a = float(np.linalg.norm(a64))
    na, nb = np.linalg.norm(a64, axis=-1), np.linalg.norm(b64, axis=-1)
    cos = np.sum(a64 * b64, axis=-1) / np.maximum(na * nb, 1e-30)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(diff.max()) / scale,
        "rel_l2": float(np.linalg.norm(b64 - a64)) / (norm_a or 1.0),
        "cosine": float(cos.min()),
        "greedy_agreement": float(np.mean(np.argmax(a64, axis=-1) == np.argmax(b64, axis=-1))),
        "scale": scale,
    }


def _describe(m) -> dict:
    info = m.get("tensorrt") or {}
    return {
        "path": str(m.root),
        "target": m.target,
        "dtype": m.dtype,
        "max_seq_len": m.max_seq_len,
        **(
            {"tensorrt": info.get("version"), "quantization": info.get("precision", {}).get("quantized_dq_nodes")}
            if info
            else {}
        ),
    }


def compare_bundles(
    a: str | Path, b: str | Path, steps: int = 16, prompt_len: int | None = None, seed: int = 0, *, device: str = "cpu"
) -> dict:
    """Compare bundle ``b`` against bundle ``a`` on one random prompt and ``steps`` decode steps."""
    ma, mb = load_manifest(a), load_manifest(b)
    if ma.spec.config_sha256 != mb.spec.config_sha256:
        raise BundleError(f"{b} was exported from a different config.json than {a}: nothing to compare")
    spec = ma.spec
    prompt_len = prompt_len or default_prompt_len(spec)
    need = prompt_len + steps + 1
    limit = min(ma.max_seq_len, mb.max_seq_len)
    if need > limit:
        raise ContextLengthError(f"prompt_len + steps + 1 = {need} exceeds the bundles' context ({limit} tokens)")
    prompt = np.random.default_rng(seed).integers(0, spec.vocab_size, size=prompt_len).tolist()
    backends = [open_backend(m, device=device, max_batch=1, max_seq_len=need) for m in (ma, mb)]
    try:
        scores = [be.score(prompt, slot=0) for be in backends]
        outputs = [{"output": "prompt", **error_stats(scores[0], scores[1])}]
        rows = [{"step": step, **error_stats(la, lb)} for step, la, lb in teacher_forced(*backends, prompt, steps)]
    finally:
        for be in backends:
            be.close()
    return {
        "a": _describe(ma),
        "b": _describe(mb),
        "prompt_len": prompt_len,
        "steps": steps,
        "seed": seed,
        "outputs": outputs,
        "per_step": rows,
        "summary": {
            "max_abs": max(r["max_abs"] for r in [*outputs, *rows]),
            "mean_abs": float(np.mean([r["mean_abs"] for r in rows])),
            "max_rel": max(r["max_rel"] for r in [*outputs, *rows]),
            "min_cosine": min(r["cosine"] for r in [*outputs, *rows]),
            "greedy_agreement": float(np.mean([r["greedy_agreement"] for r in rows])),
            "prompt_greedy_agreement": outputs[0]["greedy_agreement"],
        },
    }
