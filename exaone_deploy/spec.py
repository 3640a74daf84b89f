"""The EXAONE 4 model spec: one frozen dataclass computed once from config.json, passed everywhere.

Real EXAONE 4.0 checkpoints spell their config in several ways (see ../shared/reference/FACTS.md):

* RoPE: ``rope_scaling`` + ``rope_theta`` (transformers 4.54-4.57) or ``rope_parameters`` (transformers 5);
  ``rope_type`` ``default`` or ``llama3`` (``type`` is accepted as an old alias of ``rope_type``).
* ``sliding_window``: int or null.
* ``sliding_window_pattern``: int (every n-th layer global), a string of ``L``/``G`` letters, or absent
  with ``layer_types`` given.
* ``head_dim`` may be absent (then hidden_size // num_attention_heads).

This module is pure Python (NumPy for RoPE tables): the runtime imports it without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExaoneDeployError

__all__ = ["ConfigError", "LayerSpec", "ModelSpec", "RopeSpec", "load_spec"]

SUPPORTED_MODEL_TYPES = ("exaone4",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


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
                head_dim, self.theta, self.factor, self.low_freq_factor, self.high_freq_factor,
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
        return total + (0 if self.tie_word_embeddings else v * d)

    def kv_cache_bytes(self, context: int, batch: int = 1, bytes_per_elem: int = 2, windowed: bool = True) -> int:
        """Bytes of K and V caches for `context` tokens; sliding layers hold only `window` if windowed."""
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
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)


# ---- parsing --------------------------------------------------------------------------------------


def _require(cfg: dict, key: str, path, kind=int):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(path, key, "required field is missing")
    value = cfg[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(path, key, f"expected an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(path, key, f"expected a number, got {value!r}")
    if kind in (int, float) and value <= 0:
        raise ConfigError(path, key, f"must be positive, got {value!r}")
    return value


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
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(path, "rope_theta", f"must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            path, f"{field_name}.rope_type",
            f"unsupported RoPE type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
        )
    if rope_type == "default":
        return RopeSpec("default", float(theta))
    try:
        return RopeSpec(
            "llama3",
            float(theta),
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(path, f"{field_name}.{e.args[0]}", "required for rope_type 'llama3'") from None


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
            path, "sliding_window_pattern",
            "sliding_window is set but neither sliding_window_pattern nor layer_types says which layers use it",
        )
    else:
        raise ConfigError(path, "sliding_window_pattern", f"expected an int or an 'LLLG'-style string, got {pattern!r}")
    kinds[-1] = False  # EXAONE 4: with a pattern, the final layer always uses global attention
    return kinds


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
            path, "num_key_value_heads",
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
    eps = cfg.get("rms_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError(path, "rms_norm_eps", f"must be a positive number, got {eps!r}")
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ConfigError(path, "sliding_window", f"expected a positive integer or null, got {window!r}")
    rope = _parse_rope(cfg, path)
    kinds = _parse_layer_kinds(cfg, num_layers, window, path)
    # RoPE applies when the model has no sliding window at all, or on sliding layers (global layers of a
    # hybrid model are NoPE). transformers: `if self.sliding_window is None or self.is_sliding`.
    layers = tuple(
        LayerSpec(index=i, sliding=s, window=window if s else 0, rope=(window is None) or s)
        for i, s in enumerate(kinds)
    )
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
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
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=rope,
        sliding_window=window,
        layers=layers,
        hidden_act="silu",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=cfg.get("pad_token_id"),
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
