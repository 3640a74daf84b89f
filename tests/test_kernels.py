"""Triton attention kernels (exaone_deploy.tensorrt.kernels) against the NumPy reference
(exaone_deploy.opref.attention_ref), and the TensorRT plugin module (exaone_deploy.tensorrt.plugin).

The kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is imported), so the
shapes are small. With TRITON_INTERPRET=0 set explicitly and a CUDA GPU, the same tests run compiled on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip(
    "triton",
    reason="triton is not installed (pip install triton): the kernel tests need it, in interpreter mode on CPU",
)

from exaone_deploy import opref  # noqa: E402
from exaone_deploy.tensorrt import kernels as ta  # noqa: E402
from exaone_deploy.tensorrt import plugin as trt_plugin  # noqa: E402

INTERPRET = type(ta._attention_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_device = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="TRITON_INTERPRET=0 and no CUDA device"
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max abs error of the output; cache entries are compared to within one rounding of their dtype
OUT_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 3e-2}
CACHE_RTOL = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 8e-3}
# small tiles: several row blocks, key blocks and write blocks even at these sizes
SMALL = ta.LaunchConfig(block_r=16, block_n=16, block_t=4, num_warps=4, num_stages=1)


def make_case(seed, *, B, S, N, Nkv, H, C, lens, prompt, dtype, maxpos=64):
    """Random inputs (already rounded to `dtype`) plus everything the reference needs."""
    rng = np.random.default_rng(seed)
    td = DTYPES[dtype]

    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(td)

    cos, sin = opref.rope_cache(opref.default_inv_freq(H, 10000.0), maxpos)
    seqlens = np.asarray(lens, dtype=np.int32)
    assert seqlens.shape == (B,)
    return dict(
        q=rand(B, S, N * H),
        k=rand(B, S, Nkv * H),
        v=rand(B, S, Nkv * H),
        past_k=rand(B, Nkv, C, H),
        past_v=rand(B, Nkv, C, H),
        seqlens=seqlens,
        tsl=S if prompt else int(seqlens.max()) + 1,
        cos=torch.from_numpy(cos).to(td),
        sin=torch.from_numpy(sin).to(td),
        N=N,
        Nkv=Nkv,
        dtype=dtype,
    )


def run_ref(case, *, window, rotary, ring, past_k=None, past_v=None):
    f = lambda t: t.float().numpy()  # noqa: E731
    return opref.attention_ref(
        f(case["q"]),
        f(case["k"]),
        f(case["v"]),
        f(case["past_k"] if past_k is None else past_k),
        f(case["past_v"] if past_v is None else past_v),
        case["seqlens"],
        case["tsl"],
        f(case["cos"]),
        f(case["sin"]),
        num_heads=case["N"],
        kv_num_heads=case["Nkv"],
        window=window,
        rotary=rotary,
        ring=ring,
    )


def run_kernels(case, *, window, rotary, ring, mode, config=SMALL, tsl_tensor=False):
    """Our op on copies of the case's caches; returns (out, present_k, present_v) as float numpy arrays."""
    d = lambda t: t.to(DEVICE)  # noqa: E731
    pk, pv = d(case["past_k"].clone()), d(case["past_v"].clone())
    tsl = torch.tensor([case["tsl"]], dtype=torch.int32, device=DEVICE) if tsl_tensor else case["tsl"]
    out = ta.exaone_attention(
        d(case["q"]),
        d(case["k"]),
        d(case["v"]),
        pk,
        pv,
        d(torch.from_numpy(case["seqlens"])),
        tsl,
        d(case["cos"]) if rotary else None,
        d(case["sin"]) if rotary else None,
        num_heads=case["N"],
        kv_num_heads=case["Nkv"],
        window=window,
        rotary=rotary,
        ring=ring,
        fused=(mode == "fused"),
        num_splits=3 if mode == "splitkv" else 1,
        config=config,
    )
    return out.float().cpu().numpy(), pk.float().cpu().numpy(), pv.float().cpu().numpy()


def assert_matches(case, ours, ref):
    dtype = case["dtype"]
    out, pk, pv = ours
    ref_out, ref_k, ref_v = (np.asarray(x, dtype=np.float64) for x in ref)
    err = np.abs(out - ref_out).max()
    assert err <= OUT_TOL[dtype], f"output max abs error {err:.3g} > {OUT_TOL[dtype]} ({dtype})"
    for name, got, want in (("present_key", pk, ref_k), ("present_value", pv, ref_v)):
        # slots this step does not write must be untouched (then the difference is exactly 0)
        excess = np.abs(got - want) - CACHE_RTOL[dtype] * np.maximum(np.abs(want), 1.0)
        assert excess.max() <= 0, f"{name} differs from the reference by {np.abs(got - want).max():.3g} ({dtype})"


