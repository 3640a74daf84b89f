"""TensorRT plugin for the EXAONEAttention op, written with TensorRT's ``tensorrt.plugin`` API (TRT >= 10.9,
"quickly deployable plugins"), backed by the Triton kernels of :mod:`.triton_attention`.

Plugin identity
    op_type ``EXAONEAttention_TRT``, namespace ``exaone_deploy``, version ``"1"`` (QDP plugins are always
    version 1). The ONNX parser maps a node to the plugin by op_type + ``plugin_namespace`` +
    ``plugin_version`` attributes; the remaining node attributes become plugin fields by name.

Inputs (always all 9, in this order)
    query (B,S,N*H), key, value (B,S,Nkv*H), past_key, past_value (B,Nkv,C,H), seqlens_k int32 (B),
    total_sequence_length int32 (1) or (), cos_cache, sin_cache (maxpos, H/2).
    A QDP plugin has a fixed input list, so NoPE layers (rotary=0) must still pass two cos/sin tensors
    (any (n, H/2) float tensor, e.g. the model's caches or a (1, H/2) constant); they are not read.

Fields
    num_heads:int, kv_num_heads:int, scale:float, window:int, rotary:int, ring:int - all required (QDP
    attributes have no defaults). Semantics: :func:`exaone_deploy.opref.attention_ref`.

Outputs and the in-place cache
    output (B,S,N*H) with the dtype of query; present_key, present_value declared as
    ``past_key.aliased()`` / ``past_value.aliased()``. QDP turns that into ``IPluginV3OneBuildV2
    ::getAliasedInput(1) = 3`` and ``(2) = 4``: TensorRT gives each present output the *same device buffer*
    as its past input, so the kernels update the cache in place (only this step's slots are written; no
    copy of the cache is made). Bind the engine's past_key/present_key I/O to one buffer per layer.

Implementations
    * AOT (``@trtp.aot_impl``, preferred): one Triton kernel (``_fused_attention_kernel``: attention + RoPE
      + cache write) compiled to PTX at engine-build time and baked into the engine, so the engine runs in
      plain C++ TensorRT (trtexec) without Python. Two tactics (decode-shaped and prefill-shaped tiles) are
      advertised through ``@trtp.autotune``; TensorRT times them at the profile's opt shape.
    * JIT (``@trtp.impl``): a Python callback running the multi-kernel path (split-KV decode, separate
      cache update) through torch. Engines built with it need :func:`register_plugins` called (and torch,
      triton importable) in the process that deserializes them.
    :func:`register_plugins` registers the AOT one by default. With both registered, choose per node with the
    ONNX attribute ``aot`` (1 = AOT, 0 = JIT) or per network with ``NetworkDefinitionCreationFlag
    .PREFER_AOT_PYTHON_PLUGINS`` / ``PREFER_JIT_PYTHON_PLUGINS``; with neither, TensorRT refuses to pick.

TensorRT is imported lazily, inside :func:`register_plugins`: importing this module needs neither
TensorRT nor torch.
"""

# NOTE: no ``from __future__ import annotations`` here: tensorrt.plugin inspects the annotations of the
# decorated functions as real classes (TensorDesc, Tensor, KernelLaunchParams...).

import functools
import os
import re
from dataclasses import dataclass

PLUGIN_OP_TYPE = "EXAONEAttention_TRT"
PLUGIN_NAMESPACE = "exaone_deploy"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_OP_TYPE}"

INPUT_NAMES = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
)
OUTPUT_NAMES = ("output", "present_key", "present_value")
# Plugin fields, in registration order (the order TensorRT passes them to the AOT implementation).
ATTRIBUTE_TYPES = {"num_heads": int, "kv_num_heads": int, "scale": float, "window": int, "rotary": int, "ring": int}
# present_key / present_value (output index) -> past_key / past_value (input index)
ALIASED_OUTPUTS = {1: 3, 2: 4}

TACTIC_DECODE = 1  # 16-row query tiles: S * group <= 16 (decode)
TACTIC_PREFILL = 2  # 64-row query tiles: prompts and long chunks
# TensorRT launches plugin kernels with the default 48 KiB dynamic shared-memory limit.
MAX_SHARED_MEMORY = 48 * 1024

_INSTALL_HINT = (
    "TensorRT is not installed: pip install tensorrt (TensorRT >= 10.9 with the tensorrt.plugin module, and its "
    "libraries; needed for building and running TensorRT engines with the EXAONEAttention_TRT plugin)"
)

__all__ = [
    "PLUGIN_OP_TYPE",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "PLUGIN_ID",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "ATTRIBUTE_TYPES",
    "ALIASED_OUTPUTS",
    "TACTIC_DECODE",
    "TACTIC_PREFILL",
    "register_plugins",
    "is_registered",
    "add_attention_plugin",
    "AotKernel",
    "compile_aot_kernel",
    "strip_unused_trailing_params",
]

