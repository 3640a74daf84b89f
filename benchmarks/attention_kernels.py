"""Decode-attention benchmark: our Triton kernels (exaone_deploy.tensorrt.kernels) vs torch SDPA.

For EXAONE 4.0 head shapes (32B: 40/8 heads, head_dim 128; 1.2B: 32/8, 64) at 4k and 32k context, in fp16
and bf16, for a global layer (linear cache, every past key read) and a local layer (4096-token sliding window
in a 4096-slot ring buffer). One decode step (S=1): ours = RoPE + cache write + attention, as the op does;
torch = F.scaled_dot_product_attention (GQA) over the same, already updated cache. Both are timed as CUDA
graphs (no Python launch overhead), and ours is checked against torch on the same data.

GB/s counts the K/V bytes a step must read (keys in the window x 2 x Nkv x head_dim x itemsize x batch).

    python benchmarks/attention_kernels.py [--batch 1] [--iters 200]

Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

MODELS = {"EXAONE-4.0-32B": (40, 8, 128), "EXAONE-4.0-1.2B": (32, 8, 64)}
WINDOW = 4096


def _graph_time_us(fn, iters: int) -> float:
    """Mean time of fn() in microseconds, replayed from a CUDA graph."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up (compiles Triton kernels) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def _rope(x, cos, sin):
    """Rotate-half RoPE in fp32, rounded back to x's dtype (what the kernel does to q)."""
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _sdpa(q, k, v):
    """GQA SDPA; q (B,N,1,H), k/v (B,Nkv,T,H)."""
    import torch.nn.functional as F

    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))


def bench_case(
    model: str,
    dtype_name: str,
    kind: str,
    ctx: int,
    batch: int,
    iters: int,
    *,
    window: int = WINDOW,
    device: str = "cuda",
) -> dict:
    """One row of the table. ``device="cpu"`` (with TRITON_INTERPRET=1) runs only the correctness check."""
    import torch

    from exaone_deploy import opref
    from exaone_deploy.tensorrt.kernels import exaone_attention

    N, Nkv, H = MODELS[model]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    dev = torch.device(device)
    ring = kind == "window-ring"
    if ring and ctx < window:
        raise ValueError("window-ring rows need ctx >= window (every ring slot holds a real key)")
    C = window if ring else ctx + 1  # ring: exactly the window; global: a linear cache with room for 1 more
    keys = window if ring else ctx + 1  # keys the new token attends to
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    cache_k, cache_v = randn(batch, Nkv, C, H), randn(batch, Nkv, C, H)
    q, k, v = randn(batch, 1, N * H), randn(batch, 1, Nkv * H), randn(batch, 1, Nkv * H)
    inv = opref.llama3_inv_freq(H, 1e6, 16.0, 1.0, 4.0, 8192)
    cos_np, sin_np = opref.rope_cache(inv, ctx + 8)
    cos, sin = torch.from_numpy(cos_np).to(dev, dtype), torch.from_numpy(sin_np).to(dev, dtype)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)  # ctx tokens cached, 1 new
    tsl = ctx + 1
    kw = dict(num_heads=N, kv_num_heads=Nkv, window=window if ring else 0, rotary=1, ring=int(ring))

    # correctness: our step on copies of the cache, then torch SDPA on the updated copy (for the ring: the
    # whole buffer = the window, the overwritten slot held the one position that just left the window)
    ck, cv = cache_k.clone(), cache_v.clone()
    ours = exaone_attention(q, k, v, ck, cv, seqlens, tsl, cos, sin, **kw)
    fused_k, fused_v = cache_k.clone(), cache_v.clone()
    ours_fused = exaone_attention(q, k, v, fused_k, fused_v, seqlens, tsl, cos, sin, fused=True, **kw)
    qr = _rope(q.view(batch, 1, N, H), cos[ctx].float(), sin[ctx].float()).transpose(1, 2)  # (B,N,1,H)
    ref = _sdpa(qr, ck, cv).transpose(1, 2).reshape(batch, 1, N * H)
    err = max((ours.float() - ref.float()).abs().max().item(), (ours_fused.float() - ref.float()).abs().max().item())
    cache_ok = torch.equal(ck, fused_k) and torch.equal(cv, fused_v)
    row = dict(model=model, dtype=dtype_name, kind=kind, ctx=ctx, batch=batch, keys=keys, err=err, cache_ok=cache_ok)
    if dev.type != "cuda":
        return row

    ours_us = _graph_time_us(lambda: exaone_attention(q, k, v, ck, cv, seqlens, tsl, cos, sin, **kw), iters)
    fused_us = _graph_time_us(
        lambda: exaone_attention(q, k, v, fused_k, fused_v, seqlens, tsl, cos, sin, fused=True, **kw), iters
    )
    sdpa_us = _graph_time_us(lambda: _sdpa(qr, ck, cv), iters)
    nbytes = 2 * batch * Nkv * keys * H * torch.finfo(dtype).bits // 8
    row.update(
        ours_us=ours_us,
        fused_us=fused_us,
        sdpa_us=sdpa_us,
        ours_gbs=nbytes / ours_us / 1e3,
        fused_gbs=nbytes / fused_us / 1e3,
        sdpa_gbs=nbytes / sdpa_us / 1e3,
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("attention_kernels: torch is not installed; nothing to benchmark.")
        return 0
    if not torch.cuda.is_available():
        print("attention_kernels: no CUDA device found; this benchmark needs a GPU. Skipping.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("attention_kernels: triton is not installed (pip install triton). Skipping.")
        return 0

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}  "
        f"decode step (S=1), CUDA-graph timings over {args.iters} replays"
    )
    head = (
        f"{'model':<16} {'dtype':<5} {'attention':<12} {'ctx':>6} {'keys':>6} | {'ours us':>8} {'GB/s':>6} | "
        f"{'fused us':>8} {'GB/s':>6} | {'sdpa us':>8} {'GB/s':>6} | {'speedup':>7} {'max err':>8}"
    )
    print(head)
    print("-" * len(head))
    failures = 0
    for model in args.models:
        for dtype_name in args.dtypes:
            for kind in ("global", "window-ring"):
                for ctx in args.contexts:
                    r = bench_case(model, dtype_name, kind, ctx, args.batch, args.iters)
                    ok = r["err"] <= 3e-2 and r["cache_ok"] and math.isfinite(r["err"])
                    failures += not ok
                    print(
                        f"{r['model']:<16} {r['dtype']:<5} {r['kind']:<12} {r['ctx']:>6} {r['keys']:>6} | "
                        f"{r['ours_us']:>8.1f} {r['ours_gbs']:>6.0f} | "
                        f"{r['fused_us']:>8.1f} {r['fused_gbs']:>6.0f} | "
                        f"{r['sdpa_us']:>8.1f} {r['sdpa_gbs']:>6.0f} | {r['sdpa_us'] / r['ours_us']:>6.2f}x "
                        f"{r['err']:>8.1e}{'' if ok else '  MISMATCH'}"
                    )
    print(
        "ours = split-KV attention + cache-update kernels (torch/JIT path); fused = the single kernel of the "
        "TensorRT AOT plugin; sdpa = torch SDPA (GQA) on the updated cache, attention only."
    )
    if failures:
        print(f"{failures} case(s) did not match torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
