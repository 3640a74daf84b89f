"""llama.cpp as a benchmark peer: find (or build) it, convert our checkpoints to GGUF, quantize, run llama-bench.

Used by benchmarks/generate.py (systems ``llamacpp-f32``, ``llamacpp-q8_0``, ``llamacpp-q4_0``) and meant for the
serving benchmark too (:func:`locate` gives ``llama-server``). Optional: nothing here runs in CI.

Where llama.cpp comes from (:func:`locate`), first match wins:

1. ``LLAMA_CPP_BIN`` (a directory with ``llama-bench``, ``llama-quantize``, ``llama-server``) and
   ``LLAMA_CPP_SRC`` (a llama.cpp source tree with ``convert_hf_to_gguf.py`` and ``gguf-py``; default: the tree
   that ``LLAMA_CPP_BIN/../..`` or ``LLAMA_CPP_BIN/../vendor/llama.cpp`` is);
2. a build cached under ``WORKDIR/llama.cpp-<version>`` by :func:`build`: ``pip download`` of the
   ``llama-cpp-python`` source distribution (PyPI; it vendors llama.cpp, its converter and gguf-py) and a CMake
   build of the three tools from it.

The build flags (:data:`CMAKE_FLAGS`) are explicit on purpose: a ``GGML_NATIVE=ON`` build on a machine whose CPU
flags list AMX but whose kernel does not allow it (this one) compiles AMX kernels that die with SIGILL at the first
matrix product. So native detection is off, AVX/AVX2/FMA/F16C/AVX-512/VNNI are on and AMX is off. Rejected:
``pip install llama-cpp-python`` (builds the shared library only, not llama-bench/llama-quantize; the Python
binding's per-token overhead would be measured instead of llama.cpp's).

Conversion: ``convert_hf_to_gguf.py`` identifies a BPE pre-tokenizer by hashing the token ids of a test string and
refuses unknown hashes; our test checkpoints carry a locally trained tokenizer, so :func:`convert` runs the
converter in a child interpreter with ``get_vocab_base_pre`` answering ``exaone4`` (what the converter writes for
the real EXAONE 4 tokenizer). Nothing in llama.cpp is changed. Benchmarks feed random token ids, so the
pre-tokenizer never runs.

Measurement (:func:`bench`): ``llama-bench -o json`` twice: prompt processing of ``P`` tokens from an empty
context (``-p P -n 0``), and generation of ``N`` tokens after ``depth`` tokens of context (``-p 0 -n N -d depth``),
the context depth at which our runtime decodes after a ``depth``-token prompt. Each figure is the best of
``repetitions`` (llama-bench runs one warm-up itself). Batch 1 only (llama-bench decodes one sequence).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.llamacpp")

PY_PACKAGE, PY_VERSION = "llama-cpp-python", "0.3.36"
TOOLS = ("llama-bench", "llama-quantize", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_AVX512=ON",
    "-DGGML_AVX512_VNNI=ON",
    "-DGGML_AVX_VNNI=ON",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
)
# our precision -> llama.cpp file type (llama-quantize's name); Q4_0 keeps the output matrix at Q6_K by default
FILE_TYPES = {"f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}


class LlamaCppError(RuntimeError):
    """llama.cpp is missing, failed to build, or one of its tools failed (the message says which and why)."""


@dataclass(frozen=True)
class LlamaCpp:
    bin_dir: Path
    src_dir: Path

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise LlamaCppError(f"{path}: no such llama.cpp tool (build it with: cmake --build ... --target {name})")
        return path

    @property
    def converter(self) -> Path:
        return self.src_dir / "convert_hf_to_gguf.py"


def _source_of(bin_dir: Path) -> Path | None:
    for cand in (
        bin_dir.parent.parent,
        bin_dir.parent.parent / "vendor" / "llama.cpp",
        *sorted(bin_dir.parent.parent.glob("llama_cpp_python-*/vendor/llama.cpp")),
    ):
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py").is_dir():
            return cand
    return None


def locate(workdir: Path | None = None, build_if_missing: bool = False) -> LlamaCpp:
    """llama.cpp from ``LLAMA_CPP_BIN``/``LLAMA_CPP_SRC``, else a build cached under ``workdir`` (built now if
    ``build_if_missing``). Raises :class:`LlamaCppError` naming what is missing."""
    env_bin = os.environ.get("LLAMA_CPP_BIN")
    if env_bin:
        bin_dir = Path(env_bin)
        src = Path(os.environ["LLAMA_CPP_SRC"]) if os.environ.get("LLAMA_CPP_SRC") else _source_of(bin_dir)
        if not (bin_dir / "llama-bench").is_file():
            raise LlamaCppError(f"LLAMA_CPP_BIN={bin_dir}: no llama-bench there")
        if src is None or not (src / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(
                f"no llama.cpp source tree with convert_hf_to_gguf.py for LLAMA_CPP_BIN={bin_dir}; set LLAMA_CPP_SRC"
            )
        return LlamaCpp(bin_dir, src)
    if workdir is not None:
        cached = workdir / f"llama.cpp-{PY_VERSION}"
        if (cached / "build" / "bin" / "llama-bench").is_file():
            return LlamaCpp(cached / "build" / "bin", cached / "src" / "vendor" / "llama.cpp")
        if build_if_missing:
            return build(workdir)
    raise LlamaCppError(
        "llama.cpp not found: set LLAMA_CPP_BIN (and LLAMA_CPP_SRC), or let the benchmark build it "
        f"(--build-llamacpp: pip download {PY_PACKAGE}=={PY_VERSION} and a CMake build, ~20 min)"
    )


def build(workdir: Path, jobs: int | None = None) -> LlamaCpp:
    """Download the ``llama-cpp-python`` sdist with pip and build llama-bench, llama-quantize and llama-server
    from its vendored llama.cpp with :data:`CMAKE_FLAGS` (needs cmake and a C++ compiler)."""
    root = workdir / f"llama.cpp-{PY_VERSION}"
    if shutil.which("cmake") is None:
        raise LlamaCppError("building llama.cpp needs cmake (pip install cmake) and a C++ compiler")
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dl),
            f"{PY_PACKAGE}=={PY_VERSION}",
        ],
        "pip download",
    )
    archive = next(dl.glob("*.tar.gz"), None)
    if archive is None:
        raise LlamaCppError(f"pip download left no source archive in {dl}")
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root / "extract", filter="data")
    shutil.move(str(next((root / "extract").iterdir())), src)
    shutil.rmtree(root / "extract", ignore_errors=True)
    build_dir = root / "build"
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build_dir), *CMAKE_FLAGS], "cmake configure")
    _run(
        ["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1), "--target", *TOOLS], "cmake build"
    )
    return LlamaCpp(build_dir / "bin", src / "vendor" / "llama.cpp")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise LlamaCppError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:3])} ...\n" + (proc.stdout + proc.stderr)[-2000:]
        )
    return proc


# ---- artifacts ---------------------------------------------------------------------------------------------------

_CONVERT = """
import sys
sys.path[:0] = [{src!r}, {gguf_py!r}]
sys.argv = ["convert_hf_to_gguf.py", *{argv!r}]
import convert_hf_to_gguf as conv
base = sys.modules.get("conversion.base", conv)
for owner in {{base, conv}}:
    text_model = getattr(owner, "TextModel", None)
    if text_model is not None:  # our test tokenizer's hash is not in the converter's table: say what it is
        text_model.get_vocab_base_pre = lambda self, tokenizer: "exaone4"
