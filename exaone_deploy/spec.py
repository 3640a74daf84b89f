"""The EXAONE 4 model spec: one frozen dataclass computed once from config.json, passed everywhere.

Real EXAONE 4.0 checkpoints spell their config in several ways (see ../shared/reference/FACTS.md):

* RoPE: ``rope_scaling`` + ``rope_theta`` (transformers 4.54-4.57) or ``rope_parameters`` (transformers 5);
  ``rope_type`` ``default`` or ``llama3`` (``type`` is accepted as an old alias of ``rope_type``).
* ``sliding_window``: int or null.
* ``sliding_window_pattern``: int (every n-th layer global), a string of ``L``/``G`` letters, or absent
  with ``layer_types`` given.
* ``head_dim`` may be absent (then hidden_size // num_attention_heads).
* ``architectures``: the model class, which fixes the task head (:class:`HeadSpec`); absent means the causal LM.

This module is pure Python (NumPy for RoPE tables): the runtime imports it without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TASKS", "CACHE_ELEM_BYTES", "ConfigError", "HeadSpec", "LayerSpec", "ModelSpec", "RopeSpec", "load_spec"]
from .errors import ExaoneDeployError

CACHE_ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}  # KV-cache element sizes by dtype


SUPPORTED_MODEL_TYPES = ("exaone4",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# transformers' EXAONE 4 classes -> the task of their head
TASKS = {
    "Exaone4ForCausalLM": "causal-lm",
    "Exaone4ForSequenceClassification": "sequence-classification",
    "Exaone4ForTokenClassification": "token-classification",
    "Exaone4ForQuestionAnswering": "question-answering",
}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class ConfigError(ExaoneDeployError, ValueError):
    """A config.json that we cannot interpret. The message names the file and the field."""

    def __init__(self, path: str | Path, field_name: str, problem: str):
        self.path, self.field, self.problem = str(path), field_name, problem
        super().__init__(f"{path}: field '{field_name}': {problem}")


@dataclass(frozen=True)
class RopeSpec:
    rope_type: str  # "default" | "llama3"
    theta: float
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        from .opref import default_inv_freq, llama3_inv_freq

        if self.rope_type == "llama3":
            return llama3_inv_freq(
                head_dim,
                self.theta,
                self.factor,
                self.low_freq_factor,
                self.high_freq_factor,
                self.original_max_position_embeddings,
            )
        return default_inv_freq(head_dim, self.theta)

    def cos_sin(self, head_dim: int, max_positions: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin caches (max_positions, head_dim/2), computed as transformers does (float32)."""
        from .opref import rope_cache

        inv = self.inv_freq(head_dim).astype(np.float32)  # transformers keeps inv_freq in float32
        return rope_cache(inv, max_positions, dtype)


@dataclass(frozen=True)
class LayerSpec:
    index: int
    sliding: bool  # local (sliding-window) attention
    window: int  # 0 for global layers
    rope: bool  # RoPE applied on this layer (NoPE otherwise)

    @property
    def kind(self) -> str:
        return "sliding" if self.sliding else "global"


