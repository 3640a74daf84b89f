"""Safe, lazy checkpoint loading: layouts, dtypes, tied embeddings, validation, refused and broken files.

Every tensor we read is compared with what safetensors' own ``safe_open`` reads from the same file.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from exaone_deploy.checkpoint import Checkpoint, CheckpointError, expected_tensors
from exaone_deploy.exporter.reference import load_reference
from exaone_deploy.spec import load_spec, spec_from_config
from exaone_deploy.tiny.make import make_tiny

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _st_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read by safetensors itself."""
    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def _copy_meta(src: Path, dst: Path) -> Path:
    """A new checkpoint directory with src's config and tokenizer but no weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.suffix == ".json" and p.name != "model.safetensors.index.json":
            shutil.copy(p, dst / p.name)
    return dst


def _single_file(src: Path, dst: Path, tensors: dict | None = None) -> Path:
    """src re-written as one model.safetensors (no index), optionally with other tensors."""
    _copy_meta(src, dst)
    save_file(
        _st_tensors(src) if tensors is None else tensors, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    return dst


def _refused(model_dir) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint(model_dir)
    return str(info.value)


@pytest.fixture(scope="module")
def by_dtype(tmp_path_factory):
    """The 32b preset stored in each dtype (same seed: the same weights up to rounding)."""
    root = tmp_path_factory.mktemp("dtypes")
    return {dt: make_tiny(root / dt, "32b", seed=1, num_layers=4, dtype=dt) for dt in DTYPES}


# ---- layouts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_sharded_and_single_file(tiny_dirs, tmp_path, preset):
    sharded = tiny_dirs[preset]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    single = _single_file(sharded, tmp_path / "single")
    reference = _st_tensors(sharded)
    for model_dir in (sharded, single):
        ckpt = Checkpoint(model_dir)
        spec = load_spec(model_dir)
        ckpt.validate(spec)
        assert sorted(ckpt.names()) == sorted(reference) == sorted(expected_tensors(spec))
        assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in reference.values())
        for name, expected in reference.items():
            got = ckpt.read_torch(name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
        # The shards' files are the ones the index names.
        if model_dir == sharded:
            assert {n: ckpt.tensors[n].file.name for n in reference} == index["weight_map"]
    a = load_reference(sharded, "float32", max_positions=64)
    b = load_reference(single, "float32", max_positions=64)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


# ---- dtypes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", list(DTYPES))
def test_dtype_in_dtype_out(by_dtype, src):
    model_dir = by_dtype[src]
    ckpt = Checkpoint(model_dir)
    assert ckpt.source_dtype() == src
    stored = _st_tensors(model_dir)
    assert {t.dtype for t in stored.values()} == {DTYPES[src]}
    for name, expected in stored.items():
        same = ckpt.read_torch(name)
        assert same.dtype == DTYPES[src] and torch.equal(same, expected), name  # bit exact
        # numpy view: bf16 comes back as its raw bits
        raw = ckpt.read_numpy(name)
        bits = expected.view(torch.int16).numpy().view(np.uint16) if src == "bfloat16" else expected.numpy()
        assert np.array_equal(raw, bits) and raw.dtype == bits.dtype, name
        for out, torch_dtype in DTYPES.items():
            got = ckpt.read_torch(name, torch_dtype)
            assert got.dtype == torch_dtype and torch.equal(got, expected.to(torch_dtype)), (name, out)


@pytest.mark.parametrize("src", list(DTYPES))
@pytest.mark.parametrize("out", list(DTYPES))
def test_load_reference_dtype(by_dtype, src, out):
    stored = _st_tensors(by_dtype[src])
    model = load_reference(by_dtype[src], out, max_positions=64)
    params = dict(model.named_parameters())
    assert set(params) == set(stored)
    for name, p in params.items():
        assert p.dtype == DTYPES[out] and torch.equal(p, stored[name].to(DTYPES[out])), name
        assert not p.requires_grad
    # The same weights, whatever the storage: the bf16 copy is the fp32 one rounded.
    fp32 = _st_tensors(by_dtype["float32"])
    for name, t in stored.items():
        torch.testing.assert_close(t.float(), fp32[name], rtol=1e-2, atol=1e-3)


def test_mixed_dtypes(by_dtype, tmp_path):
    # Norm weights in fp32, the rest bf16 (as some conversions write): each tensor converts by itself.
    tensors = _st_tensors(by_dtype["bfloat16"])
    fp32 = _st_tensors(by_dtype["float32"])
    for name in tensors:
        if "norm" in name:
            tensors[name] = fp32[name]
    model_dir = _single_file(by_dtype["bfloat16"], tmp_path / "mixed", tensors)
    ckpt = Checkpoint(model_dir)
    assert ckpt.source_dtype() == "bfloat16"
    model = load_reference(model_dir, "float32", max_positions=64)
    for name, p in model.named_parameters():
        assert torch.equal(p, tensors[name].float()), name


# ---- tied embeddings -------------------------------------------------------------------------------


def test_tied_embeddings(tiny_dirs, tmp_path):
    model_dir = tiny_dirs["1.2b"]
    spec = load_spec(model_dir)
    assert spec.tie_word_embeddings
    ckpt = Checkpoint(model_dir)
    assert "lm_head.weight" not in ckpt
    ckpt.validate(spec)
    model = load_reference(model_dir, "float32", max_positions=64)
    assert not hasattr(model, "lm_head")
    assert model.lm_weight is model.model.embed_tokens.weight
    # A tied checkpoint that also stores lm_head.weight (some exporters do) is accepted.
    tensors = _st_tensors(model_dir)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    extra = _single_file(model_dir, tmp_path / "with-lm-head", tensors)
    Checkpoint(extra).validate(spec)
    load_reference(extra, "float32", max_positions=64)


def test_untied_needs_lm_head(tiny_dirs, tmp_path):
    tensors = _st_tensors(tiny_dirs["32b"])
    del tensors["lm_head.weight"]
    model_dir = _single_file(tiny_dirs["32b"], tmp_path / "no-lm-head", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): lm_head\.weight"):
        Checkpoint(model_dir).validate(load_spec(model_dir))


# ---- validation: one error listing everything ---------------------------------------------------------


def test_one_error_lists_all_problems(tiny_dirs, tmp_path):
    src = tiny_dirs["32b"]
    tensors = _st_tensors(src)
    missing = ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    for name in missing:
        del tensors[name]
    unexpected = ["model.layers.99.self_attn.q_proj.weight", "lm_head.bias"]
    for name in unexpected:
        tensors[name] = torch.zeros(4, dtype=torch.bfloat16)
    q = "model.layers.2.self_attn.q_proj.weight"
    tensors[q] = tensors[q].t().contiguous()  # (64, 128) instead of (128, 64)
    k_norm = "model.layers.0.self_attn.k_norm.weight"
    tensors[k_norm] = torch.ones(32, dtype=torch.bfloat16)  # head_dim is 16
    model_dir = _single_file(src, tmp_path / "broken", tensors)

    for load in (
        lambda: Checkpoint(model_dir).validate(load_spec(model_dir)),
        lambda: load_reference(model_dir, "float32", max_positions=64),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        message = str(info.value)
        assert str(model_dir) in message
        assert "missing tensors (2)" in message and "unexpected tensors (2)" in message
        assert "mis-shaped tensors (2)" in message
        for name in missing + unexpected:
            assert name in message, name
        assert f"{q}: expected [128, 64], found [64, 128] in model.safetensors" in message
        assert f"{k_norm}: expected [16], found [32]" in message


def test_checkpoint_of_another_model(tiny_dirs, tmp_path):
    # The 1.2b weights under the 32b config: every layer >= 4 missing, lm_head missing, q/o mis-shaped.
    model_dir = _copy_meta(tiny_dirs["32b"], tmp_path / "mixup")
    for f in tiny_dirs["1.2b"].glob("model*"):
        shutil.copy(f, model_dir / f.name)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(model_dir).validate(load_spec(model_dir))
    message = str(info.value)
    assert "lm_head.weight" in message and "model.layers.7.mlp.down_proj.weight" in message
    assert "model.layers.0.self_attn.q_proj.weight: expected [128, 64], found [64, 64]" in message


# ---- pickles are refused ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that something unpickled the model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "files",
    [
        ["pytorch_model.bin"],
        ["model.pt"],
        ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"],
    ],
)
def test_pickles_refused(tiny_dirs, tmp_path, files):
    marker = tmp_path / "unpickled"
    model_dir = _copy_meta(tiny_dirs["32b"], tmp_path / "pickled")
    for name in files:
        if name.endswith(".json"):
            (model_dir / name).write_text(json.dumps({"weight_map": {}}))
        else:
            (model_dir / name).write_bytes(pickle.dumps({"model.norm.weight": _Payload(marker)}))
    message = _refused(model_dir)
    assert str(model_dir) in message
    assert "pickle" in message.lower() and "execute arbitrary code" in message and "safetensors" in message
    for name in files:
        if not name.endswith(".json"):
            assert name in message
    with pytest.raises(CheckpointError):
        load_reference(model_dir)
    assert not marker.exists()


def test_pickle_next_to_safetensors_is_ignored(tiny_dirs, tmp_path):
    marker = tmp_path / "unpickled"
    model_dir = tmp_path / "both"
    shutil.copytree(tiny_dirs["1.2b"], model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    load_reference(model_dir, "float32", max_positions=64)
    assert not marker.exists()


# ---- broken files ------------------------------------------------------------------------------------------


def _first_shard(model_dir: Path) -> Path:
    return sorted(model_dir.glob("*.safetensors"))[0]


@pytest.fixture
def copy32(tiny_dirs, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dirs["32b"], dst)
    return dst


def test_corrupt_header_json(copy32):
    shard = _first_shard(copy32)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"{not json!!!"
    shard.write_bytes(bytes(data))
    message = _refused(copy32)
    assert str(shard) in message and "corrupt safetensors header" in message


@pytest.mark.parametrize("header_len", [2**62, 10**9])
def test_impossible_header_length(copy32, header_len):
    shard = _first_shard(copy32)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", header_len)
    shard.write_bytes(bytes(data))
    message = _refused(copy32)
    assert str(shard) in message and "header length" in message


def test_file_shorter_than_header_length(copy32):
    shard = _first_shard(copy32)
    shard.write_bytes(b"\x01\x02\x03")
    message = _refused(copy32)
    assert str(shard) in message and "not a safetensors file" in message


def test_header_entry_malformed(copy32):
    shard = _first_shard(copy32)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = "model.embed_tokens.weight"
    del header[name]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # shorter: pad to the same length
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n :])
    message = _refused(copy32)
    assert str(shard) in message and name in message


def test_unsupported_dtype(tmp_path, tiny_dirs):
    tensors = _st_tensors(tiny_dirs["32b"])
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()
    model_dir = _single_file(tiny_dirs["32b"], tmp_path / "f64", tensors)
    message = _refused(model_dir)
    assert "model.safetensors" in message and "model.norm.weight" in message and "F64" in message


@pytest.mark.parametrize("cut", [1, 4096])
def test_truncated_file(copy32, cut):
    shard = sorted(copy32.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-cut])
    message = _refused(copy32)
    assert str(shard) in message and "outside the file" in message


def test_truncated_after_open(copy32):
    # A file that shrinks between opening (header checked) and reading: the read names the file and tensor.
    ckpt = Checkpoint(copy32)
    info = ckpt.tensors["lm_head.weight"]
    with open(info.file, "r+b") as f:
        f.truncate(info.offset + 10)
    with pytest.raises(CheckpointError) as err:
        ckpt.read_torch("lm_head.weight")
    assert str(info.file) in str(err.value) and "lm_head.weight" in str(err.value) and "truncated" in str(err.value)


def test_index_names_missing_shard(copy32):
    shard = sorted(copy32.glob("*.safetensors"))[-1]
    shard.unlink()
    message = _refused(copy32)
    assert str(copy32 / "model.safetensors.index.json") in message and shard.name in message
    assert "do not exist" in message


def test_index_not_json(copy32):
    index = copy32 / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    message = _refused(copy32)
    assert str(index) in message and "not a valid safetensors index" in message


def test_index_disagrees_with_shards(copy32):
    index_path = copy32 / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"  # it is in shard 2
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    message = _refused(copy32)
    assert str(index_path) in message
    assert "model.norm.weight" in message and "model.layers.0.mlp.extra.weight" in message


def test_tensor_in_two_files(tiny_dirs, tmp_path):
    model_dir = _single_file(tiny_dirs["1.2b"], tmp_path / "dup")
    save_file({"model.norm.weight": torch.ones(64)}, str(model_dir / "extra.safetensors"))
    message = _refused(model_dir)
    assert "model.norm.weight" in message and "also appears in" in message


def test_no_weights_and_no_dir(tmp_path, tiny_dirs):
    model_dir = _copy_meta(tiny_dirs["1.2b"], tmp_path / "empty")
    assert "no *.safetensors weights found" in _refused(model_dir)
    assert "model directory not found" in _refused(tmp_path / "absent")


# ---- lazy: a full-size checkpoint is never read whole -------------------------------------------------------


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def _sparse_supported(directory: Path) -> bool:
    probe = directory / "sparse-probe"
    with open(probe, "wb") as f:
        f.truncate(2**26)
    ok = probe.stat().st_blocks * 512 < 2**20
    probe.unlink()
    return ok


def _write_sparse_checkpoint(model_dir: Path, cfg: dict, num_shards: int) -> int:
    """The full-size checkpoint's files with correct headers but holes for data (no disk, no memory)."""
    spec = spec_from_config(cfg)
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    names = list(expected_tensors(spec).items())
    per_shard = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[k * per_shard : (k + 1) * per_shard]:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(model_dir / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        total += offset
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


@pytest.mark.parametrize("name,num_shards", [("32b", 14), ("1.2b", 1)])
def test_full_size_checkpoint_is_opened_lazily(tmp_path, real_config, name, num_shards):
    if not _sparse_supported(tmp_path):
        pytest.skip(f"{tmp_path}: filesystem without sparse files")
    cfg = real_config(name)
    total = _write_sparse_checkpoint(tmp_path / name, cfg, num_shards)
    spec = spec_from_config(cfg)
    assert total == 2 * spec.num_parameters()  # 64 GB (32B) / 2.6 GB (1.2B) of bf16
    before = _rss()
    ckpt = Checkpoint(tmp_path / name)
    ckpt.validate(load_spec(tmp_path / name))
    assert ckpt.nbytes == total and ckpt.source_dtype() == "bfloat16"
    layer = f"model.layers.{spec.num_layers - 1}."
    q = ckpt.read_torch(layer + "self_attn.q_proj.weight", torch.float32)
    assert q.shape == (spec.q_size, spec.hidden_size) and not q.any()
    del q
    assert _rss() - before < 300 * 2**20


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]},
        {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]},
    ],
    ids=["negative-offset", "float-offsets", "negative-dims", "string-shape"],
)
def test_header_entry_values_checked(tmp_path, entry):
    raw = json.dumps({"model.norm.weight": entry}).encode()
    raw += b" " * (-len(raw) % 8)
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    try:
        Checkpoint(tmp_path)
    except CheckpointError as e:
        assert str(file) in str(e) and "model.norm.weight" in str(e)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"not a CheckpointError: {e!r}") from None
    else:
        raise AssertionError("accepted")
