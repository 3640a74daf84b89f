"""Generation benchmark: ours (ONNX Runtime bundle + Python loop) against transformers and onnxruntime-genai.

    python benchmarks/generate.py                                  # 1.2B shape, fp32, batch 1 and 4
    python benchmarks/generate.py --systems ours,genai --batch 1 --new-tokens 16
    python benchmarks/generate.py --bundle /path/to/int8-bundle=ours-int8 --json

An EXAONE-4.0-1.2B-shaped model with random weights (hidden 2048, 30 layers, 32/8 heads of 64, vocab 102400,
tied embeddings), a ``--prompt-len`` token prompt (random ids, the same for every system), ``--new-tokens``
greedy tokens with end-of-sequence ignored, at each ``--batch`` size (rows of equal length, no padding):

* ``ours``: the fp32 ``ort`` bundle through ``Generator`` over ``OrtBackend`` (IO binding, in-place KV cache),
  prompts longer than ``--prefill-chunk`` (512, the runtime's default; llama-bench's ubatch is 512 too) prefilled
  in chunks; ``--one-step-prefill LABEL`` runs a row with the whole prompt in one step.
* ``transformers``: ``Exaone4ForCausalLM`` (sdpa, float32) ``generate`` with ``min_new_tokens``.
* ``genai`` / ``genai-int4`` / ``genai-int8``: onnxruntime-genai's C++ generation loop on models built by its
  model builder (``-e cpu -p fp32|int4|int8``). It refuses EXAONE, so it runs a Qwen3 *twin*: a Qwen3
  checkpoint with identical sizes holding the very same weight bytes (the EXAONE tensors renamed; Qwen3 is
  pre-norm where EXAONE is post-norm, which changes no byte and no FLOP per token).
* ``genai-thp``: ``genai`` again, started under the same huge-page ``malloc`` setting as ours (below), to show
  how much of a difference is that setting.
* ``genai-ours`` / ``genai-ours-int4``: onnxruntime-genai's C++ loop on *our* bundle (its ``genai.onnx``, the
  same weights and kernels as ``model.onnx``; int4 = ``quantize --scheme int4-rtn``): the difference to ``ours``
  is our Python loop's overhead. ``ours-int4``: that int4 bundle through our runtime.
* ``--bundle PATH[=LABEL]``: any other bundle (a quantized one, say) through our runtime, as an extra row.
* ``llamacpp-f32`` / ``llamacpp-q8_0`` / ``llamacpp-q4_0``: llama.cpp's ``llama-bench`` on GGUF files converted
  from the same checkpoint (``benchmarks/llamacpp.py``: ``LLAMA_CPP_BIN`` points at a build, or
  ``--build-llamacpp`` builds one from the ``llama-cpp-python`` sdist). Batch 1; prefill of the same prompt length
  from an empty context, decode at context depth ``--prompt-len`` (``-d``), where ours decodes. Its peers: ``ours``
  (fp32) against F32, ``--bundle`` rows by their manifest's scheme (int8-sq against Q8_0, int4-* against Q4_0):
  the ``/llama.cpp`` columns are medians of within-round ratios like the others.

Ours runs the way the ``exaone-deploy`` command runs it: its interpreter is started under
``exaone_deploy.runtime.hugepages.hugepage_env()`` (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` where THP is in
``madvise`` mode), so ONNX Runtime's pre-packed weights sit in 2 MiB pages. The peers run as they come.

Each (system, batch) runs in its own fresh interpreter, one after another, with the same thread count
(``--threads``, default all cores): load, one warm-up generation of 2 tokens, then ``--repeats`` timed
generations (best kept). All of that is repeated for ``--rounds`` interleaved rounds (the systems' order rotates
from round to round): this shared machine's bandwidth drifts by up to 2x over minutes, so a ratio between two
systems is taken within each round, from neighbouring measurements, and the table shows the median over rounds
(with its min-max); each system's own figures are from its best round, and also given as the median (min-max)
over rounds, decode also as a fraction of the ceiling of its own round's bandwidth. Reported: load time, time to first
token (prompt in -> first token out), prefill tok/s (batch x prompt / TTFT), decode tok/s
(batch x (new - 1) / time from the first token to the last),
peak RSS (VmHWM of that interpreter, also as a multiple of the fp32 weights) and peak anonymous RSS (sampled;
VmHWM also counts clean page-cache pages of memory-mapped weight files). The machine's read bandwidth is
measured in the same run (over a 2 GiB float32 array: BLAS sgemv, sums one slice per thread, a 1-thread
sum; best of several) and gives each system's decode ceiling: batch x bandwidth / the weight bytes it reads per step
(``GB/tok``: its initializers or parameters, the embedding gather excluded, the LM head counted). Ratios are
against transformers and against genai fp32 at the same batch size, from this one run. Ours and transformers
run the same checkpoint: the table says whether their greedy tokens agree.

Other processes: each measurement records the cores the rest of the machine used meanwhile (``other_load``,
from ``/proc/stat`` minus our own CPU time). Above ``--max-other-load`` (0.25 cores) it waits for a quiet
machine and measures again (``--retries``); a measurement still disturbed is kept in the JSON but left out of
every figure. llama.cpp's spin-waiting worker threads collapse when a neighbour takes one of 2 cores (decode
0.7-1.8 tok/s against 26-47 quiet, in one run), so an unguarded round compares the neighbour, not the kernels.

Artifacts are built once and cached under ``--workdir``: the fp32 checkpoint (5.1 GB), our bundle (6.0 GB),
the genai models (fp32 5.1 GB, int4 0.8 GB, int8 2.3 GB). The Qwen3 twin (5.1 GB) is only the genai
builder's input and is deleted once they are built. ``--layers N`` shrinks the model's depth for a quick
check of the script (widths stay full size; its artifacts are cached separately).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import current_rss_bytes, emit, fmt_bytes, peak_rss_bytes, print_table, run_isolated  # noqa: E402

from exaone_deploy.bundle import atomic_dir  # noqa: E402
from exaone_deploy.runtime.generate import PREFILL_CHUNK  # noqa: E402
from exaone_deploy.runtime.hugepages import hugepage_env  # noqa: E402

log = logging.getLogger("bench.generate")

SYSTEMS = (
    "ours",
    "transformers",
    "genai",
    "genai-int4",
    "genai-int8",
    "genai-thp",
    "llamacpp-f32",
    "llamacpp-q8_0",
    "llamacpp-q4_0",
    "genai-ours",
    "genai-ours-int4",
    "ours-int4",
)
LLAMACPP_PRECISION = {"llamacpp-f32": "f32", "llamacpp-q8_0": "q8_0", "llamacpp-q4_0": "q4_0"}
LLAMACPP_PEER = {
    None: "llamacpp-f32",
    "int8-sq": "llamacpp-q8_0",
    "int4-awq": "llamacpp-q4_0",
    "int4-rtn": "llamacpp-q4_0",
}  # our bundle's quantization scheme -> the llama.cpp row it is held to
# Our bundles, fp32 or int4 (``quantize --scheme int4-rtn``), through our Python loop or genai's C++ loop.
OUR_BUNDLES = {"genai-ours": ("fp32", "genai"), "genai-ours-int4": ("int4", "genai"), "ours-int4": ("int4", "ours")}
GENAI_PRECISION = {"genai": "fp32", "genai-int4": "int4", "genai-int8": "int8", "genai-thp": "fp32"}
GiB = 1 << 30


# ---- artifacts (each built once under --workdir, written to a temporary sibling and renamed) -----------------


def _suffix(layers: int | None) -> str:
    return f"-L{layers}" if layers else ""


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_checkpoint(workdir: Path, layers: int | None) -> Path:
    """The 1.2B-shaped fp32 EXAONE 4.0 checkpoint (``make_tiny(dir, '1.2b-full', dtype='float32')``)."""
    out = workdir / f"exaone4-1.2b-shape-fp32{_suffix(layers)}"
    if (out / "config.json").is_file():
        return out
    from exaone_deploy.tiny.make import make_tiny

    print(f"writing the random-weight checkpoint {out} ...", file=sys.stderr)
    return make_tiny(out, "1.2b-full", seed=0, num_layers=layers, dtype="float32")


def _export(ckpt: Path, out: Path) -> None:  # runs in its own interpreter (the export holds GBs)
    _quiet()
    from exaone_deploy.exporter.export import ExportOptions, export_bundle

    export_bundle(ckpt, out, ExportOptions(target="ort", dtype="float32", max_seq_len=4096), force=True, progress=False)


def build_bundle(workdir: Path, layers: int | None) -> Path:
    """Our fp32 ``ort`` bundle of that checkpoint."""
    out = workdir / f"exaone4-1.2b-shape-fp32{_suffix(layers)}-ort"
    if (out / "manifest.json").is_file():
        return out
    ckpt = build_checkpoint(workdir, layers)
    print(f"exporting {ckpt} -> {out} ...", file=sys.stderr)
    run_isolated(_export, ckpt, out)
    return out


# EXAONE 4 (post-norm) -> Qwen3 (pre-norm): the same two norms per layer under other names.
_QWEN3_NAMES = {"post_attention_layernorm": "input_layernorm", "post_feedforward_layernorm": "post_attention_layernorm"}


def _qwen3_name(name: str) -> str:
    parts = name.split(".")
    return ".".join(_QWEN3_NAMES.get(p, p) for p in parts)


def build_qwen3_twin(workdir: Path, layers: int | None) -> Path:
    """A Qwen3 checkpoint with the EXAONE checkpoint's sizes and bytes (tensors renamed, data copied as is).

    Written shard by shard with a rewritten safetensors header and the data block streamed over, so it needs
    no memory to speak of (``Qwen3ForCausalLM(config)`` would hold 5 GB); the config comes from transformers'
    own ``Qwen3Config``, so its spelling is what transformers and the genai builder expect.
    """
    import transformers

    out = workdir / f"qwen3-twin-1.2b-shape-fp32{_suffix(layers)}"
    if (out / "config.json").is_file():
        return out
    src = build_checkpoint(workdir, layers)
    cfg = json.loads((src / "config.json").read_text())
    print(f"writing the Qwen3 twin {out} ...", file=sys.stderr)
    with atomic_dir(out, replaceable=Path.is_dir) as tmp:  # the benchmark's own work dir: leftovers replaced
        index = json.loads((src / "model.safetensors.index.json").read_text())
        for file in sorted(set(index["weight_map"].values())):
            with open(src / file, "rb") as f, open(tmp / file, "wb") as g:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                header = {k if k == "__metadata__" else _qwen3_name(k): v for k, v in header.items()}
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                g.write(len(raw).to_bytes(8, "little") + raw)
                shutil.copyfileobj(f, g, 1 << 24)
        index["weight_map"] = {_qwen3_name(k): v for k, v in index["weight_map"].items()}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = transformers.Qwen3Config(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"],
            tie_word_embeddings=cfg["tie_word_embeddings"],
            max_position_embeddings=4096,
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=float(cfg["rope_theta"]),
            bos_token_id=cfg["bos_token_id"],
            eos_token_id=cfg["eos_token_id"],
            pad_token_id=cfg["pad_token_id"],
            dtype="float32",
        )
        config.architectures = ["Qwen3ForCausalLM"]
        config.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copy(src / name, tmp / name)
    return out


def build_genai(workdir: Path, layers: int | None, precision: str) -> Path:
    """``python -m onnxruntime_genai.models.builder -i TWIN -o OUT -p PRECISION -e cpu``."""
    out = workdir / f"genai-qwen3-twin-1.2b-shape{_suffix(layers)}-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise RuntimeError(
            "onnxruntime-genai is not installed (pip install --no-deps onnxruntime-genai==0.18.0; "
            "it needs onnxruntime >= 1.31, which --no-deps keeps as it is)"
        )
    twin = build_qwen3_twin(workdir, layers)
    print(f"building onnxruntime-genai {precision} model {out} ...", file=sys.stderr)
    cache = Path(tempfile.mkdtemp(prefix=".genai-cache-", dir=workdir))
    try:
        with atomic_dir(out, replaceable=Path.is_dir) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(twin),
                "-o",
                str(tmp),
                "-p",
                precision,
                "-e",
                "cpu",
                "-c",
                str(cache),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
                raise RuntimeError(
                    f"the onnxruntime-genai builder failed for {twin} (-p {precision}):\n"
                    + (proc.stdout + proc.stderr)[-3000:]
                )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def _quantize_int4(src: Path, out: Path) -> None:  # runs in its own interpreter
    _quiet()
    from exaone_deploy.calibration.quantize import QuantOptions, quantize

    quantize(src, out, QuantOptions("int4-rtn"), force=True)


def build_our_bundle(workdir: Path, layers: int | None, precision: str) -> Path:
    """Our ``ort`` bundle at ``precision`` (fp32: ``build_bundle``; int4: ``quantize --scheme int4-rtn`` of it,
    MatMulNBits with block 32 like genai's int4), with its onnxruntime-genai variant (``genai.onnx``, written by
    the bundle writer; added to a bundle cached before it was)."""
    from exaone_deploy.bundle import load_manifest
    from exaone_deploy.genai import add_genai_variant

    out = build_bundle(workdir, layers)
    if precision == "int4":
        fp32, out = out, workdir / f"exaone4-1.2b-shape-int4{_suffix(layers)}-ort"
        if not (out / "manifest.json").is_file():
            print(f"quantizing {fp32} -> {out} (int4-rtn) ...", file=sys.stderr)
            run_isolated(_quantize_int4, fp32, out)
    if "genai" not in load_manifest(out, verify=False).data["files"]:
        add_genai_variant(out)
    return out


# ---- bytes read per decode token -----------------------------------------------------------------------------


def onnx_decode_bytes(model_path: Path) -> int:
    """Bytes of the initializers a decode step reads: all of them, except tables only gathered from (the
    embedding: one row per token). Shapes come from the graph; external data is not loaded."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}

    def walk(graph):
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(m.graph)
    total = 0
    for t in m.graph.initializer:
        ops = consumers.get(t.name, set())
        if ops and all(op.startswith("Gather") for op in ops):
            continue
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
        if bits is None:
            bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += math.ceil(math.prod(t.dims) * bits / 8)
    return total