# (id, case kwargs, op attributes)
CASES = [
    # prompt, global, RoPE, GQA 1, right-padded rows of 6, 3 and 1 tokens
    (
        "prompt-global-rope-gqa1-fp32",
        dict(B=3, S=7, N=2, Nkv=2, H=32, C=8, lens=[5, 2, 0], prompt=True, dtype="fp32"),
        dict(window=0, rotary=1, ring=0),
    ),
    (
        "prompt-window-rope-gqa4-fp32",
        dict(B=2, S=9, N=8, Nkv=2, H=32, C=12, lens=[8, 3], prompt=True, dtype="fp32"),
        dict(window=3, rotary=1, ring=0),
    ),
    (
        "prompt-window-nope-gqa5-fp16",
        dict(B=2, S=6, N=10, Nkv=2, H=64, C=8, lens=[5, 1], prompt=True, dtype="fp16"),
        dict(window=2, rotary=0, ring=0),
    ),
    # decode: S=1, rows with 1, 18 and 40 tokens after the step (the last one fills the cache exactly)
    (
        "decode-global-rope-gqa5-fp32",
        dict(B=3, S=1, N=5, Nkv=1, H=32, C=40, lens=[0, 17, 39], prompt=False, dtype="fp32"),
        dict(window=0, rotary=1, ring=0),
    ),
    (
        "decode-global-nope-gqa4-fp16",
        dict(B=2, S=1, N=8, Nkv=2, H=64, C=24, lens=[3, 22], prompt=False, dtype="fp16"),
        dict(window=0, rotary=0, ring=0),
    ),
    # decode into a ring buffer that has wrapped around several times
    (
        "decode-ring-wrap-window-gqa4-fp16",
        dict(B=2, S=1, N=4, Nkv=1, H=64, C=8, lens=[5, 29], prompt=False, dtype="fp16"),
        dict(window=8, rotary=1, ring=1),
    ),
    (
        "decode-ring-wrap-window-gqa5-bf16",
        dict(B=2, S=1, N=10, Nkv=2, H=32, C=6, lens=[2, 33], prompt=False, dtype="bf16"),
        dict(window=5, rotary=1, ring=1),
    ),
    # chunk continuation (S > 1, all tokens real)
    (
        "chunk-linear-window-gqa1-fp32",
        dict(B=2, S=5, N=2, Nkv=2, H=32, C=24, lens=[9, 20], prompt=False, dtype="fp32"),
        dict(window=4, rotary=1, ring=0),
    ),
    (
        "chunk-linear-global-gqa5-fp16",
        dict(B=2, S=4, N=5, Nkv=1, H=64, C=16, lens=[3, 12], prompt=False, dtype="fp16"),
        dict(window=0, rotary=1, ring=0),
    ),
    # chunk into a wrapped ring whose writes clobber slots other queries of the chunk still read
    (
        "chunk-ring-wrap-clobber-gqa4-fp32",
        dict(B=2, S=5, N=4, Nkv=1, H=32, C=8, lens=[20, 13], prompt=False, dtype="fp32"),
        dict(window=6, rotary=1, ring=1),
    ),
    (
        "chunk-ring-wrap-gqa1-fp16",
        dict(B=2, S=3, N=2, Nkv=2, H=64, C=10, lens=[14, 40], prompt=False, dtype="fp16"),
        dict(window=7, rotary=1, ring=1),
    ),
    # prompt longer than the ring: only the last C tokens are kept
    (
        "prompt-ring-longer-than-cache-gqa4-fp32",
        dict(B=2, S=11, N=8, Nkv=2, H=32, C=4, lens=[10, 2], prompt=True, dtype="fp32"),
        dict(window=4, rotary=1, ring=1),
    ),
]


@needs_device
@pytest.mark.parametrize("mode", ["kernels", "splitkv", "fused"])
@pytest.mark.parametrize("case_id,shape,attrs", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case_id, shape, attrs, mode):
    case = make_case(zlib.crc32(case_id.encode()), **shape)
    assert_matches(case, run_kernels(case, mode=mode, **attrs), run_ref(case, **attrs))