@dataclass(frozen=True)
class HeadSpec:
    """What sits on top of the decoder, as transformers' ``Exaone4For*`` class of config.json defines it.

    * ``causal-lm``: ``lm_head`` (or the tied embedding); the backbone's tensors are under ``model.``.
    * ``sequence-classification``: ``score.weight`` (num_labels, d), no bias, applied to the final hidden state
      of the last non-pad token of each row (``GenericForSequenceClassification``); backbone ``model.``.
    * ``token-classification``: ``score.weight`` (num_labels, d) and ``score.bias`` unless
      ``token_classification_bias`` is false, on every position (dropout is the identity at inference).
    * ``question-answering``: ``qa_outputs.weight`` (2, d) and ``qa_outputs.bias`` (2,), split into start
      and end logits; the backbone is under ``transformer.`` (transformers keeps that prefix for this class).

    ``labels`` are id2label in id order (empty for the causal LM and QA); ``problem_type`` picks softmax,
    sigmoid or nothing in post-processing, as transformers' text-classification pipeline does.
    """

    task: str = "causal-lm"
    labels: tuple[str, ...] = ()
    problem_type: str | None = None
    pad_token_id: int | None = None
    bias: bool = False  # the head's linear layer has a bias

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def prefix(self) -> str:
        """The name under which the head class keeps the backbone (its ``base_model_prefix``)."""
        return "transformer" if self.task == "question-answering" else "model"

    @property
    def is_lm(self) -> bool:
        return self.task == "causal-lm"


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeSpec
    sliding_window: int | None
    layers: tuple[LayerSpec, ...]
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    head: HeadSpec = HeadSpec()
    config_sha256: str = ""
    source: str = field(default="", compare=False)

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def uses_rope(self) -> bool:
        return any(layer.rope for layer in self.layers)

    @property
    def is_hybrid(self) -> bool:
        return any(layer.sliding for layer in self.layers)

    def num_parameters(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * self.head_dim + 2 * d
        total = v * d + self.num_layers * per_layer + d
        if self.head.task == "question-answering":
            return total + 2 * d + 2
        if not self.head.is_lm:
            return total + self.head.num_labels * (d + int(self.head.bias))
        return total + (0 if self.tie_word_embeddings else v * d)

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_elem: int | str = 2, windowed: bool = True) -> int:
        """Bytes of K and V caches for `context` tokens; sliding layers hold only `window` if windowed.

        ``bytes_per_elem``: the cache element size in bytes, or a cache dtype name (``CACHE_ELEM_BYTES``: float32 4,
        float16/bfloat16 2, int8 1)."""
        if isinstance(bytes_per_elem, str):
            if bytes_per_elem not in CACHE_ELEM_BYTES:
                raise ValueError(f"unknown cache dtype {bytes_per_elem!r} (choose from {', '.join(CACHE_ELEM_BYTES)})")
            bytes_per_elem = CACHE_ELEM_BYTES[bytes_per_elem]
        total = 0
        for layer in self.layers:
            length = min(context, layer.window) if (windowed and layer.sliding) else context
            total += 2 * batch * self.num_kv_heads * length * self.head_dim * bytes_per_elem
        return total

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        head = d.pop("head", None)  # manifests written before heads existed are causal LMs
        if head is not None:
            d["head"] = HeadSpec(**dict(head, labels=tuple(head.get("labels") or ())))
        return cls(**d)


# ---- parsing --------------------------------------------------------------------------------------


# Upper bounds on sizes read from config.json, checked before anything is allocated from them: far above any
# real model (EXAONE 4.0 32B: hidden 5120, 64 layers, vocab 102,400, 131,072 positions), far below what would
# hang `inspect` or exhaust memory when a hostile file asks for it.
LIMITS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "vocab_size": 1 << 22,
    "head_dim": 1 << 11,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
    "original_max_position_embeddings": 1 << 24,
}


def _require(cfg: dict, key: str, path, kind=int):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(path, key, "required field is missing")
    return _checked(cfg[key], key, path, kind)