def checkpoint_param_bytes(ckpt: Path, itemsize: int = 4) -> tuple[int, int]:
    """(all parameters, those a decode step reads) in bytes at ``itemsize``, from the safetensors headers.
    A tied embedding counts once, as the LM head; an untied one is only gathered from."""
    cfg = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    n_all = n_read = 0
    for file in sorted(set(index["weight_map"].values())):
        with open(ckpt / file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(info["shape"]) * itemsize
            n_all += n
            if name != "model.embed_tokens.weight" or cfg.get("tie_word_embeddings"):
                n_read += n
    return n_all, n_read


# ---- measurements (each in a fresh interpreter) --------------------------------------------------------------


def prompt_ids(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1000, vocab, size=(batch, prompt_len)).tolist()


def measure_bandwidth(threads: int, gib: float = 2.0, repeats: int = 7) -> dict:
    """Read bandwidth over a ``gib`` GiB float32 array, best of ``repeats`` for each of: a matrix-vector product
    (BLAS sgemv, the access pattern of a batch-1 decode step; its threads come from OPENBLAS_NUM_THREADS), sums
    over one slice per thread, and a single-threaded sum. The largest is the machine's figure."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(int(gib * GiB) // 4, dtype=np.float32)  # touched: every page is resident
    matrix, x = a.reshape(-1, 4096), np.ones(4096, dtype=np.float32)
    slices = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        kernels = {"gemv": lambda: matrix @ x, "sum": lambda: list(pool.map(np.sum, slices)), "sum_1_thread": a.sum}
        best = dict.fromkeys(kernels, 0.0)
        for _ in range(repeats):
            for name, fn in kernels.items():
                t0 = time.perf_counter()
                fn()
                best[name] = max(best[name], a.nbytes / (time.perf_counter() - t0))
    return {
        "bytes": a.nbytes,
        "threads": threads,
        **{f"{k}_Bps": v for k, v in best.items()},
        "read_Bps": max(best.values()),
    }


def _rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Peak anonymous RSS, sampled every ``interval`` s by a thread between ``start()`` and ``stop()``.

    VmHWM (peak RSS) also counts clean page-cache pages of memory-mapped weight files, which the kernel can
    drop at will: ONNX Runtime maps external data and copies each MatMul weight into a pre-packed buffer, so
    at load time both are resident for a moment. Anonymous memory is what the process really allocated.
    Sampled over load and warm-up (the timed runs have the warm-up's shapes), so timings are not disturbed."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            self._stop.wait(self.interval)

    @classmethod
    def start(cls) -> AnonPeak:
        sampler = cls()
        sampler._thread.start()
        return sampler

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _result(load_s, prefill_s, ttft_s, decode_s, batch, prompt_len, new_tokens, tokens, rss_loaded) -> dict:
    return {
        "load_s": load_s,
        "prefill_s": prefill_s,
        "ttft_s": ttft_s,
        "decode_s": decode_s,
        "prefill_tok_s": batch * prompt_len / ttft_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "rss_loaded": rss_loaded,
        "peak_rss": peak_rss_bytes(),
        "tokens": tokens,
    }


def _best(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["ttft_s"] + r["decode_s"]))
    best["ttft_s"] = min(r["ttft_s"] for r in runs)
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in runs)
    if best["decode_tok_s"] is not None:
        best["decode_tok_s"] = max(r["decode_tok_s"] for r in runs)
    best["peak_rss"] = peak_rss_bytes()
    return best


def run_ours(
    bundle: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    threads: int,
    repeats: int,
    prefill_chunk: int = PREFILL_CHUNK,
    kernels: str | None = None,
) -> dict:
    import onnxruntime as ort

    from exaone_deploy.runtime.generate import Generator
    from exaone_deploy.runtime.ort_backend import OrtBackend
    from exaone_deploy.runtime.sampling import SamplingParams
    from exaone_deploy.text.tokenizer import Tokenizer

    anon = AnonPeak.start()
    t0 = time.perf_counter()
    backend = OrtBackend(
        bundle, max_batch=batch, capacity=prompt_len + new_tokens, threads=threads, verify=False, kernels=kernels
    )
    gen = Generator(backend, Tokenizer.from_dir(bundle), prefill_chunk=prefill_chunk or None)
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_bytes()
    prompts = prompt_ids(batch, prompt_len, backend.spec.vocab_size)
    gen.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    anon.stop()
    runs = []
    for _ in range(repeats):
        results = gen.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        t = results[0].timings
        runs.append(
            _result(
                load_s,
                t["prefill_s"],
                t["ttft_s"],
                t["decode_s"],
                batch,
                prompt_len,
                new_tokens,
                [r.token_ids for r in results],
                rss_loaded,
            )
        )
    return dict(_best(runs), peak_anon=anon.peak, version=f"onnxruntime {ort.__version__}")


def run_transformers(ckpt: str, batch: int, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> dict:
    import torch
    import transformers

    _quiet()
    torch.set_num_threads(threads)
    anon = AnonPeak.start()
    t0 = time.perf_counter()
    model = transformers.Exaone4ForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_bytes()

    class Stamps(transformers.LogitsProcessor):
        """Called once per forward pass, right after it: the time each step's logits exist."""

        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompt_ids(batch, prompt_len, model.config.vocab_size))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=model.config.pad_token_id)
    runs = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        anon.stop()
        for _ in range(repeats):
            stamps = transformers.LogitsProcessorList([Stamps()])
            t0 = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, logits_processor=stamps, **kw
            )
            t_end = time.perf_counter()
            t_first = stamps[0].t[0]
            runs.append(
                _result(
                    load_s,
                    t_first - t0,
                    t_first - t0,
                    t_end - t_first,
                    batch,
                    prompt_len,
                    new_tokens,
                    out[:, prompt_len:].tolist(),
                    rss_loaded,
                )
            )
    return dict(
        _best(runs), peak_anon=anon.peak, version=f"transformers {transformers.__version__}, torch {torch.__version__}"
    )


