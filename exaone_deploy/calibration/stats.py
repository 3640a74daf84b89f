"""Activation statistics of the float model, collected in ONNX Runtime.

The fp32 bundle's canonical graph is lowered for ONNX Runtime and every linear layer's input activation is
added as an extra graph output; the calibration samples run through it as prompt steps, and the activations
stream into per-group accumulators. No torch is involved, the numbers come from the exact graph we ship (the
same kernels, the same attention op), and memory stays at one batch of activations.

With ``kv_cache=True`` the key and value inputs of every attention op are tapped too (``collect_kv``: the
per-channel ranges of the INT8 KV cache's scales, kvcache.py); given an in-memory ``canonical`` graph (the
quantized one about to ship, its float weights still in the bundle's external data), that graph is run instead.

Pass 1 gathers per-channel max |x| and mean |x| (SmoothQuant, AWQ), plus, for AWQ, a strided subsample of the
tokens (the scale search) and per-block Gram matrices over all tokens (the clip search). Pass 2, needed only
for the percentile and entropy methods, histograms |x / s| of the smoothed activation over the range pass 1
found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..exporter import lower
from ..graph_io import KV, GraphIO, HeadIO
from ..runtime.ort_backend import bind_step
from ..spec import ModelSpec
from .graph import InputGroup, find_linears, input_groups
from .numerics import HIST_BINS

log = logging.getLogger(__name__)

__all__ = ["GroupStats", "CalibrationModel", "collect_kv"]

KV_TAP = "kv:"  # prefix of the attention key/value taps among CalibrationModel.outputs


@dataclass
class GroupStats:
    name: str
    in_features: int
    absmax: np.ndarray = None  # per channel max |x|
    sumabs: np.ndarray = None  # per channel sum |x|
    count: int = 0  # tokens seen
    token_rows: list = field(default_factory=list)  # AWQ scale search subsample
    gram: np.ndarray | None = None  # [in/block, block, block] sum over tokens of x_b x_b^T (AWQ clip search)
    hist: np.ndarray | None = None  # histogram of |x * inv_smooth| over [0, hist_max] (pass 2)
    hist_max: float = 0.0

    def __post_init__(self):
        self.absmax = np.zeros(self.in_features, np.float32)
        self.sumabs = np.zeros(self.in_features, np.float64)

    @property
    def meanabs(self) -> np.ndarray:
        return self.sumabs / max(self.count, 1)

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate(self.token_rows) if self.token_rows else np.zeros((0, self.in_features), np.float32)


class CalibrationModel:
    """The fp32 bundle's graph, lowered for ONNX Runtime, with the linear inputs as extra outputs."""

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec,
        canonical_file: str = "canonical.onnx",
        threads: int | None = None,
        *,
        canonical: ir.Model | None = None,
        linears: bool = True,
        kv_cache: bool = False,
    ):
        """``canonical``: run this graph (left unchanged) instead of the bundle's; ``linears``: tap the linear
        inputs (``collect``); ``kv_cache``: tap the attention ops' key and value inputs (``collect_kv``)."""
        self.spec = spec
        self.io = GraphIO(spec)  # float32, full-length caches (lowered without window caches)
        if canonical is not None:  # a copy: lowering rewrites the graph in place
            model = ir.serde.deserialize_model(ir.serde.serialize_model(canonical))
        else:
            model = ir.load(Path(bundle_dir) / canonical_file)
        self.groups: list[InputGroup] = input_groups(find_linears(model.graph)) if linears else []
        model = lower.lower(model, spec, "ort", fuse_linears=False)  # each linear keeps its own MatMul to tap
        by_name = {g.input.name: g for g in input_groups(find_linears(model.graph))}
        self.outputs: dict[str, str] = {}  # group name -> value name in the lowered graph
        for g in self.groups:
            lowered = by_name.get(g.input.name)
            if lowered is None or [m.name for m in lowered.members] != [m.name for m in g.members]:
                raise RuntimeError(f"linear group {g.name} not found after lowering {bundle_dir}")
            if lowered.input not in model.graph.outputs:
                model.graph.outputs.append(lowered.input)
            self.outputs[g.name] = lowered.input.name
        self.kv_taps: dict[str, tuple[int, str, bool]] = {}  # tap name -> (layer, "key"|"value", rotary)
        for node in (n for n in model.graph if kv_cache and n.op_type == "GroupQueryAttention"):
            layer = self.io.cache_layer(node.inputs[3].name)
            rotary = bool(node.attributes["do_rotary"].value) if "do_rotary" in node.attributes else False
            for kv, value in zip(KV, node.inputs[1:3]):
                if value not in model.graph.outputs:
                    model.graph.outputs.append(value)
                name = f"{KV_TAP}{layer}.{kv}"
                self.outputs[name] = value.name
                self.kv_taps[name] = (layer, kv, rotary)
        # Weights stay in the bundle's external data file; only the graph is serialised.
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle_dir))
        if threads:
            so.intra_op_num_threads = threads
        proto = ir.serde.serialize_model(model)
        log.info("calibration graph: %d linear input groups as extra outputs of %s", len(self.groups), bundle_dir)
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(
        self,
        tokens: np.ndarray,
        fn: Callable[[str, np.ndarray], None],
        batch_tokens: int = 2048,
        progress: bool = False,
        desc: str = "calibrate",
    ) -> None:
        """Run the samples (int64 [n, L]) as prompt steps; call ``fn(group_name, x [tokens, in])`` per group."""
        from tqdm.auto import tqdm

        n, L = tokens.shape
        b = max(1, batch_tokens // L)
        s = self.spec
        with tqdm(total=n, desc=desc, unit="sample", disable=not progress, leave=False) as bar:
            for start in range(0, n, b):
                batch = tokens[start : start + b]
                B = batch.shape[0]
                names = list(dict.fromkeys(self.outputs.values()))
                if not s.head.is_lm:  # a task head's prompt-only graph (graph_io.HeadIO): no caches to bind
                    feed = HeadIO.head_inputs(batch, s.head.pad_token_id)
                    values = dict(zip(names, self.session.run(names, feed)))
                else:
                    inputs, _ = self.io.prefill_inputs(batch)
                    caches = [np.zeros(shape, np.float32) for shape in self.io.cache_shapes(B, L)]
                    logits = np.empty((B, 1, s.vocab_size), np.float32)
                    io = bind_step(
                        self.session, self.io, inputs, logits, [c.ctypes.data for c in caches], L, np.float32
                    )
                    for name in names:
                        io.bind_output(name, "cpu")
                    self.session.run_with_iobinding(io)
                    values = {k: v.numpy() for k, v in zip(names, io.get_outputs()[-len(names) :])}
                for group, value_name in self.outputs.items():
                    x = values[value_name]
                    fn(group, x.reshape(-1, x.shape[-1]))
                bar.update(B)


def collect(
    model: CalibrationModel,
    tokens: np.ndarray,
    *,
    awq_block: int | None = None,
    awq_tokens: int = 512,
    progress: bool = False,
) -> dict[str, GroupStats]:
    """Pass 1: per-channel ranges and means (and AWQ's token subsample and block Gram matrices)."""
    stats = {g.name: GroupStats(g.name, g.in_features) for g in model.groups}
    total = tokens.size
    stride = max(1, -(-total // awq_tokens)) if awq_block else 0
    seen = {name: 0 for name in stats}

    def fn(name: str, x: np.ndarray) -> None:
        st = stats.get(name)  # None: a KV-cache tap (collect_kv)
        if st is None:
            return
        a = np.abs(x)
        np.maximum(st.absmax, a.max(axis=0), out=st.absmax)
        st.sumabs += a.sum(axis=0, dtype=np.float64)
        st.count += x.shape[0]
        if awq_block:
            first = (-seen[name]) % stride
            st.token_rows.append(x[first::stride].astype(np.float32, copy=True))
            seen[name] += x.shape[0]
            xp = x if x.shape[1] % awq_block == 0 else np.pad(x, ((0, 0), (0, -x.shape[1] % awq_block)))
            xb = xp.reshape(x.shape[0], -1, awq_block)
            g = np.einsum("tbi,tbj->bij", xb, xb, dtype=np.float64)
            st.gram = g if st.gram is None else st.gram + g

    model.run(tokens, fn, progress=progress, desc="calibrate (ranges)")
    return stats


def collect_histograms(
    model: CalibrationModel,
    tokens: np.ndarray,
    stats: dict[str, GroupStats],
    inv_smooth: dict[str, np.ndarray | None],
    progress: bool = False,
) -> None:
    """Pass 2: histogram of |x * inv_smooth| per group over [0, its max] (HIST_BINS bins)."""
    for name, st in stats.items():
        inv = inv_smooth.get(name)
        st.hist_max = float((st.absmax * inv).max() if inv is not None else st.absmax.max())
        st.hist = np.zeros(HIST_BINS, np.float64)

    def fn(name: str, x: np.ndarray) -> None:
        st = stats.get(name)
        if st is None:
            return
        inv = inv_smooth.get(name)
        a = np.abs(x * inv) if inv is not None else np.abs(x)
        if st.hist_max > 0:
            h, _ = np.histogram(a, bins=HIST_BINS, range=(0.0, st.hist_max))
            st.hist += h

    model.run(tokens, fn, progress=progress, desc="calibrate (histograms)")


def collect_kv(
    model: CalibrationModel, tokens: np.ndarray, progress: bool = False
) -> dict[tuple[int, str], np.ndarray]:
    """Per (layer, "key"|"value"): the per-channel range the INT8 cache must hold over the samples. Keys of RoPE
    layers are bounded after rotation at any position (``kvcache.rope_pair_absmax``). Needs ``kv_cache=True``."""
    from .kvcache import rope_pair_absmax

    if not model.kv_taps:
        raise RuntimeError("collect_kv needs a CalibrationModel built with kv_cache=True")
    s = model.spec
    amax = {(layer, kv): np.zeros(s.kv_size, np.float32) for layer, kv, _ in model.kv_taps.values()}

    def fn(name: str, x: np.ndarray) -> None:
        tap = model.kv_taps.get(name)
        if tap is None:
            return
        layer, kv, rotary = tap
        a = rope_pair_absmax(x, s.num_kv_heads, s.head_dim) if rotary and kv == "key" else np.abs(x).max(axis=0)
        np.maximum(amax[(layer, kv)], a, out=amax[(layer, kv)])

    model.run(tokens, fn, progress=progress, desc="calibrate (KV cache)")
    return amax