@needs_device
@pytest.mark.parametrize("mode", ["kernels", "fused"])
def test_default_tiles_and_total_length_tensor(mode):
    """Default launch configuration, and total_sequence_length given as a device tensor (TensorRT's case)."""
    attrs = dict(window=5, rotary=1, ring=0)
    for i, (shape, tsl_tensor) in enumerate(
        [
            (dict(B=2, S=20, N=5, Nkv=1, H=32, C=24, lens=[19, 7], prompt=True, dtype="fp32"), True),
            (dict(B=2, S=3, N=5, Nkv=1, H=32, C=24, lens=[4, 21], prompt=False, dtype="fp32"), True),
            (dict(B=1, S=1, N=4, Nkv=1, H=64, C=24, lens=[12], prompt=False, dtype="fp16"), False),
        ]
    ):
        case = make_case(100 + i, **shape)
        ours = run_kernels(case, mode=mode, config=None, tsl_tensor=tsl_tensor, **attrs)
        assert_matches(case, ours, run_ref(case, **attrs))


@needs_device
@pytest.mark.parametrize("mode", ["kernels", "fused"])
def test_generation_loop_ring_buffer(mode):
    """Prompt, then decode steps and a second chunk through a small ring buffer, carrying the cache from step
    to step (ours in place, the reference's presents), as a runtime does."""
    B, N, Nkv, H, C, W = 2, 4, 2, 32, 6, 5
    attrs = dict(window=W, rotary=1, ring=1)
    steps = [(7, True, [6, 3])] + [(1, False, [6 + i, 3 + i]) for i in range(1, 6)] + [(4, False, [15, 12])]
    ref_k = ref_v = None
    our_k = our_v = None
    for i, (S, prompt, lens) in enumerate(steps):
        case = make_case(200 + i, B=B, S=S, N=N, Nkv=Nkv, H=H, C=C, lens=lens, prompt=prompt, dtype="fp32")
        if ref_k is None:  # the first step starts from garbage caches
            ref_k, ref_v = case["past_k"].numpy(), case["past_v"].numpy()
            our_k, our_v = case["past_k"].clone().to(DEVICE), case["past_v"].clone().to(DEVICE)
        ref_out, ref_k, ref_v = run_ref(case, past_k=torch.from_numpy(ref_k), past_v=torch.from_numpy(ref_v), **attrs)
        out = ta.exaone_attention(
            case["q"].to(DEVICE),
            case["k"].to(DEVICE),
            case["v"].to(DEVICE),
            our_k,
            our_v,
            torch.from_numpy(case["seqlens"]).to(DEVICE),
            case["tsl"],
            case["cos"].to(DEVICE),
            case["sin"].to(DEVICE),
            num_heads=N,
            kv_num_heads=Nkv,
            fused=(mode == "fused"),
            config=SMALL,
            **attrs,
        )
        assert np.abs(out.cpu().numpy() - ref_out).max() <= 1e-5, f"step {i}"
        assert np.abs(our_k.cpu().numpy() - ref_k).max() <= 1e-5, f"step {i}"
        assert np.array_equal(our_v.cpu().numpy(), ref_v), f"step {i}"


@needs_device
def test_rejects_bad_arguments():
    case = make_case(0, B=1, S=2, N=4, Nkv=2, H=32, C=8, lens=[1], prompt=True, dtype="fp32")
    args = (case["q"], case["k"], case["v"], case["past_k"], case["past_v"], torch.from_numpy(case["seqlens"]), 2)
    with pytest.raises(ValueError, match="multiple"):
        ta.exaone_attention(*args, num_heads=4, kv_num_heads=3)
    with pytest.raises(ValueError, match="cos_cache"):
        ta.exaone_attention(*args, num_heads=4, kv_num_heads=2, rotary=1)
    with pytest.raises(ValueError, match="contiguous"):
        strided = case["past_k"].transpose(2, 3).contiguous().transpose(2, 3)  # same shape, not contiguous
        ta.exaone_attention(
            case["q"],
            case["k"],
            case["v"],
            strided,
            case["past_v"],
            torch.from_numpy(case["seqlens"]),
            2,
            num_heads=4,
            kv_num_heads=2,
        )
    with pytest.raises(ValueError, match="int32"):
        ta.exaone_attention(*args[:5], torch.tensor([1]), 2, num_heads=4, kv_num_heads=2)


# ---- TensorRT plugin module (no TensorRT needed) -----------------------------------------------------------


