"""Write a tiny random-weight EXAONE 4.0 checkpoint laid out like the real ones.

The real checkpoints cannot be downloaded here, so tests build a small twin of each model instead:

* ``1.2b``: every layer global with RoPE (``sliding_window`` null), embeddings tied to the LM head, fp32.
* ``32b``: hybrid attention, three sliding-window layers (window 8) to one global NoPE layer with the last layer
  global (``sliding_window_pattern`` "LLLG" plus ``layer_types``), untied LM head, bf16.

Both use the real config spellings (transformers 4.54: ``rope_scaling`` llama3 + ``rope_theta``), the real
tensor names, sharded safetensors with ``model.safetensors.index.json``, a byte-level BPE tokenizer carrying
EXAONE's special tokens and the EXAONE 4.0 chat template, and a generation_config.json. Output is
deterministic: the same arguments give the same bytes. Only numpy and tokenizers are needed.

    python -m exaone_deploy.tiny.make out/tiny-32b --preset 32b
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..bundle import atomic_dir, is_checkpoint_dir
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, train_tokenizer

__all__ = ["PRESETS", "make_tiny", "training_texts"]

VOCAB_SIZE = 512
TRANSFORMERS_VERSION = "4.54.0"  # the version the real config.json files were written with

PRESETS = {
    "1.2b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=None,
        sliding_window_pattern=None,
        tie_word_embeddings=True,
        dtype="float32",
    ),
    "32b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,  # 8 * 16 = 128 != hidden_size: o_proj is not square, as it may be in general
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        sliding_window_pattern="LLLG",
        tie_word_embeddings=False,
        dtype="bfloat16",
    ),
}
# Full-size shapes of the real models (random weights), for benchmarks and memory tests.
PRESETS["1.2b-full"] = dict(
    PRESETS["1.2b"],
    hidden_size=2048,
    intermediate_size=4096,
    num_hidden_layers=30,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    dtype="bfloat16",
    vocab_size=102400,
    max_position_embeddings=65536,
)
PRESETS["32b-full"] = dict(
    PRESETS["32b"],
    hidden_size=5120,
    intermediate_size=27392,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    sliding_window=4096,
    vocab_size=102400,
    max_position_embeddings=131072,
)

# safetensors dtype codes
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# A few lines of Korean and Spanish (EXAONE 4.0's other two languages), so the tokenizer learns some multibyte
# merges, and a little English for when the Shakespeare corpus is absent.
_BUILTIN_TEXT = """\
안녕하세요, 만나서 반갑습니다. 저는 LG AI 연구원에서 만든 언어 모델입니다.
오늘 서울의 날씨는 맑고 따뜻합니다. 내일은 비가 올 수도 있습니다.
한국어, 영어, 스페인어로 질문에 답할 수 있어요. 무엇을 도와드릴까요?
수학 문제를 단계별로 풀어 보겠습니다. 먼저 두 수를 더한 다음 결과를 확인합니다.
¡Hola! ¿Cómo estás? Mañana vamos a la biblioteca para estudiar español.
El niño comió una manzana en el jardín. La canción era muy bonita y alegre.
¿Dónde está la estación de tren? Está a dos cuadras, junto al café pequeño.
Puedo responder preguntas en coreano, inglés y español. ¿En qué puedo ayudarte?
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before it.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.
"""


def _corpus_candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    paths = [repo / "shared" / "data" / "tinyshakespeare.txt", repo.parent / "shared" / "data" / "tinyshakespeare.txt"]
    if os.environ.get("EXAONE_DEPLOY_TINY_CORPUS"):
        paths.insert(0, Path(os.environ["EXAONE_DEPLOY_TINY_CORPUS"]))
    return paths


def training_texts() -> list[str]:
    """Tokenizer training text: tinyshakespeare if found (``$EXAONE_DEPLOY_TINY_CORPUS``, then ``shared/data``
    in or beside the repository), plus built-in Korean/Spanish/English lines, repeated so they earn merges."""
    texts = [_BUILTIN_TEXT] * 8
    for path in _corpus_candidates():
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
            break
    return texts


def _config(preset: dict, num_layers: int, dtype: str, vocab_size: int, ids: dict[str, int]) -> dict:
    if preset["sliding_window"] is None:
        layer_types = ["full_attention"] * num_layers
    else:
        pattern = preset["sliding_window_pattern"]
        layer_types = [
            "full_attention" if pattern[i % len(pattern)] == "G" or i == num_layers - 1 else "sliding_attention"
            for i in range(num_layers)
        ]
    config = {
        "architectures": ["Exaone4ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "head_dim": preset["head_dim"],
        "hidden_act": "silu",
        "hidden_size": preset["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": preset["intermediate_size"],
        "layer_types": layer_types,
        # Small (KV caches sized from it stay small) but above the llama3 original_max_position_embeddings.
        "max_position_embeddings": preset.get("max_position_embeddings", 16384),
        "model_type": "exaone4",
        "num_attention_heads": preset["num_attention_heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": preset["num_key_value_heads"],
        "pad_token_id": ids["pad"],
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 1000000,
        "sliding_window": preset["sliding_window"],
        "sliding_window_pattern": preset["sliding_window_pattern"],
        "tie_word_embeddings": preset["tie_word_embeddings"],
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    return config


def _random_weights(config: dict, seed: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """Names -> (shape, kind) of the weights, with Hugging Face names, in a fixed order."""
    hidden, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_dim, kv_dim = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    linear, norm = "linear", "norm"
    weights = {"model.embed_tokens.weight": ((config["vocab_size"], hidden), linear)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = ((q_dim, hidden), linear)
        weights[p + "self_attn.k_proj.weight"] = ((kv_dim, hidden), linear)
        weights[p + "self_attn.v_proj.weight"] = ((kv_dim, hidden), linear)
        weights[p + "self_attn.o_proj.weight"] = ((hidden, q_dim), linear)
        weights[p + "self_attn.q_norm.weight"] = ((d,), norm)
        weights[p + "self_attn.k_norm.weight"] = ((d,), norm)
        weights[p + "mlp.gate_proj.weight"] = ((inter, hidden), linear)
        weights[p + "mlp.up_proj.weight"] = ((inter, hidden), linear)
        weights[p + "mlp.down_proj.weight"] = ((hidden, inter), linear)
        weights[p + "post_attention_layernorm.weight"] = ((hidden,), norm)
        weights[p + "post_feedforward_layernorm.weight"] = ((hidden,), norm)
    weights["model.norm.weight"] = ((hidden,), norm)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = ((config["vocab_size"], hidden), linear)
    return weights


def _draw(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """Linear weights ~ N(0, 0.02); norm weights around 1 but not 1, so a dropped or misplaced norm shows."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if kind == "linear":
        x *= 0.02
    else:
        x *= 0.1
        x += 1.0
    return x