conv.main()
"""


def convert(llama: LlamaCpp, checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
    """``convert_hf_to_gguf.py CHECKPOINT --outtype OUTTYPE --outfile OUT``, with the pre-tokenizer named
    (module docstring). Written to a temporary name and renamed."""
    tmp = out.with_name(out.name + ".partial")
    code = _CONVERT.format(
        src=str(llama.src_dir),
        gguf_py=str(llama.src_dir / "gguf-py"),
        argv=[str(checkpoint), "--outtype", outtype, "--outfile", str(tmp)],
    )
    try:
        _run([sys.executable, "-c", code], f"convert {checkpoint.name} to GGUF {outtype}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantize(llama: LlamaCpp, f32: Path, out: Path, file_type: str) -> Path:
    """``llama-quantize F32.gguf OUT.gguf TYPE`` (llama.cpp's defaults: Q4_0 keeps the output matrix at Q6_K)."""
    tmp = out.with_name(out.name + ".partial")
    try:
        _run([str(llama.tool("llama-quantize")), str(f32), str(tmp), file_type], f"llama-quantize {file_type}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_for(llama: LlamaCpp, checkpoint: Path, precision: str, workdir: Path) -> Path:
    """The GGUF of ``checkpoint`` at ``precision`` (f32, q8_0, q4_0), cached under ``workdir``. The F32 file is
    the quantizer's input, kept for the next precision; a cached quantized file is used without it (delete the
    F32 file of a large checkpoint to save disk)."""
    if precision not in FILE_TYPES:
        raise LlamaCppError(f"unknown llama.cpp precision {precision!r} (choose from {', '.join(FILE_TYPES)})")
    f32 = workdir / f"{checkpoint.name}-F32.gguf"
    out = workdir / f"{checkpoint.name}-{FILE_TYPES[precision]}.gguf"
    if out.is_file():
        return out
    if not f32.is_file():
        convert(llama, checkpoint, f32, "f32")
    if precision != "f32":
        quantize(llama, f32, out, FILE_TYPES[precision])
    return out


def gguf_decode_bytes(path: Path, src_dir: Path | None = None) -> int:
    """Bytes of the tensors a decode step reads: all, except the token embedding when a separate output matrix
    exists (then the embedding is only gathered from; tied models read it as the output matrix)."""
    if src_dir is not None and str(src_dir / "gguf-py") not in sys.path:
        sys.path.insert(0, str(src_dir / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    skip = "token_embd.weight" if "output.weight" in tensors else None
    return sum(n for name, n in tensors.items() if name != skip)


# ---- measurement -------------------------------------------------------------------------------------------------


def _bench_json(llama: LlamaCpp, gguf: Path, threads: int, args: list[str], repetitions: int) -> dict:
    cmd = [
        str(llama.tool("llama-bench")),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-r",
        str(repetitions),
        "-o",
        "json",
        *args,
    ]
    proc = _run(cmd, "llama-bench")
    try:
        rows = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench printed no JSON ({e}): {proc.stdout[-500:]}") from None
    if len(rows) != 1:
        raise LlamaCppError(f"llama-bench {' '.join(args)}: expected one test, got {len(rows)}")
    return rows[0]


def bench(
    llama: LlamaCpp, gguf: Path, threads: int, prompt_len: int, new_tokens: int, depth: int, repetitions: int = 1
) -> dict:
    """Prefill tok/s of a ``prompt_len`` prompt (empty context) and decode tok/s of ``new_tokens`` tokens after
    ``depth`` tokens, each the best of ``repetitions``; wall times and the tools' peak RSS."""
    t0 = time.perf_counter()
    pp = _bench_json(llama, gguf, threads, ["-p", str(prompt_len), "-n", "0"], repetitions)
    t1 = time.perf_counter()
    tg = _bench_json(llama, gguf, threads, ["-p", "0", "-n", str(new_tokens), "-d", str(depth)], repetitions)
    pp_best, tg_best = max(pp["samples_ts"]), max(tg["samples_ts"])
    timed = sum(pp["samples_ns"]) / 1e9 * (1 + 1 / len(pp["samples_ns"]))  # repetitions + llama-bench's warm-up
    return {
        "prefill_tok_s": pp_best,
        "decode_tok_s": tg_best,
        "pp_wall_s": t1 - t0,
        "load_s": max(t1 - t0 - timed, 0.0),
        "tg_wall_s": time.perf_counter() - t1,
        "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "build": f"llama.cpp {pp.get('build_commit', '?')} ({pp.get('cpu_info', '').strip()}, "
        f"{pp.get('type_k', '?')} KV cache)",
        "model_type": pp.get("model_type"),
        "model_size": pp.get("model_size"),
    }


def _main(argv: list[str]) -> None:
    """``python benchmarks/llamacpp.py CHECKPOINT [PRECISION ...]``: convert, quantize and bench once (a check)."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("precisions", nargs="*", default=list(FILE_TYPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/exaone-deploy-bench"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--build", action="store_true", help="build llama.cpp under --workdir if not found")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    llama = locate(args.workdir, build_if_missing=args.build)
    for p in args.precisions:
        gguf = gguf_for(llama, args.checkpoint, p, args.workdir)
        r = bench(llama, gguf, args.threads, args.prompt_len, args.new_tokens, args.prompt_len)
        print(
            json.dumps({"precision": p, "gguf": str(gguf), "decode_bytes": gguf_decode_bytes(gguf, llama.src_dir), **r})
        )


if __name__ == "__main__":
    _main(sys.argv[1:])