def test_plugin_constants():
    assert trt_plugin.PLUGIN_OP_TYPE == "EXAONEAttention_TRT"
    assert trt_plugin.PLUGIN_NAMESPACE == "exaone_deploy"
    assert trt_plugin.PLUGIN_VERSION == "1"
    assert trt_plugin.PLUGIN_ID == "exaone_deploy::EXAONEAttention_TRT"
    assert list(trt_plugin.ATTRIBUTE_TYPES) == ["num_heads", "kv_num_heads", "scale", "window", "rotary", "ring"]
    assert len(trt_plugin.INPUT_NAMES) == 9 and len(trt_plugin.OUTPUT_NAMES) == 3
    assert trt_plugin.ALIASED_OUTPUTS == {1: 3, 2: 4}


def test_register_without_tensorrt_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)
    with pytest.raises(RuntimeError, match=r"TensorRT is not installed: pip install tensorrt .*needed for"):
        trt_plugin.register_plugins()


def test_fused_kernel_parameter_order_is_tensorrt_aot_order():
    """TensorRT's AOT launch passes input pointers, then the extra int32 scalars, then output pointers."""
    import inspect

    params = list(inspect.signature(ta._fused_attention_kernel.fn).parameters)
    sig, constexprs = ta.fused_kernel_signature(
        "fp16",
        "fp16",
        "fp32",
        num_heads=40,
        kv_num_heads=8,
        head_dim=128,
        scale=0.0,
        window=4096,
        rotary=1,
        ring=1,
        config=ta.LaunchConfig(),
    )
    assert list(sig) == params
    runtime = [p for p in params if sig[p] != "constexpr"]
    kinds = [sig[p] for p in runtime]
    assert len(runtime) == 16
    assert all(k.startswith("*") for k in kinds[:9]) and kinds[5:7] == ["*i32", "*i32"]
    assert kinds[9:13] == ["i32"] * 4 and all(k.startswith("*") for k in kinds[13:])
    assert constexprs["QK_SCALE"] == pytest.approx(ta.LOG2E / np.sqrt(128))


def test_strip_unused_trailing_params():
    ptx = textwrap.dedent("""\
        .visible .entry kern(
        \t.param .u64 .ptr .global .align 1 kern_param_0,
        \t.param .u32 kern_param_1,
        \t.param .u64 .ptr .global .align 1 kern_param_2,
        \t.param .u64 .ptr .global .align 1 kern_param_3
        )
        {
        \tld.param.u64 %rd1, [kern_param_0];
        \tld.param.u32 %r1, [kern_param_1];
        }
        """)
    out = trt_plugin.strip_unused_trailing_params(ptx, "kern", 2)
    assert "kern_param_1" in out and "kern_param_2" not in out and "kern_param_3" not in out
    with pytest.raises(ValueError, match="used"):
        trt_plugin.strip_unused_trailing_params(ptx, "kern", 1)


def test_aot_kernel_compiles_to_ptx_with_tensorrt_argument_list():
    """Compile the AOT kernel for sm_90 (no GPU needed) in a fresh interpreter without TRITON_INTERPRET."""
    code = textwrap.dedent("""\
        import re
        from exaone_deploy.tensorrt import plugin as tp
        k = tp.compile_aot_kernel("fp16", "fp16", "fp16", num_heads=40, kv_num_heads=8, head_dim=128, scale=0.0,
                                  window=4096, rotary=1, ring=1, tactic=tp.TACTIC_DECODE, target=("cuda", 90, 32))
        entry = re.search(r"\\.entry\\s+" + k.name + r"\\s*\\((.*?)\\)", k.ptx, re.S).group(1)
        print("PARAMS", len([p for p in entry.split(",") if p.strip()]), "SHARED", k.shared, "ROWS", k.block_r)
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        if "GPUTarget" in proc.stderr or "backend" in proc.stderr.lower() and "cuda" in proc.stderr.lower():
            pytest.skip(f"this triton cannot compile for CUDA here: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr[-3000:])
    fields = proc.stdout.split()
    assert fields[fields.index("PARAMS") + 1] == "16"  # 9 inputs + 4 scalars + 3 outputs, scratch params dropped
    assert int(fields[fields.index("SHARED") + 1]) <= trt_plugin.MAX_SHARED_MEMORY
    assert fields[fields.index("ROWS") + 1] == "16"


def test_register_plugin_with_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("tensorrt.plugin", reason="this TensorRT has no tensorrt.plugin module")
    trt_plugin.register_plugins(aot=True, jit=True)
    trt_plugin.register_plugins()  # idempotent
    creator = trt.get_plugin_registry().get_creator(
        trt_plugin.PLUGIN_OP_TYPE, trt_plugin.PLUGIN_VERSION, trt_plugin.PLUGIN_NAMESPACE
    )
    assert creator is not None
    assert trt_plugin.is_registered() == {"descriptor": True, "jit": True, "aot": True}