def run_genai(model_dir: str, batch: int, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    anon = AnonPeak.start()
    t0 = time.perf_counter()
    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_bytes()
    vocab = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = np.array(prompt_ids(batch, prompt_len, vocab), dtype=np.int32)

    def generate(n: int):
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=prompt_len + n, min_length=prompt_len + n, do_sample=False, batch_size=batch
        )
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # the prompt's forward pass
        t1 = time.perf_counter()
        gen.generate_next_token()  # picks the first token from the prompt's logits
        t_first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        t_end = time.perf_counter()
        tokens = [list(map(int, gen.get_sequence(b)[prompt_len:])) for b in range(batch)]
        return t1 - t0, t_first - t0, t_end - t_first, tokens

    generate(2)  # warm-up
    anon.stop()
    runs = []
    for _ in range(repeats):
        prefill_s, ttft_s, decode_s, tokens = generate(new_tokens)
        if any(len(t) != new_tokens for t in tokens):
            raise RuntimeError(f"onnxruntime-genai generated {[len(t) for t in tokens]} tokens, not {new_tokens}")
        runs.append(_result(load_s, prefill_s, ttft_s, decode_s, batch, prompt_len, new_tokens, tokens, rss_loaded))
    return dict(_best(runs), peak_anon=anon.peak, version=f"onnxruntime-genai {og.__version__}")


