"""Polygraphy data loader for an exaone-deploy bundle's ``model.onnx`` (docs/runtimes.md).

    EXAONE_BUNDLE=B polygraphy run B/model.onnx --onnxrt --data-loader-script docs/polygraphy_loader.py

Reads only ``B/manifest.json`` (numpy and the standard library: no exaone-deploy needed) and yields two feeds
that follow the graph contract of docs/bundle.md, over caches sized the way the manifest says
(``io.cache.per_layer_len``: a sliding layer's window W, ``cache_len`` for the others):

1. a prompt step: ``PROMPT_LEN`` token ids into empty caches (``seqlens_k = PROMPT_LEN - 1``);
2. a decode step: one token after ``PROMPT_LEN`` positions of zero keys and values (the caches are inputs here,
   not carried over: polygraphy runs each feed on its own).

Environment: ``EXAONE_BUNDLE`` (default: the current directory), ``EXAONE_PROMPT_LEN`` (default 16),
``EXAONE_CACHE_LEN`` (the global layers' cache length, default 64; at least the prompt length + 1).
Polygraphy runs each feed without I/O binding, so ONNX Runtime writes each ``present`` to a new buffer instead of
updating the ``past`` in place; the logits are the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

_DTYPES = {"float32": np.float32, "float16": np.float16}


def bundle_feeds(bundle: str | Path, prompt_len: int = 16, cache_len: int = 64, seed: int = 0) -> list[dict]:
    """The two feeds (prompt step, decode step) for ``bundle``'s ``model.onnx``, as name -> numpy array."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    if manifest.get("target") != "ort":
        raise SystemExit(f"{bundle}: a {manifest.get('target')} bundle; this loader feeds ort bundles")
    if not 0 < prompt_len < cache_len:
        raise SystemExit(f"EXAONE_PROMPT_LEN {prompt_len} must be positive and below EXAONE_CACHE_LEN {cache_len}")
    cache = manifest["io"]["cache"]
    dtype = _DTYPES.get(cache["dtype"])
    if dtype is None:
        raise SystemExit(f"{bundle}: cache dtype {cache['dtype']} has no numpy type here (float32, float16)")
    vocab = manifest["spec"]["vocab_size"]
    ids = np.random.default_rng(seed).integers(0, vocab, size=(1, prompt_len), dtype=np.int64)

    def caches() -> dict[str, np.ndarray]:
        out = {}
        for i, n in enumerate(cache["per_layer_len"]):
            shape = (1, cache["num_kv_heads"], n if isinstance(n, int) else cache_len, cache["head_dim"])
            for kv in ("key", "value"):
                out[f"past_key_values.{i}.{kv}"] = np.zeros(shape, dtype)
        return out

    prompt = {
        "input_ids": ids,
        "seqlens_k": np.array([prompt_len - 1], np.int32),
        "total_sequence_length": np.array(prompt_len, np.int32),
        "logits_index": np.array([[prompt_len - 1]], np.int64),
        **caches(),
    }
    decode = {
        "input_ids": ids[:, -1:],
        "seqlens_k": np.array([prompt_len], np.int32),
        "total_sequence_length": np.array(prompt_len + 1, np.int32),
        "logits_index": np.array([[0]], np.int64),
        **caches(),
    }
    return [prompt, decode]


def load_data():
    """Polygraphy's entry point: an iterable of feed dicts."""
    return bundle_feeds(
        os.environ.get("EXAONE_BUNDLE", "."),
        int(os.environ.get("EXAONE_PROMPT_LEN", "16")),
        int(os.environ.get("EXAONE_CACHE_LEN", "64")),
    )
