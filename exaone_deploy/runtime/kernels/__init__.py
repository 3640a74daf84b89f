"""Our own ONNX Runtime CPU kernels for the linear layers and decode attention, swapped in at session creation.

Contract: ``prepare(model_path, so, dtype=..., mode=...)`` returns what to hand ``ort.InferenceSession`` (the model
path, or the model's bytes with eligible nodes moved to ``ai.exaone.deploy`` ops) and registers the kernel library
on the session options ``so``; ``session(...)`` does both and falls back to the file as written if onnxruntime
refuses the rewrite. Only float32 bundles on the CPU provider are rewritten; the bundle on disk never changes
(onnxruntime-genai and a plain onnxruntime still run it). Eligible nodes, each with the numerics of the node it
replaces up to float summation order:

* ``com.microsoft::MatMulNBits`` -> ``QMatMul`` (``qmatmul_core.h``): 4 or 8 bits, block 32, 64 or 128,
  ``accuracy_level`` 4 (int8 activations per block), no zero points / g_idx / bias, B and scales initializers,
  N % 16 == 0 (a partial last block is zero-padded, as MatMulNBits does); up to three that read one activation
  (q/k/v, gate/up) become one ``QMatMul2``/``QMatMul3``.
* ``MatMul`` by a float32 [K, N] initializer, N % 16 == 0 -> ``FMatMul`` (``sgemm_core.h``).
* ``com.microsoft::GroupQueryAttention`` of a global layer (no local window; nine inputs, or seven without rotary
  caches as in EXAONE 4's NoPE layers), float cache, only the attributes ``num_heads``, ``kv_num_heads``,
  ``local_window_size``, ``do_rotary``, ``rotary_interleaved``, ``scale``, ``softcap``, ``smooth_softmax`` -> ours of
  the same name: decode steps on ``attention_core.h``, every other call handed to onnxruntime's own kernel. The
  same over an INT8 cache (``--kv-cache int8``: ``k_quant_type`` = ``v_quant_type`` = ``PER_CHANNEL``,
  ``kv_cache_bit_width`` 8, ``k_scale``/``v_scale`` at inputs 12 and 13, no position ids, bias or sink) ->
  ``GroupQueryAttentionQ8`` (onnxruntime's CPU op dequantizes the cache per step: ~1.6x slower than over a float
  cache at batch 16; ours reads the int8 rows directly, a quarter of the float cache's bytes).

Why: ONNX Runtime's MLAS kernels are slow exactly where batched serving and prompts live. MatMulNBits unpacks
4-bit weights per 2-row tile at M > 1 (and rounds its M = 1 and M > 1 paths differently); its SGEMM reaches ~180
GFLOP/s at M = 16 rows on a 2-core AVX-512 machine. Ours repack each weight once at load, keep every row's
arithmetic independent of its batch, and run int4 prompts ~2x, int4 batch-16 linears ~3x and fp32 batch-16
decode steps ~1.5x faster (docs/perf.md, docs/scale.md). Its CPU GroupQueryAttention runs two small GEMM calls
per (row, query head) on a decode step (~20 ms of a ~78 ms batch-16 int4 step of the 1.2B shape); ours reads each
cached key once per KV head (~7 ms, most of it reading the float32 cache).

Build: the C source is compiled on first use with the system C compiler (``$CC``, else ``cc``) into the user cache
(``$EXAONE_DEPLOY_CACHE`` or ``~/.cache/exaone-deploy``/kernels, written to a temporary name and renamed), keyed by
the hash of the sources and flags. No compiler, another architecture, or a CPU without AVX-512 VNNI: ONNX Runtime's
kernels keep running, logged once. ``EXAONE_DEPLOY_KERNELS``: ``auto`` (default), ``off``, or ``on`` (fail loudly when
unavailable); ``EXAONE_DEPLOY_KERNEL_OPS`` (``linear``, ``attention``, comma-separated; default both) picks the op
families, for A/B runs. Rejected: a compiled extension built by pip (the edge install would need a compiler and a
build per platform), and editing the graph with ``onnx`` (not a runtime dependency; the rename is a few protobuf
fields, see ``_wire``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from ...errors import ExaoneDeployError
from . import _wire

log = logging.getLogger(__name__)

DOMAIN = "ai.exaone.deploy"
OP = "QMatMul"
MODES = ("auto", "on", "off")
OPS = ("linear", "attention")  # op families; EXAONE_DEPLOY_KERNEL_OPS picks a subset (A/B runs)
_HERE = Path(__file__).resolve().parent
_SOURCES = ("qmatmul_ort.c", "qmatmul_core.h", "sgemm_core.h", "attention_core.h")
_FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")  # the ISA is chosen per function (target attributes)


class KernelError(ExaoneDeployError, RuntimeError):
    """``EXAONE_DEPLOY_KERNELS=on`` and the kernel library cannot be built or run here."""


def mode_from_env() -> str:
    mode = os.environ.get("EXAONE_DEPLOY_KERNELS", "auto").strip().lower() or "auto"
    mode = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(mode, mode)
    if mode not in MODES:
        raise KernelError(f"EXAONE_DEPLOY_KERNELS={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def cache_dir() -> Path:
    root = os.environ.get("EXAONE_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "exaone-deploy"
    )
    return Path(root) / "kernels"


def _source_hash() -> str:
    h = hashlib.sha256(" ".join(_FLAGS).encode())
    for name in _SOURCES:
        h.update((_HERE / name).read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _build() -> tuple[Path | None, str]:
    """(library path, "") or (None, why not). Built once per source version and cached on disk."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the QMatMul kernel is x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    out = cache_dir() / f"qmatmul-{_source_hash()}.so"
    if not out.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            return None, "no C compiler (set CC, or install gcc) to build the QMatMul kernel"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
            os.close(fd)
        except OSError as e:
            return None, f"cannot write the QMatMul kernel to {out.parent} ({e}); set EXAONE_DEPLOY_CACHE"
        cmd = [cc, *_FLAGS, "-o", tmp, str(_HERE / "qmatmul_ort.c"), "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            Path(tmp).unlink(missing_ok=True)
            return None, f"building the QMatMul kernel failed ({e})"
        if res.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            return None, f"building the QMatMul kernel failed: {' '.join(cmd)}: {res.stderr.strip()[-500:]}"
        os.replace(tmp, out)
        log.info("built %s", out)
    try:
        lib = ctypes.CDLL(str(out))
        supported = bool(lib.exaone_qmatmul_supported())
    except OSError as e:
        return None, f"{out}: cannot load the QMatMul kernel ({e})"
    if not supported:
        return None, "this CPU lacks AVX-512 VNNI, which the QMatMul kernel needs"
    return out, ""


def library(mode: str | None = None) -> Path | None:
    """The kernel library's path, or None (``mode`` off, or unavailable: logged; raises under ``on``)."""
    mode = mode or mode_from_env()
    if mode == "off":
        return None
    path, why = _build()
    if path is None:
        if mode == "on":
            raise KernelError(f"EXAONE_DEPLOY_KERNELS=on: {why}")
        log.info("%s; quantized linears run on onnxruntime's MatMulNBits", why)
    return path


def eligible(node: _wire.Node, info: _wire.GraphInfo) -> bool:
    """MatMulNBits with exactly the numerics QMatMul implements (module docstring)."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or len(node.outputs) != 1:
        return False
    ins = node.inputs
    while ins and ins[-1] == "":
        ins = ins[:-1]
    if len(ins) != 3 or ins[1] not in info.tensors or ins[2] not in info.tensors:
        return False
    a = node.int_attributes
    k, n = a.get("K", 0), a.get("N", 0)
    return (
        a.get("bits") in (4, 8)
        and a.get("block_size") in (32, 64, 128)
        and a.get("accuracy_level") == 4
        and k > 0
        and n > 0
        and n % 16 == 0
    )


MAX_FUSED = 3  # QMatMul, QMatMul2, QMatMul3 (qmatmul_ort.c)
FOP = "FMatMul"
AOP = "GroupQueryAttention"
AOP8 = "GroupQueryAttentionQ8"
_GQA_ATTRIBUTES = frozenset(
    (
        "num_heads",
        "kv_num_heads",
        "local_window_size",
        "do_rotary",
        "rotary_interleaved",
        "scale",
        "softcap",
        "smooth_softmax",
    )
)


def attention_eligible(node: _wire.Node) -> bool:
    """GroupQueryAttention as our op serves it (module docstring): nine named inputs, or seven without rotary
    caches (EXAONE 4's NoPE global layers); no int8-cache scales, position ids or bias (more inputs, other
    attributes); three outputs; no local window (onnxruntime releases disagree on which keys a window keeps)."""
    return (
        node.op_type == "GroupQueryAttention"
        and node.domain == "com.microsoft"
        and (len(node.inputs) == 9 or (len(node.inputs) == 7 and node.int_attributes.get("do_rotary", 0) == 0))
        and all(node.inputs)
        and len(node.outputs) == 3
        and all(node.outputs)
        and set(node.attribute_names) <= _GQA_ATTRIBUTES
        and len(set(node.attribute_names)) == len(node.attribute_names)
        and node.int_attributes.get("local_window_size", -1) <= 0
    )


_GQA_Q8_ATTRIBUTES = _GQA_ATTRIBUTES | {"k_quant_type", "v_quant_type", "kv_cache_bit_width"}


def attention_q8_eligible(node: _wire.Node) -> bool:
    """GroupQueryAttention over an INT8 cache as ``GroupQueryAttentionQ8`` serves it: fourteen inputs (query ..
    total_sequence_length, cos/sin both or neither as ``do_rotary`` says, no position ids / attention bias / head sink,
    ``k_scale`` and ``v_scale``), per-channel 8-bit quantization of both caches, no local window."""
    i, a, s = node.inputs, node.int_attributes, node.str_attributes
    rotary = a.get("do_rotary", 0)
    return (
        node.op_type == "GroupQueryAttention"
        and node.domain == "com.microsoft"
        and len(i) == 14
        and all(i[:7])
        and (all(i[7:9]) if rotary == 1 else rotary == 0 and not any(i[7:9]))
        and not any(i[9:12])
        and all(i[12:14])
        and len(node.outputs) == 3
        and all(node.outputs)
        and set(node.attribute_names) <= _GQA_Q8_ATTRIBUTES
        and len(set(node.attribute_names)) == len(node.attribute_names)
        and s.get("k_quant_type") == b"PER_CHANNEL"
        and s.get("v_quant_type") == b"PER_CHANNEL"
        and a.get("kv_cache_bit_width") == 8
        and a.get("local_window_size", -1) <= 0
    )


def float_eligible(node: _wire.Node, info: _wire.GraphInfo) -> bool:
    """ONNX MatMul of an activation by a float32 [K, N] initializer with N % 16 == 0 (sgemm_core.h)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    dims, dtype = info.tensors.get(node.inputs[1], ((), 0))
    return (
        len(node.outputs) == 1 and dtype == 1 and len(dims) == 2 and dims[0] > 0 and dims[1] > 0 and dims[1] % 16 == 0
    )


def _moved(node: _wire.Node, op_type: str, **attributes) -> _wire.Node:
    """``node`` as our op ``op_type``: the same name, inputs and outputs, these attributes."""
    return _wire.Node(
        op_type=op_type,
        domain=DOMAIN,
        name=node.name,
        inputs=list(node.inputs),
        outputs=list(node.outputs),
        **attributes,
    )


def _plan(nodes: list[_wire.Node], info: _wire.GraphInfo, ops: frozenset[str] = frozenset(OPS)) -> list:
    """Eligible MatMulNBits -> QMatMul; up to three that read the same activation with the same K / bits / block
    (q, k, v; gate, up) -> one QMatMul2/3 at the first one's place (its inputs exist there: A and initializers),
    so A is quantized once and one parallel loop covers all their columns. ``release_inputs`` = 1 when the node
    alone reads its weights: the kernel then hands their pages back to the OS after repacking. Eligible
    GroupQueryAttention -> ours, same inputs and attributes. ``ops``: the families to rename (``OPS``)."""
    groups: dict[tuple, list[int]] = {}
    for i, node in enumerate(nodes):
        if "linear" in ops and eligible(node, info):
            a = node.int_attributes
            groups.setdefault((node.inputs[0], a["K"], a["bits"], a["block_size"]), []).append(i)
    out: list[_wire.Node | None] = list(nodes)
    for i, node in enumerate(nodes):
        attention = AOP if attention_eligible(node) else AOP8 if attention_q8_eligible(node) else None
        if "attention" in ops and attention:
            ints = {k: v for k, v in node.int_attributes.items() if k != "kv_cache_bit_width"}  # Q8 implies it
            out[i] = _moved(node, attention, int_attributes=ints, float_attributes=dict(node.float_attributes))
        elif "linear" in ops and float_eligible(node, info):
            release = not info.has_subgraphs and info.uses[node.inputs[1]] == 1
            out[i] = _moved(node, FOP, int_attributes={"release_inputs": int(release)})
    for members in groups.values():
        for c in range(0, len(members), MAX_FUSED):
            chunk = [nodes[i] for i in members[c : c + MAX_FUSED]]
            first = chunk[0].int_attributes
            weights = [name for n in chunk for name in n.inputs[1:3]]
            release = not info.has_subgraphs and all(info.uses[name] == 1 for name in weights)
            attrs = {"K": first["K"], "bits": first["bits"], "block_size": first["block_size"], "accuracy_level": 4}
            if len(chunk) == 1:
                attrs["N"] = first["N"]
            else:
                attrs.update({f"N{j}": n.int_attributes["N"] for j, n in enumerate(chunk)})
            attrs["release_inputs"] = int(release)
            fused = _wire.Node(
                op_type=OP if len(chunk) == 1 else f"{OP}{len(chunk)}",
                domain=DOMAIN,
                name=chunk[0].name,
                inputs=[chunk[0].inputs[0], *weights],
                outputs=[n.outputs[0] for n in chunk],
                int_attributes=attrs,
            )
            out[members[c]] = fused
            for i in members[c + 1 : c + MAX_FUSED]:
                out[i] = None
    return out


def ops_from_env() -> frozenset[str]:
    raw = os.environ.get("EXAONE_DEPLOY_KERNEL_OPS", "").strip()
    ops = frozenset(x.strip() for x in raw.split(",") if x.strip()) if raw else frozenset(OPS)
    if not ops <= set(OPS):
        raise KernelError(f"EXAONE_DEPLOY_KERNEL_OPS={raw!r}: a comma-separated subset of {', '.join(OPS)}")
    return ops


def rewrite(model: bytes, ops: frozenset[str] | None = None) -> tuple[bytes, int]:
    """A serialized ModelProto with eligible nodes on our ops (``ops``: the families to rename, default all), and
    how many nodes were replaced (fused MatMulNBits count once each)."""
    ops = frozenset(OPS) if ops is None else ops

    return _wire.rewrite_nodes(model, lambda nodes, info: _plan(nodes, info, ops), DOMAIN)


def prepare_bytes(model: bytes, so, *, mode: str | None = None, where: str = "model") -> bytes | None:
    """``model`` (serialized) with eligible nodes on our ops and the library registered on ``so``; None when the
    kernels are off or unavailable (``on``: raises), the model cannot be walked, or nothing is eligible."""
    mode = mode or mode_from_env()
    if mode == "off":
        return None
    lib = library(mode)
    if lib is None:
        return None
    try:
        data, count = rewrite(model, ops_from_env())
    except ValueError as e:  # not a protobuf we can walk: onnxruntime will say what is wrong with it
        log.warning("%s: not renaming nodes for our kernels (%s)", where, e)
        return None
    if count == 0:
        return None
    so.register_custom_ops_library(str(lib))
    log.info("%d nodes of %s on our kernels", count, where)
    return data


def prepare(model_path: str | Path, so, *, dtype: str, mode: str | None = None) -> str | bytes:
    """What ``ort.InferenceSession`` should load for ``model_path`` with session options ``so``: the path
    unchanged, or (kernel available, float32 bundle, eligible nodes) the rewritten bytes, with ``so`` told to
    register the library and to find external weights next to ``model_path``."""
    if dtype != "float32" or (mode or mode_from_env()) == "off":
        return str(model_path)
    data = prepare_bytes(Path(model_path).read_bytes(), so, mode=mode, where=str(model_path))
    if data is None:
        return str(model_path)
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(Path(model_path).resolve().parent)
    )
    return data