def _to_bytes(array: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of an fp32 array stored as ``dtype``; bf16 rounds to nearest even."""
    if dtype == "float32":
        return array.astype("<f4").tobytes()
    if dtype == "float16":
        return array.astype("<f2").tobytes()
    bits = array.astype("<f4").view("<u4")
    # Round to nearest even in place (no overflow for finite values: the largest is 0xFF7FFFFF + 0x8000).
    rounding = (bits >> 16) & 1
    rounding += 0x7FFF
    rounding += bits
    rounding >>= 16
    return rounding.astype("<u2").tobytes()


def _write_safetensors(
    path: Path, tensors: dict[str, tuple[tuple[int, ...], str]], dtype: str, rng: np.random.Generator, order: list[str]
) -> int:
    """Write one safetensors file (tensors sorted by name), drawing each tensor when it is written, so
    memory holds one tensor at a time. Tensors are drawn in ``order`` (the checkpoint's canonical order),
    which keeps the weights independent of how they are sharded. Returns the bytes of tensor data."""
    itemsize = 4 if dtype == "float32" else 2
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        shape = tensors[name][0]
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    base = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            if name in tensors:
                f.seek(base + header[name]["data_offsets"][0])
                f.write(_to_bytes(_draw(rng, *tensors[name]), dtype))
    return offset


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_checkpoint(out: Path, preset_name: str, seed: int, num_layers: int | None, dtype: str | None) -> None:
    preset = PRESETS[preset_name]
    dtype = dtype or preset["dtype"]
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_ST_DTYPES)}, got {dtype!r}")
    num_layers = num_layers or preset["num_hidden_layers"]

    train_tokenizer(training_texts(), VOCAB_SIZE, out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {
        "bos": tokenizer.token_to_id(BOS_TOKEN),
        "eos": tokenizer.token_to_id(EOS_TOKEN),
        "pad": tokenizer.token_to_id(PAD_TOKEN),
    }

    vocab_size = preset.get("vocab_size", tokenizer.get_vocab_size())
    config = _config(preset, num_layers, dtype, vocab_size, ids)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": ids["bos"],
            "do_sample": False,  # greedy by default: a random-weight test model
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "transformers_version": TRANSFORMERS_VERSION,
        },
    )

    # Two shards, split between the layers: embeddings and the first half of the layers, then the rest with
    # the final norm and the LM head.
    weights = _random_weights(config, seed)
    half = (num_layers + 1) // 2
    shards: list[dict[str, np.ndarray]] = [{}, {}]
    for name, array in weights.items():
        shards[_shard_of(name, half)][name] = array
    weight_map, total_size = {}, 0
    rng, order = np.random.default_rng(seed), list(weights)
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total_size += _write_safetensors(out / file, tensors, dtype, rng, order)
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _shard_of(name: str, half: int) -> int:
    if name == "model.embed_tokens.weight":
        return 0
    if name.startswith("model.layers."):
        return 0 if int(name.split(".")[2]) < half else 1
    return 1


def make_tiny(
    out_dir: str | Path,
    preset: str = "1.2b",
    seed: int = 0,
    *,
    num_layers: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a tiny random-weight EXAONE 4.0 checkpoint to ``out_dir`` and return its path.

    Args:
        out_dir: destination directory. Written atomically (built in a temporary sibling directory, then
            renamed). An existing directory is replaced only if it is empty or holds a checkpoint (config.json).
        preset: "1.2b" (global attention, tied embeddings) or "32b" (hybrid LLLG attention, untied).
        seed: weight seed. The tokenizer does not depend on it.
        num_layers: override the preset's layer count (the 32b pattern repeats; the last layer stays global).
        dtype: "float32", "bfloat16" or "float16" storage; defaults to the preset's (fp32 1.2b, bf16 32b).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, replaceable=is_checkpoint_dir, error=FileExistsError) as tmp:
        _write_checkpoint(tmp, preset, seed, num_layers, dtype)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.2b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(_ST_DTYPES), default=None)
    args = parser.parse_args(argv)
    path = make_tiny(args.out_dir, args.preset, args.seed, num_layers=args.num_layers, dtype=args.dtype)
    print(path)


if __name__ == "__main__":
    main()
