"""Side-by-side check of a bundle (ONNX Runtime) against the PyTorch reference of its checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..bundle import BundleError, load_manifest
from ..checkpoint import resolve_model_dir
from ..runtime.ort_backend import OrtBackend
from ..exporter.reference import load_reference

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


def verify_bundle(bundle_dir: str | Path, model_dir: str | Path, steps: int = 32, prompt_len: int | None = None,
                  seed: int = 0) -> dict:
    manifest = load_manifest(bundle_dir)
    spec = manifest.spec
    ref = load_reference(resolve_model_dir(model_dir), "float32", max_positions=manifest.max_seq_len)
    if ref.spec.config_sha256 != spec.config_sha256:
        raise BundleError(f"{bundle_dir} was exported from a different config.json than {model_dir}")
    window = max((layer.window for layer in spec.layers), default=0)
    if prompt_len is None:
        prompt_len = max(16, 2 * window + 3)  # longer than the window, so the window rule is exercised
    need = prompt_len + steps + 1
    backend = OrtBackend(manifest, max_batch=1, capacity=min(need, manifest.max_seq_len), verify=False)
    backend.check_fits(need)
    tol = TOLERANCES[manifest.dtype]
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, spec.vocab_size, size=prompt_len).tolist()

    caches = ref.empty_cache(1, backend.capacity)
    ref_logits, caches = ref.step(torch.tensor([prompt]), [0], caches, all_logits=False)
    got = backend.prefill([0], [prompt])
    rows = []
    past = prompt_len
    for step in range(steps + 1):
        r = ref_logits[0, -1].double().numpy()
        g = got[0].astype(np.float64)
        err = np.abs(g - r)
        scale = float(np.abs(r).max())
        bound = tol["abs"] + tol["rel"] * scale
        rows.append(StepError(step, float(err.max()), float((err / (np.abs(r) + 1e-6)).max()), scale,
                              bool(np.argmax(g) == np.argmax(r)), bool(err.max() <= bound)))
        if step == steps:
            break
        token = int(np.argmax(r))  # both sides continue with the reference's greedy token
        ref_logits, caches = ref.step(torch.tensor([[token]]), [past], caches, all_logits=False)
        got = backend.decode([0], [token])
        past += 1
    ok = all(r.within_tolerance and r.greedy_match for r in rows)
    return {
        "bundle": str(bundle_dir), "reference": str(model_dir), "dtype": manifest.dtype, "target": manifest.target,
        "prompt_len": prompt_len, "steps": steps, "tolerance": tol, "ok": ok,
        "max_abs": max(r.max_abs for r in rows), "greedy_agreement": sum(r.greedy_match for r in rows) / len(rows),
        "per_step": [asdict(r) for r in rows],
    }