def _checked(value, key: str, path, kind=int):
    """A positive int (bounded by LIMITS) or a positive finite number; else a ConfigError naming the field."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(path, key, f"expected an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ConfigError(path, key, f"expected a finite number, got {value!r}")
    if value <= 0:
        raise ConfigError(path, key, f"must be positive, got {value!r}")
    limit = LIMITS.get(key.rsplit(".", 1)[-1])
    if limit is not None and value > limit:
        raise ConfigError(path, key, f"{value} is larger than any supported model ({limit})")
    return value


def _token_ids(cfg: dict, key: str, path, vocab: int) -> tuple[int, ...]:
    """A token id or list of ids (or null) from config.json, each within the vocabulary."""
    value = cfg.get(key)
    ids = value if isinstance(value, list) else ([] if value is None else [value])
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ConfigError(path, key, f"expected token id(s) in [0, {vocab}), got {value!r}")
    return tuple(ids)


def _parse_rope(cfg: dict, path) -> RopeSpec:
    params = cfg.get("rope_parameters")
    field_name = "rope_parameters"
    if params is None:
        params = cfg.get("rope_scaling")
        field_name = "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise ConfigError(path, field_name, f"expected an object, got {params!r}")
    params = dict(params or {})
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x has it at the top level.
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    theta = 10000.0 if theta is None else _checked(theta, "rope_theta", path, float)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            path,
            f"{field_name}.rope_type",
            f"unsupported RoPE type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
        )
    if rope_type == "default":
        return RopeSpec("default", float(theta))

    def get(key, kind=float):
        if params.get(key) is None:
            raise ConfigError(path, f"{field_name}.{key}", "required for rope_type 'llama3'")
        return _checked(params[key], f"{field_name}.{key}", path, kind)

    return RopeSpec(
        "llama3",
        float(theta),
        factor=float(get("factor")),
        low_freq_factor=float(get("low_freq_factor")),
        high_freq_factor=float(get("high_freq_factor")),
        original_max_position_embeddings=get("original_max_position_embeddings", int),
    )


def _parse_layer_kinds(cfg: dict, num_layers: int, sliding_window: int | None, path) -> list[bool]:
    """Return per layer whether it is sliding (local).

    An explicit ``layer_types`` is followed as written (as transformers does). A pattern (int or "LLLG"
    string) repeats from layer 0 and the final layer is always global (EXAONE 4's rule for patterns).
    """
    if sliding_window is None:
        return [False] * num_layers
    layer_types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(path, "layer_types", f"expected a list of {num_layers} layer types")
        kinds = []
        for i, t in enumerate(layer_types):
            if t not in ("sliding_attention", "full_attention"):
                raise ConfigError(path, f"layer_types[{i}]", f"unknown layer type {t!r}")
            kinds.append(t == "sliding_attention")
        return kinds
    elif isinstance(pattern, str):
        letters = pattern.strip().upper()
        if not letters or set(letters) - {"L", "G"}:
            raise ConfigError(path, "sliding_window_pattern", f"expected only letters L and G, got {pattern!r}")
        kinds = [letters[i % len(letters)] == "L" for i in range(num_layers)]
    elif isinstance(pattern, int) and not isinstance(pattern, bool):
        if pattern <= 0:
            raise ConfigError(path, "sliding_window_pattern", f"must be positive, got {pattern}")
        kinds = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif pattern is None:
        raise ConfigError(
            path,
            "sliding_window_pattern",
            "sliding_window is set but neither sliding_window_pattern nor layer_types says which layers use it",
        )
    else:
        raise ConfigError(path, "sliding_window_pattern", f"expected an int or an 'LLLG'-style string, got {pattern!r}")
    kinds[-1] = False  # EXAONE 4: with a pattern, the final layer always uses global attention
    return kinds


def _parse_labels(cfg: dict, path) -> tuple[str, ...]:
    """id2label in id order, checked against num_labels and label2id (JSON object keys are strings).

    Without id2label, transformers names ``num_labels`` (default 2) labels ``LABEL_0``, ``LABEL_1``, ...
    """
    id2label, label2id, n = cfg.get("id2label"), cfg.get("label2id"), cfg.get("num_labels")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ConfigError(path, "num_labels", f"expected a positive integer, got {n!r}")
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(2 if n is None else n))
    if not isinstance(id2label, dict) or not id2label:
        raise ConfigError(path, "id2label", f"expected a non-empty object of id -> label, got {id2label!r}")
    labels: dict[int, str] = {}
    for key, label in id2label.items():
        if not str(key).isdigit() or not isinstance(label, str):
            raise ConfigError(path, "id2label", f"expected integer ids and string labels, got {key!r}: {label!r}")
        labels[int(key)] = label
    if sorted(labels) != list(range(len(labels))):
        raise ConfigError(path, "id2label", f"ids must be 0..{len(labels) - 1}, got {sorted(labels)}")
    if n is not None and n != len(labels):
        raise ConfigError(path, "num_labels", f"is {n} but id2label has {len(labels)} labels")
    if label2id is not None:
        inverse = {v: k for k, v in labels.items()}
        if len(inverse) != len(labels) or label2id != inverse:
            raise ConfigError(path, "label2id", f"does not agree with id2label {id2label!r}")
    return tuple(labels[i] for i in range(len(labels)))


def _parse_head(cfg: dict, path) -> HeadSpec:
    archs = cfg.get("architectures")
    if archs is None:
        return HeadSpec(pad_token_id=cfg.get("pad_token_id"))
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ConfigError(path, "architectures", f"expected a list of one class name, got {archs!r}")
    task = TASKS.get(archs[0])
    if task is None:
        raise ConfigError(
            path, "architectures", f"unsupported architecture {archs[0]!r} (supported: {', '.join(TASKS)})"
        )
    pad = cfg.get("pad_token_id")
    if task in ("causal-lm", "question-answering"):
        return HeadSpec(task, pad_token_id=pad, bias=task == "question-answering")
    problem = cfg.get("problem_type")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ConfigError(path, "problem_type", f"unknown problem type {problem!r} (known: {', '.join(PROBLEM_TYPES)})")
    bias = task == "token-classification" and cfg.get("token_classification_bias", True) is not False
    return HeadSpec(task, _parse_labels(cfg, path), problem, pad, bias)


def spec_from_config(cfg: dict, path: str | Path = "config.json", raw: bytes | None = None) -> ModelSpec:
    if not isinstance(cfg, dict):
        raise ConfigError(path, "<root>", "expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(path, "model_type", f"unsupported model type {model_type!r} (expected 'exaone4')")
    hidden = _require(cfg, "hidden_size", path)
    inter = _require(cfg, "intermediate_size", path)
    num_layers = _require(cfg, "num_hidden_layers", path)
    heads = _require(cfg, "num_attention_heads", path)
    vocab = _require(cfg, "vocab_size", path)
    kv_heads = cfg.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _require(cfg, "num_key_value_heads", path)
    if heads % kv_heads:
        raise ConfigError(
            path,
            "num_key_value_heads",
            f"num_attention_heads ({heads}) is not divisible by num_key_value_heads ({kv_heads})",
        )
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(path, "head_dim", f"absent, and hidden_size {hidden} is not divisible by {heads} heads")
        head_dim = hidden // heads
    else:
        head_dim = _require(cfg, "head_dim", path)
    if head_dim % 2:
        raise ConfigError(path, "head_dim", f"must be even for RoPE, got {head_dim}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(path, "hidden_act", f"unsupported activation {act!r} (EXAONE 4 uses 'silu')")
    eps = _checked(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", path, float)
    window = cfg.get("sliding_window")
    if window is not None:
        window = _checked(window, "sliding_window", path)
    max_pos = cfg.get("max_position_embeddings")
    max_pos = 2048 if max_pos is None else _checked(max_pos, "max_position_embeddings", path)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(path, "tie_word_embeddings", f"expected true or false, got {tie!r}")
    bos, pad = (_token_ids(cfg, k, path, vocab) for k in ("bos_token_id", "pad_token_id"))
    if len(bos) > 1 or len(pad) > 1:
        raise ConfigError(path, "bos_token_id" if len(bos) > 1 else "pad_token_id", "expected a single token id")
    rope = _parse_rope(cfg, path)
    kinds = _parse_layer_kinds(cfg, num_layers, window, path)
    # RoPE applies when the model has no sliding window at all, or on sliding layers (global layers of a
    # hybrid model are NoPE). transformers: `if self.sliding_window is None or self.is_sliding`.
    layers = tuple(
        LayerSpec(index=i, sliding=s, window=window if s else 0, rope=(window is None) or s)
        for i, s in enumerate(kinds)
    )
    eos = _token_ids(cfg, "eos_token_id", path, vocab)
    if raw is None:
        raw = json.dumps(cfg, sort_keys=True).encode()
    return ModelSpec(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(eps),
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        rope=rope,
        sliding_window=window,
        layers=layers,
        hidden_act="silu",
        bos_token_id=bos[0] if bos else None,
        eos_token_id=eos,
        pad_token_id=pad[0] if pad else None,
        head=_parse_head(cfg, path),
        config_sha256=hashlib.sha256(raw).hexdigest(),
        source=str(path),
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Parse ``model_dir/config.json`` (or a path to a config file) into a :class:`ModelSpec`."""
    p = Path(model_dir)
    path = p / "config.json" if p.is_dir() else p
    if not path.exists():
        raise ConfigError(path, "<file>", "not found")
    raw = path.read_bytes()
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(path, "<file>", f"not valid JSON ({e})") from None
    return spec_from_config(cfg, path, raw)