def session(model_path: str | Path, make_options, providers: list[str], *, dtype: str, mode: str | None = None):
    """(``ort.InferenceSession``, whether QMatMul runs in it) for ``model_path``, with options from
    ``make_options()``. The kernel is an optimization: if onnxruntime refuses the rewritten graph (a kernel check
    failing on an unusual bundle), the session is created again from the file as it is, with a warning, unless
    ``mode`` is ``on``."""
    import onnxruntime as ort

    mode = mode or mode_from_env()
    so = make_options()
    model = prepare(model_path, so, dtype=dtype, mode=mode) if providers[0] == "CPUExecutionProvider" else None
    if not isinstance(model, bytes):
        return ort.InferenceSession(str(model_path), sess_options=so, providers=providers), False
    try:
        return ort.InferenceSession(model, sess_options=so, providers=providers), True
    except Exception as e:  # noqa: BLE001 - any refusal: fall back to the graph as written
        why = " ".join(str(e).split())[:300]
        if mode == "on":
            raise KernelError(f"{model_path}: onnxruntime refused the graph with QMatMul: {why}") from e
        log.warning("%s: onnxruntime refused the graph with QMatMul (%s); running MatMulNBits", model_path, why)
    return ort.InferenceSession(str(model_path), sess_options=make_options(), providers=providers), False