_state = {"descriptor": False, "jit": False, "aot": False}


def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise RuntimeError(_INSTALL_HINT) from e
    return trt, trtp


def is_registered() -> dict:
    """Which parts of the plugin this process registered: {"descriptor", "jit", "aot"} -> bool."""
    return dict(_state)


# ------------------------------------------------------------------------------------------------------------
# AOT kernel compilation (Triton only; no TensorRT needed, so it is testable on its own)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    shared: int
    num_warps: int
    block_r: int  # flattened query rows per program: grid_x = cdiv(S * group, block_r)


def strip_unused_trailing_params(ptx: str, kernel_name: str, keep: int) -> str:
    """Drop the kernel's parameters after the first ``keep`` from its PTX ``.entry``.

    Triton appends two hidden pointer parameters (global and profile scratch) to every kernel; TensorRT's AOT
    launch passes exactly the plugin's inputs, extra scalars and outputs. The hidden ones are unused when the
    kernel needs no scratch memory, so removing them makes the PTX signature match TensorRT's argument list.
    Raises if a dropped parameter is referenced in the body.
    """
    m = re.search(r"(\.entry\s+" + re.escape(kernel_name) + r"\s*\()(.*?)(\))", ptx, re.S)
    if m is None:
        raise ValueError(f"kernel {kernel_name!r} not found in PTX")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) <= keep:
        return ptx
    body = ptx[m.end() :]
    for p in params[keep:]:
        pname = p.split()[-1]
        if re.search(re.escape(pname) + r"\b", body):
            raise ValueError(f"PTX parameter {pname} is used by the kernel; cannot drop it")
    new_params = ",\n\t".join(params[:keep])
    return ptx[: m.start(2)] + "\n\t" + new_params + "\n" + ptx[m.end(2) :]


_N_KERNEL_ARGS = 9 + 4 + 3  # input pointers, int32 scalars (S, C, MAXPOS, PROMPT), output pointers