def run_llamacpp(gguf: str, batch: int, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> dict:
    """llama-bench (benchmarks/llamacpp.py): prefill from an empty context, decode at depth ``prompt_len``."""
    import llamacpp

    if batch != 1:
        raise RuntimeError("llama-bench measures batch 1 only")
    llama = llamacpp.locate()
    r = llamacpp.bench(llama, Path(gguf), threads, prompt_len, new_tokens - 1, prompt_len, repetitions=repeats)
    ttft = prompt_len / r["prefill_tok_s"]
    out = _result(
        r["load_s"], ttft, ttft, (new_tokens - 1) / r["decode_tok_s"], 1, prompt_len, new_tokens, [[]], r["peak_rss"]
    )
    return dict(out, peak_rss=r["peak_rss"], peak_anon=r["peak_rss"], version=r["build"])


def build_llamacpp(workdir: Path, ckpt: Path, system: str, build: bool) -> Path:
    """``ckpt``'s GGUF for a llama.cpp system (converted and quantized once, cached under --workdir)."""
    import llamacpp

    llama = llamacpp.locate(workdir, build_if_missing=build)
    os.environ.setdefault("LLAMA_CPP_BIN", str(llama.bin_dir))  # the measuring interpreters find the same build
    os.environ.setdefault("LLAMA_CPP_SRC", str(llama.src_dir))
    return llamacpp.gguf_for(llama, ckpt, LLAMACPP_PRECISION[system], workdir)


# ---- the run ------------------------------------------------------------------------------------------------


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``: user, nice, system, irq,
    softirq; not idle, iowait or steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


class OtherLoad:
    """Cores used by processes other than this one and its waited-for descendants while the block runs: the
    machine's busy time (``/proc/stat``) minus ours (this process's and its children's rusage), over wall time.

    llama.cpp's worker threads spin-wait between operations; on 2 cores that another process also uses, a
    descheduled spinner stalls every operation, and its decode collapses (measured: 0.7-1.8 tok/s against
    26-47 tok/s in a quiet round of the same run), far more than ONNX Runtime's. A ratio from such a round
    measures the neighbour, so measurements are guarded by this figure (``--max-other-load``)."""

    def __enter__(self):
        t = os.times()
        self._t0 = (time.perf_counter(), _busy_cpu_s(), _children_cpu_s() + t.user + t.system)
        return self

    def __exit__(self, *exc):
        wall0, busy0, ours0 = self._t0
        t = os.times()
        wall = time.perf_counter() - wall0
        ours = _children_cpu_s() + t.user + t.system - ours0
        self.cores = max(0.0, (_busy_cpu_s() - busy0 - ours) / max(wall, 1e-9))
        return False


def wait_quiet(max_load: float, max_wait_s: float, sample_s: float = 2.0) -> float:
    """Sample the other processes' load for ``sample_s`` until it is at most ``max_load`` cores or
    ``max_wait_s`` have passed; the last sample."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with OtherLoad() as load:
            time.sleep(sample_s)
        if load.cores <= max_load or time.perf_counter() >= deadline:
            return load.cores
        log.info("machine busy (%.2f cores used by other processes): waiting", load.cores)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SYSTEMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(bad)} (choose from {', '.join(SYSTEMS)})")
    return names


def _extra_bundle(text: str) -> tuple[Path, str]:
    path, _, label = text.partition("=")
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{path}: not a bundle (no manifest.json)")
    return path, label or path.name


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--systems",
        type=_systems,
        default=["ours", "transformers", "genai", "genai-int4"],
        help=f"comma-separated, from {','.join(SYSTEMS)} (default: ours,transformers,genai,genai-int4)",
    )
    ap.add_argument("--batch", type=_int_list, default=[1, 4], help="batch sizes (default 1,4)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="timed generations per measurement (best kept)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of measurements, interleaved; ratios are medians of within-round ratios (default 3)",
    )
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads (default: all cores)")
    ap.add_argument(
        "--bundle",
        type=_extra_bundle,
        action="append",
        default=[],
        metavar="PATH[=LABEL]",
        help="another bundle to run through our runtime, as an extra row (repeatable)",
    )
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help=f"ours: prompt tokens per prefill step (default {PREFILL_CHUNK}, the runtime's; 0: the whole prompt in "
        "one step)",
    )
    ap.add_argument(
        "--one-step-prefill",
        action="append",
        default=[],
        metavar="LABEL",
        help="this row of ours (a system or a --bundle label) prefills its prompt in one step (repeatable): "
        "the same bundle twice, chunked and not, is an A/B of chunking",
    )
    ap.add_argument(
        "--mlas",
        action="append",
        default=[],
        metavar="LABEL",
        help="this row of ours (a system or a --bundle label) runs quantized linears on onnxruntime's MatMulNBits "
        "instead of our QMatMul kernel (repeatable): the same bundle twice is an A/B of the kernel",
    )
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick check (default: 30)")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="another EXAONE 4 checkpoint instead of the generated 1.2B shape (a 32B-shaped hybrid cut to a few "
        "layers, say): llama.cpp systems convert it, --bundle rows are bundles of it (only those systems)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument(
        "--build-llamacpp",
        action="store_true",
        help="build llama.cpp under --workdir when LLAMA_CPP_BIN is unset (pip sdist + cmake, slow)",
    )
    ap.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        metavar="CORES",
        help="a measurement during which other processes used more cores than this is redone (after waiting "
        "for a quiet machine), and left out of the figures if it stays disturbed (default 0.25)",
    )
    ap.add_argument("--retries", type=int, default=2, help="times a disturbed measurement is redone (default 2)")
    ap.add_argument(
        "--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine before each try"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or min(args.repeats, args.rounds, args.threads) < 1:
        ap.error("--prompt-len, --repeats, --rounds and --threads must be >= 1 and --new-tokens >= 2")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    if args.checkpoint is not None:
        if not (args.checkpoint / "config.json").is_file():
            ap.error(f"--checkpoint {args.checkpoint}: no config.json there")
        other = [s for s in args.systems if s not in LLAMACPP_PRECISION]
        if other or args.layers is not None:
            ap.error(
                f"--checkpoint runs llama.cpp systems and --bundle rows only (not {', '.join(other) or '--layers'}): "
                "the other systems build their artifacts from the generated 1.2B shape"
            )
    return args


def _shape_name(ckpt: Path) -> str:
    """What the table calls a ``--checkpoint``: its directory and sizes."""
    c = json.loads((ckpt / "config.json").read_text())
    window = c.get("sliding_window") if c.get("sliding_window_pattern") or c.get("layer_types") else None
    return f"{ckpt.name}: hidden {c['hidden_size']}, vocab {c['vocab_size']}" + (
        f", sliding window {window}" if window else ""
    )


def _scheme(target: dict) -> str | None:
    """The quantization scheme of the bundle a target runs (None: float)."""
    from exaone_deploy.bundle import load_manifest

    return (load_manifest(target["path"], verify=False).get("quantization") or {}).get("scheme")


def _first_divergence(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Index of the first token where any row differs (None: identical)."""
    for row_a, row_b in zip(a, b):
        for i, (x, y) in enumerate(zip(row_a, row_b)):
            if x != y:
                return i
    return None


@contextlib.contextmanager
def _environment(env: dict | None):
    """os.environ replaced by ``env`` (when given) while a measuring interpreter is spawned."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _combine(target: dict, batch: int, per_round: list[list[dict]]) -> dict:
    """One (system, batch) row from its rounds: the best round's speeds (each figure's best), the largest peak
    memory, the first round's tokens (all rounds must agree: greedy decoding is deterministic)."""
    label = target["label"]
    if "error" in target:
        return {"system": label, "batch": batch, "error": target["error"]}
    runs = [r for rnd in per_round for r in rnd if r["system"] == label and r["batch"] == batch]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"system": label, "batch": batch, "error": runs[-1]["error"] if runs else "not measured"}
    row = {k: v for k, v in ok[0].items() if k != "round"}
    for k in ("load_s", "ttft_s", "prefill_s", "decode_s"):
        row[k] = min(r[k] for r in ok)
    for k in ("prefill_tok_s", "decode_tok_s"):
        row[k] = max(r[k] for r in ok) if ok[0][k] is not None else None
    for k in ("peak_rss", "peak_anon", "rss_loaded"):
        row[k] = max(r[k] for r in ok)
    row["rounds_ok"] = len(ok)
    row["tokens_stable"] = all(r["tokens"] == ok[0]["tokens"] for r in ok)
    return row


