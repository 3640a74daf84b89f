"""Side-by-side check of a bundle (ONNX Runtime) against the PyTorch reference of its checkpoint.

This is :func:`~exaone_deploy.validate.compare.teacher_forced` with the reference backend as A and the bundle
as B, judged against a per-dtype tolerance (``TOLERANCES``) and greedy agreement per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..bundle import BundleError, load_manifest
from ..runtime.ort_backend import OrtBackend
from .compare import default_prompt_len, teacher_forced
from .reference import ReferenceBackend

__all__ = ["TOLERANCES", "StepError", "verify_bundle"]

# Max abs logits error allowed against the float32 reference, per bundle dtype (docs/bundle.md).
# float16/bfloat16 bound the error relative to the logits' scale: abs <= rel * max|logits| + abs_floor.
TOLERANCES = {
    "float32": {"abs": 1e-4, "rel": 0.0},
    "float16": {"abs": 2e-2, "rel": 2e-2},
    "bfloat16": {"abs": 1e-1, "rel": 8e-2},
}


@dataclass
class StepError:
    step: int  # 0 = prefill
    max_abs: float
    max_rel: float
    scale: float  # max |reference logits|
    greedy_match: bool
    within_tolerance: bool


def verify_bundle(
    bundle_dir: str | Path, model_dir: str | Path, steps: int = 32, prompt_len: int | None = None, seed: int = 0
) -> dict:
    manifest = load_manifest(bundle_dir)
    spec = manifest.spec
    prompt_len = prompt_len or default_prompt_len(spec)
    need = prompt_len + steps + 1
    context = min(need, manifest.max_seq_len)
    ref = ReferenceBackend(model_dir, max_seq_len=context, max_positions=manifest.max_seq_len)
    if ref.spec.config_sha256 != spec.config_sha256:
        raise BundleError(f"{bundle_dir} was exported from a different config.json than {model_dir}")
    backend = OrtBackend(manifest, max_batch=1, max_seq_len=context, verify=False)
    backend.check_fits(need)
    tol = TOLERANCES[manifest.dtype]
    prompt = np.random.default_rng(seed).integers(0, spec.vocab_size, size=prompt_len).tolist()
    rows = []
    for step, r, g in teacher_forced(ref, backend, prompt, steps):
        r, g = r.astype(np.float64), g.astype(np.float64)
        err = np.abs(g - r)
        scale = float(np.abs(r).max())
        bound = tol["abs"] + tol["rel"] * scale
        rows.append(
            StepError(
                step,
                float(err.max()),
                float((err / (np.abs(r) + 1e-6)).max()),
                scale,
                bool(np.argmax(g) == np.argmax(r)),
                bool(err.max() <= bound),
            )
        )
    ok = all(r.within_tolerance and r.greedy_match for r in rows)
    return {
        "bundle": str(bundle_dir),
        "reference": str(model_dir),
        "dtype": manifest.dtype,
        "target": manifest.target,
        "prompt_len": prompt_len,
        "steps": steps,
        "tolerance": tol,
        "ok": ok,
        "max_abs": max(r.max_abs for r in rows),
        "greedy_agreement": sum(r.greedy_match for r in rows) / len(rows),
        "per_step": [asdict(r) for r in rows],
    }