@functools.cache
def compile_aot_kernel(
    dtype: str,
    cache_dtype: str,
    rope_dtype: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    scale: float,
    window: int,
    rotary: int,
    ring: int,
    tactic: int,
    target: tuple[str, int, int] = None,
) -> AotKernel:
    """Compile ``_fused_attention_kernel`` to PTX for the TensorRT AOT plugin.

    dtype strings are Triton's ("fp16", "bf16", "fp32"). ``target`` is (backend, arch, warp size), e.g.
    ("cuda", 90, 32); default: the current GPU. Picks the largest tile configuration of the tactic whose
    shared memory fits the default 48 KiB launch limit.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "TRITON_INTERPRET is set: Triton kernels are interpreted, not compiled; unset it to "
            "build TensorRT engines with the AOT plugin"
        )
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels as ta

    if tactic == TACTIC_DECODE:
        candidates = [(16, 64), (16, 32)]
    else:
        candidates = [(64, 64), (64, 32), (32, 32), (16, 32)]
    gpu_target = GPUTarget(*target) if target is not None else None
    for block_r, block_n in candidates:
        cfg = ta.LaunchConfig(block_r=block_r, block_n=block_n, block_t=32, num_warps=4, num_stages=1)
        signature, constexprs = ta.fused_kernel_signature(
            dtype,
            cache_dtype,
            rope_dtype,
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            head_dim=head_dim,
            scale=scale,
            window=window,
            rotary=rotary,
            ring=ring,
            config=cfg,
        )
        src = triton.compiler.ASTSource(fn=ta._fused_attention_kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=gpu_target, options={"num_warps": cfg.num_warps, "num_stages": 1})
        md = compiled.metadata
        if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
            raise RuntimeError("the fused attention kernel unexpectedly needs Triton scratch memory")
        if md.shared <= MAX_SHARED_MEMORY:
            ptx = strip_unused_trailing_params(compiled.asm["ptx"], md.name, _N_KERNEL_ARGS)
            return AotKernel(name=md.name, ptx=ptx, shared=int(md.shared), num_warps=int(md.num_warps), block_r=block_r)
    raise RuntimeError(
        f"no tile configuration of the fused attention kernel fits {MAX_SHARED_MEMORY} bytes of "
        f"shared memory (head_dim={head_dim}, dtype={dtype})"
    )


# ------------------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------------------


def _check_attrs(num_heads, kv_num_heads, scale, window, rotary, ring) -> None:
    if num_heads <= 0 or kv_num_heads <= 0 or num_heads % kv_num_heads:
        raise ValueError(
            f"{PLUGIN_OP_TYPE}: num_heads ({num_heads}) must be a positive multiple of kv_num_heads ({kv_num_heads})"
        )
    if window < 0 or rotary not in (0, 1) or ring not in (0, 1) or scale < 0:
        raise ValueError(f"{PLUGIN_OP_TYPE}: invalid window={window} rotary={rotary} ring={ring} scale={scale}")


def register_plugins(*, aot: bool = True, jit: bool = False) -> None:
    """Register the EXAONEAttention_TRT plugin (descriptor, autotune, and the AOT and/or JIT implementation)
    with TensorRT's plugin registry. Idempotent; a later call may add the implementation an earlier one left
    out. Default: AOT only, so ONNX nodes without an ``aot`` attribute need no network flag. Raises
    RuntimeError when TensorRT is not installed."""
    trt, trtp = _import_tensorrt()

    if not _state["descriptor"]:
        _register_descriptor(trt, trtp)
        _state["descriptor"] = True
    if jit and not _state["jit"]:
        _register_jit(trt, trtp)
        _state["jit"] = True
    if aot and not _state["aot"]:
        if not hasattr(trtp, "aot_impl"):
            raise RuntimeError("this TensorRT has no tensorrt.plugin.aot_impl (AOT plugins need TensorRT >= 10.9)")
        _register_aot(trt, trtp)
        _state["aot"] = True


def _register_descriptor(trt, trtp) -> None:
    TD = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def exaone_attention_desc(
        query: TD,
        key: TD,
        value: TD,
        past_key: TD,
        past_value: TD,
        seqlens_k: TD,
        total_sequence_length: TD,
        cos_cache: TD,
        sin_cache: TD,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        window: int,
        rotary: int,
        ring: int,
    ) -> tuple[TD, TD, TD]:
        _check_attrs(num_heads, kv_num_heads, scale, window, rotary, ring)
        # output: shape and dtype of query; presents: the past buffers themselves (in-place I/O aliasing)
        return query.like(), past_key.aliased(), past_value.aliased()

    @trtp.autotune(PLUGIN_ID)
    def exaone_attention_autotune(
        query: TD,
        key: TD,
        value: TD,
        past_key: TD,
        past_value: TD,
        seqlens_k: TD,
        total_sequence_length: TD,
        cos_cache: TD,
        sin_cache: TD,
        outputs: tuple[TD, TD, TD],
    ) -> list[trtp.AutoTuneCombination]:
        # I/O positions: 0-4 inputs q,k,v,past_k,past_v; 5-6 int32 lengths; 7-8 cos/sin; 9-11 outputs.
        floats, lengths, rope = [0, 1, 2, 3, 4, 9, 10, 11], [5, 6], [7, 8]
        same = trtp.AutoTuneCombination()  # cos/sin in the model dtype (what the exporter emits)
        same.pos(floats + rope, "FP16|BF16|FP32")
        same.pos(lengths, "INT32")
        same.tactics([TACTIC_DECODE, TACTIC_PREFILL])
        f32_rope = trtp.AutoTuneCombination()  # or always float32 caches
        f32_rope.pos(floats, "FP16|BF16|FP32")
        f32_rope.pos(rope, "FP32")
        f32_rope.pos(lengths, "INT32")
        f32_rope.tactics([TACTIC_DECODE, TACTIC_PREFILL])
        return [same, f32_rope]


def _triton_dtype(trt, dtype) -> str:
    table = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    if dtype not in table:
        raise ValueError(f"{PLUGIN_OP_TYPE}: unsupported tensor dtype {dtype}")
    return table[dtype]


def _register_aot(trt, trtp) -> None:
    TD = trtp.TensorDesc

    @trtp.aot_impl(PLUGIN_ID)
    def exaone_attention_aot(
        query: TD,
        key: TD,
        value: TD,
        past_key: TD,
        past_value: TD,
        seqlens_k: TD,
        total_sequence_length: TD,
        cos_cache: TD,
        sin_cache: TD,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        window: int,
        rotary: int,
        ring: int,
        outputs: tuple[TD, TD, TD],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # NB: TensorRT passes *all* fields positionally, in registration order, to this function.
        _check_attrs(num_heads, kv_num_heads, scale, window, rotary, ring)
        head_dim_expr = past_key.shape_expr[3]
        if not head_dim_expr.is_constant:
            raise ValueError(f"{PLUGIN_OP_TYPE}: head_dim (last dim of past_key) must be static")
        kernel = compile_aot_kernel(
            _triton_dtype(trt, query.dtype),
            _triton_dtype(trt, past_key.dtype),
            _triton_dtype(trt, cos_cache.dtype),
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            head_dim=int(head_dim_expr.constant_value()),
            scale=float(scale),
            window=window,
            rotary=rotary,
            ring=ring,
            tactic=TACTIC_DECODE if tactic == TACTIC_DECODE else TACTIC_PREFILL,
        )

        from .kernels import PROMPT_FROM_TENSOR

        batch, seq = query.shape_expr[0], query.shape_expr[1]
        group = num_heads // kv_num_heads
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(seq * group, kernel.block_r)  # blocks of flattened (token, head) rows
        launch.grid_y = batch * kv_num_heads
        launch.grid_z = 1
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        # int32 kernel scalars between the input and output pointers: S, C, MAXPOS, PROMPT.
        # PROMPT_FROM_TENSOR: the kernel reads total_sequence_length from its device buffer.
        extra_args = trtp.SymIntExprs.from_tuple(
            [
                trtp.SymInt32(seq),
                trtp.SymInt32(past_key.shape_expr[2]),
                trtp.SymInt32(cos_cache.shape_expr[0]),
                trtp.SymInt32(PROMPT_FROM_TENSOR),
            ]
        )
        return kernel.name, kernel.ptx, launch, extra_args


def _as_torch(trt, t):
    """Zero-copy torch view of a trtp.Tensor (its __cuda_array_interface__ has no bfloat16: view bf16 buffers
    as int16 and reinterpret)."""
    import types

    import torch

    typestr = {
        trt.float32: ("<f4", torch.float32),
        trt.float16: ("<f2", torch.float16),
        trt.bfloat16: ("<i2", torch.bfloat16),
        trt.int32: ("<i4", torch.int32),
        trt.int64: ("<i8", torch.int64),
    }
    if t.dtype not in typestr:
        raise ValueError(f"{PLUGIN_OP_TYPE}: unsupported tensor dtype {t.dtype}")
    code, torch_dtype = typestr[t.dtype]
    view = types.SimpleNamespace(
        __cuda_array_interface__={
            "shape": tuple(int(d) for d in t.shape),
            "typestr": code,
            "data": (int(t.data_ptr), False),
            "strides": None,
            "version": 2,
        }
    )  # TensorRT LINEAR format = C-contiguous
    return torch.as_tensor(view, device="cuda").view(torch_dtype)


def _register_jit(trt, trtp) -> None:
    T = trtp.Tensor

    @trtp.impl(PLUGIN_ID)
    def exaone_attention_jit(
        query: T,
        key: T,
        value: T,
        past_key: T,
        past_value: T,
        seqlens_k: T,
        total_sequence_length: T,
        cos_cache: T,
        sin_cache: T,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
        window: int,
        rotary: int,
        ring: int,
        outputs: tuple[T, T, T],
        stream: int,
    ) -> None:
        import torch

        from .kernels import exaone_attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            q, k, v, pk, pv, lens, tsl, cos, sin = (
                _as_torch(trt, x)
                for x in (
                    query,
                    key,
                    value,
                    past_key,
                    past_value,
                    seqlens_k,
                    total_sequence_length,
                    cos_cache,
                    sin_cache,
                )
            )
            out, present_k, present_v = (_as_torch(trt, x) for x in outputs)
            if present_k.data_ptr() != pk.data_ptr():  # not aliased after all: update a copy
                present_k.copy_(pk)
            if present_v.data_ptr() != pv.data_ptr():
                present_v.copy_(pv)
            exaone_attention(
                q,
                k,
                v,
                present_k,
                present_v,
                lens,
                tsl,
                cos if rotary else None,
                sin if rotary else None,
                num_heads=num_heads,
                kv_num_heads=kv_num_heads,
                scale=scale,
                window=window,
                rotary=rotary,
                ring=ring,
                out=out,
            )


def add_attention_plugin(
    network,
    inputs,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float = 0.0,
    window: int = 0,
    rotary: int = 0,
    ring: int = 0,
    aot: bool = True,
):
    """Add the plugin to a ``trt.INetworkDefinition`` (network-API route; the ONNX parser needs none of this).

    ``inputs``: the 9 ITensors in :data:`INPUT_NAMES` order. Fields are passed in registration order and with
    exact Python types (QDP checks ``type(value)``, and hands all fields positionally to the AOT
    implementation in the order they were given). Returns the plugin layer; outputs 1 and 2 alias inputs 3/4.
    """
    _, trtp = _import_tensorrt()
    register_plugins(aot=aot, jit=not aot)
    if len(inputs) != len(INPUT_NAMES):
        raise ValueError(f"{PLUGIN_OP_TYPE} takes {len(INPUT_NAMES)} inputs {INPUT_NAMES}, got {len(inputs)}")
    fields = dict(
        num_heads=int(num_heads),
        kv_num_heads=int(kv_num_heads),
        scale=float(scale),
        window=int(window),
        rotary=int(rotary),
        ring=int(ring),
    )
    op = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_OP_TYPE)
    return network.add_plugin(op(*inputs, **fields), aot=aot)