def _paired_ratios(per_round: list[list[dict]], system: str, peer: str, batch: int, key: str) -> list[float]:
    """system / peer for ``key``, one ratio per round in which both were measured."""
    out = []
    for rnd in per_round:
        a = next((r for r in rnd if r["system"] == system and r["batch"] == batch and "error" not in r), None)
        b = next((r for r in rnd if r["system"] == peer and r["batch"] == batch and "error" not in r), None)
        if a and b and a.get(key) and b.get(key):
            out.append(a[key] / b[key])
    return out


def _spread(row: dict, per_round: list[list[dict]], bws: list[dict]) -> None:
    """Per-round figures of a row: prefill and decode tok/s, and decode as a fraction of the ceiling that round's
    own bandwidth gives (``*_rounds`` lists, ``*_median``); a round's speed and its ceiling are neighbours."""
    runs = [
        (i, r)
        for i, rnd in enumerate(per_round)
        for r in rnd
        if r["system"] == row["system"] and r["batch"] == row["batch"] and "error" not in r and r.get("decode_tok_s")
    ]
    fractions = [r["decode_tok_s"] * r["decode_bytes_per_token"] / (r["batch"] * bws[i]["read_Bps"]) for i, r in runs]
    for key, values in (
        ("prefill_tok_s", [r["prefill_tok_s"] for _, r in runs]),
        ("decode_tok_s", [r["decode_tok_s"] for _, r in runs]),
        ("decode_of_round_ceiling", fractions),
    ):
        if values:
            row[f"{key}_rounds"], row[f"{key}_median"] = values, float(np.median(values))


def _measure(t: dict, row: dict, args) -> dict:
    """One (system, batch) measurement in a fresh interpreter, redone while other processes disturb it (more
    than ``--max-other-load`` cores during the run); still disturbed after ``--retries``: an error row."""
    b, P, N, T = row["batch"], args.prompt_len, args.new_tokens, args.threads
    for attempt in range(args.retries + 1):
        wait_quiet(args.max_other_load, args.quiet_wait)
        try:
            with _environment(hugepage_env() if t.get("hugepages") else None), OtherLoad() as load:
                result = run_isolated(t["fn"], str(t["path"]), b, P, N, T, args.repeats, timeout=args.timeout)
        except Exception as e:  # noqa: BLE001 - reported in the table
            print(f"{t['label']} (batch {b}) failed: {e}", file=sys.stderr)
            return dict(row, error=str(e).strip().splitlines()[-1][:200])
        out = dict(row, **result, other_load=load.cores, attempts=attempt + 1)
        if load.cores <= args.max_other_load:
            return out
        print(f"{t['label']} (batch {b}): other processes used {load.cores:.2f} cores meanwhile", file=sys.stderr)
    return dict(out, error=f"disturbed: other processes used {load.cores:.2f} cores during every try")


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    P, N, T, L = args.prompt_len, args.new_tokens, args.threads, args.layers

    # Artifacts first (cached), so that nothing is being built while anything is timed.
    ckpt = args.checkpoint or build_checkpoint(workdir, L)
    param_bytes, hf_read_bytes = checkpoint_param_bytes(ckpt)
    targets: list[dict] = []  # label, kind, path (the artifact), fn (the measurement) or error (the build's)

    def ours(label: str):  # our Python loop, prefilling as --prefill-chunk / --one-step-prefill say for this row
        return functools.partial(
            run_ours,
            prefill_chunk=0 if label in args.one_step_prefill else args.prefill_chunk,
            kernels="off" if label in args.mlas else None,
        )

    for system in args.systems:
        if system == "ours":
            targets.append(
                dict(label=system, kind=system, path=build_bundle(workdir, L), fn=ours(system), hugepages=True)
            )
        elif system == "transformers":
            targets.append(dict(label=system, kind=system, path=ckpt, fn=run_transformers))
        elif system in LLAMACPP_PRECISION:
            try:
                targets.append(
                    dict(
                        label=system,
                        kind="llamacpp",
                        fn=run_llamacpp,
                        path=build_llamacpp(workdir, ckpt, system, args.build_llamacpp),
                    )
                )
            except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
                print(f"{system}: {e}", file=sys.stderr)
                targets.append(dict(label=system, error=str(e).strip().splitlines()[0][:200]))
        elif system in OUR_BUNDLES:  # the same bundle through genai's C++ loop: our Python loop's overhead
            precision, loop = OUR_BUNDLES[system]
            targets.append(
                dict(
                    label=system,
                    kind="bundle",
                    path=build_our_bundle(workdir, L, precision),
                    fn=ours(system) if loop == "ours" else run_genai,
                    hugepages=loop == "ours",
                )
            )
        else:
            try:
                path = build_genai(workdir, L, GENAI_PRECISION[system])
                targets.append(
                    dict(label=system, kind="genai", path=path, fn=run_genai, hugepages=system == "genai-thp")
                )
            except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
                print(f"{system}: {e}", file=sys.stderr)
                targets.append(dict(label=system, error=str(e).strip().splitlines()[0][:200]))
    twin = workdir / f"qwen3-twin-1.2b-shape-fp32{_suffix(L)}"
    if twin.is_dir():  # only the genai builder's input (5 GB): rebuilt in a minute if ever needed again
        shutil.rmtree(twin)
    for path, label in args.bundle:
        targets.append(dict(label=label, kind="bundle", path=path, fn=ours(label), hugepages=True))

    def read_bytes(kind: str, path: Path) -> int:
        if kind == "transformers":
            return hf_read_bytes
        if kind == "genai":
            return onnx_decode_bytes(path / "model.onnx")
        if kind == "llamacpp":
            import llamacpp

            return llamacpp.gguf_decode_bytes(path, Path(os.environ["LLAMA_CPP_SRC"]))
        from exaone_deploy.bundle import load_manifest

        return onnx_decode_bytes(load_manifest(path, verify=False).model_path)

    os.environ["OPENBLAS_NUM_THREADS"] = str(T)  # NumPy's BLAS in the measuring interpreters: same thread count
    # Rounds: every (system, batch) once per round, the systems' order rotated from round to round. This shared
    # machine's memory bandwidth drifts by 2x over minutes; a ratio of two measurements taken minutes apart
    # measures the drift. Ratios are therefore taken within a round (neighbouring measurements) and the median
    # over rounds is reported; each system's own figures are its best round.
    bws: list[dict] = []
    per_round: list[list[dict]] = []
    live = [t for t in targets if "error" not in t]
    for t in live:  # read once: it parses the model file
        t["decode_bytes_per_token"] = read_bytes(t["kind"], t["path"])
    for rnd in range(args.rounds):
        bws.append(run_isolated(measure_bandwidth, T, timeout=args.timeout))
        log.info("round %d: read bandwidth %.1f GB/s", rnd + 1, bws[-1]["read_Bps"] / 1e9)
        measured = []
        k = rnd % max(len(live), 1)
        order = live[k:] + live[:k]
        for b in args.batch:
            for t in order:
                row = {
                    "system": t["label"],
                    "batch": b,
                    "round": rnd + 1,
                    "path": str(t["path"]),
                    "decode_bytes_per_token": t["decode_bytes_per_token"],
                }
                print(f"round {rnd + 1}/{args.rounds}: {t['label']}, batch {b} ...", file=sys.stderr)
                measured.append(_measure(t, row, args))
        per_round.append(measured)
    bw = max(bws, key=lambda x: x["read_Bps"])
    rows = [_combine(t, b, per_round) for b in args.batch for t in targets]

    # Derived figures: ceilings, and ratios within each round (median over rounds).
    by = {(r["system"], r["batch"]): r for r in rows}
    llamacpp_peer = {t["label"]: LLAMACPP_PEER.get(_scheme(t)) for t in live if t["kind"] in ("ours", "bundle")}
    for r in rows:
        if "error" in r:
            continue
        r["ceiling_tok_s"] = r["batch"] * bw["read_Bps"] / r["decode_bytes_per_token"]
        r["decode_of_ceiling"] = r["decode_tok_s"] / r["ceiling_tok_s"]
        _spread(r, per_round, bws)
        r["rss_over_fp32_weights"] = r["peak_rss"] / param_bytes
        for peer in ("transformers", "genai"):
            p = by.get((peer, r["batch"]))
            if p and "error" not in p:
                for what in ("prefill", "decode"):
                    ratios = _paired_ratios(per_round, r["system"], peer, r["batch"], f"{what}_tok_s")
                    if ratios:
                        r[f"{what}_vs_{peer}"] = float(np.median(ratios))
                        r[f"{what}_vs_{peer}_rounds"] = ratios
        peer = llamacpp_peer.get(r["system"])
        if peer and "error" not in by.get((peer, r["batch"]), {"error": 1}):
            for what in ("prefill", "decode"):
                ratios = _paired_ratios(per_round, r["system"], peer, r["batch"], f"{what}_tok_s")
                if ratios:
                    r[f"{what}_vs_llamacpp"], r[f"{what}_vs_llamacpp_rounds"] = float(np.median(ratios)), ratios
        hf = by.get(("transformers", r["batch"]))
        if r["system"] == "ours" and hf and "error" not in hf:
            d = _first_divergence(r["tokens"], hf["tokens"])
            r["tokens_match_transformers"] = "all" if d is None else f"first {d}"

    result = {
        "model": {
            "checkpoint": str(ckpt),
            "layers": json.loads((ckpt / "config.json").read_text())["num_hidden_layers"],
            "fp32_weight_bytes": param_bytes,
        },
        "settings": {
            "prompt_len": P,
            "new_tokens": N,
            "batch": args.batch,
            "threads": T,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "prefill_chunk": args.prefill_chunk,
            "one_step_prefill": args.one_step_prefill,
            "mlas": args.mlas,
        },
        "bandwidth": bw,
        "bandwidth_rounds": [x["read_Bps"] for x in bws],
        "rows": rows,
        "rounds": per_round,
    }

    def table():
        cpu = bw["read_Bps"] / 1e9
        name = _shape_name(ckpt) if args.checkpoint else "EXAONE-4.0-1.2B shape"
        print(
            f"{name} ({result['model']['layers']} layers), random weights, fp32 weights "
            f"{fmt_bytes(param_bytes)}; prompt {P}, {N} new tokens, greedy, {T} threads"
        )
        print(
            f"read bandwidth {cpu:.1f} GB/s (sgemv {bw['gemv_Bps'] / 1e9:.1f}, sum {bw['sum_Bps'] / 1e9:.1f}, "
            f"1-thread sum {bw['sum_1_thread_Bps'] / 1e9:.1f}); batch-1 decode ceiling at fp32: "
            f"{bw['read_Bps'] / hf_read_bytes:.2f} tok/s ({hf_read_bytes / 1e9:.2f} GB/token)"
        )
        if len(bws) > 1:
            print(
                f"{len(bws)} interleaved rounds (read bandwidth per round: "
                f"{', '.join(format(x['read_Bps'] / 1e9, '.1f') for x in bws)} GB/s); "
                "speeds: each system's best round, and the median (min-max) over rounds; "
                "ratios: median of within-round ratios (min-max)"
            )
        print()
        shown = []
        for r in rows:
            s = dict(r)
            for k in ("peak_rss", "rss_loaded", "peak_anon"):
                if k in s:
                    s[k] = f"{s[k] / GiB:.2f}"
            for k in ("decode_of_ceiling",):
                if k in s:
                    s[k] = f"{100 * s[k]:.0f}%"
            for k, pct in (("prefill_tok_s", False), ("decode_tok_s", False), ("decode_of_round_ceiling", True)):
                values = s.get(f"{k}_rounds")
                if values:
                    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.1f}")
                    spread = f" ({f(min(values))}-{f(max(values))})" if len(values) > 1 else ""
                    s[f"{k}_spread"] = f(s[f"{k}_median"]) + spread
            for k in (
                "prefill_vs_transformers",
                "prefill_vs_genai",
                "decode_vs_transformers",
                "decode_vs_genai",
                "prefill_vs_llamacpp",
                "decode_vs_llamacpp",
                "rss_over_fp32_weights",
            ):
                if k in s:
                    rounds = s.get(f"{k}_rounds", [])
                    spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else ""
                    s[k] = f"{s[k]:.2f}x{spread}"
            s["GB/tok"] = f"{r['decode_bytes_per_token'] / 1e9:.2f}" if "decode_bytes_per_token" in r else ""
            if "error" in r:
                s["load_s"] = "failed: " + r["error"]
            shown.append(s)
        print_table(
            shown,
            [
                ("system", "system"),
                ("batch", "B"),
                ("load_s", "load s"),
                ("ttft_s", "TTFT s"),
                ("prefill_tok_s", "prefill tok/s"),
                ("decode_tok_s", "decode tok/s"),
                ("GB/tok", "GB/tok"),
                ("decode_of_ceiling", "of ceiling"),
                ("prefill_tok_s_spread", "prefill med (min-max)"),
                ("decode_tok_s_spread", "decode med (min-max)"),
                ("decode_of_round_ceiling_spread", "of round's ceiling"),
                ("peak_rss", "peak RSS GiB"),
                ("rss_over_fp32_weights", "/fp32 w"),
                ("peak_anon", "anon GiB"),
                ("prefill_vs_transformers", "prefill/hf"),
                ("prefill_vs_genai", "prefill/genai"),
                ("decode_vs_transformers", "decode/hf"),
                ("decode_vs_genai", "decode/genai"),
                ("prefill_vs_llamacpp", "prefill/llama.cpp"),
                ("decode_vs_llamacpp", "decode/llama.cpp"),
                ("tokens_match_transformers", "tokens = hf"),
            ],
        )
        versions = sorted({r["version"] for r in rows if "version" in r})
        print("\n" + "; ".join(versions))

    emit(result, args.json, table)
    return result


if __name__ == "__main__":
    main()
