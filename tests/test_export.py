"""ONNX export: graph contract, lowering, bundle writing, parity with transformers through ONNX Runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exaone_deploy.bundle import BundleError, load_manifest
from exaone_deploy.checkpoint import CheckpointError
from exaone_deploy.exporter import export as export_mod
from exaone_deploy.exporter.export import ExportError, ExportOptions, export_bundle
from exaone_deploy.exporter.lower import TRT_OP_TYPE, TRT_PLUGIN_NAMESPACE, TRT_PLUGIN_VERSION
from exaone_deploy.opref import attention_ref
from exaone_deploy.runtime.ort_backend import OrtBackend
from exaone_deploy.tiny.make import make_tiny

transformers = pytest.importorskip("transformers")

MAX_SEQ = 256
PROMPT_LEN = 40  # longer than the 32b preset's window of 8
STEPS = 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoints(workdir):
    return {p: make_tiny(workdir / f"ckpt-{p}", p, seed=3, dtype="float32") for p in ("1.2b", "32b")}


@pytest.fixture(scope="module")
def bundles(workdir, checkpoints):
    out = {}
    for preset, ckpt in checkpoints.items():
        for dtype in ("float32", "float16"):
            out[preset, dtype] = export_bundle(
                ckpt,
                workdir / f"bundle-{preset}-{dtype}",
                ExportOptions(dtype=dtype, max_seq_len=MAX_SEQ),
                progress=False,
            )
    return out


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_greedy_with_logits(backend, hf, prompt, steps):
    """Greedy decode in the bundle; at every step compare with transformers on the same tokens."""
    errors, ours_tokens, hf_tokens = [], [], []
    logits = backend.prefill([0], [prompt])[0]
    seq = list(prompt)
    for _ in range(steps + 1):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1].numpy()
        errors.append(float(np.abs(logits - ref).max()))
        ours_tokens.append(int(np.argmax(logits)))
        hf_tokens.append(int(np.argmax(ref)))
        seq.append(hf_tokens[-1])
        if len(errors) > steps:
            break
        logits = backend.decode([0], [hf_tokens[-1]])[0]
    return errors, ours_tokens, hf_tokens


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_ort_fp32_matches_transformers(bundles, checkpoints, preset):
    backend = OrtBackend(bundles[preset, "float32"], capacity=PROMPT_LEN + STEPS + 2)
    hf = hf_model(checkpoints[preset])
    prompt = np.random.default_rng(0).integers(9, 500, PROMPT_LEN).tolist()
    errors, ours, theirs = run_greedy_with_logits(backend, hf, prompt, STEPS)
    assert max(errors) <= 1e-4, errors
    assert ours == theirs


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_ort_fp16_greedy_identical(bundles, checkpoints, preset):
    from exaone_deploy.validate.verify import TOLERANCES

    backend = OrtBackend(bundles[preset, "float16"], capacity=PROMPT_LEN + STEPS + 2)
    hf = hf_model(checkpoints[preset])
    prompt = np.random.default_rng(1).integers(9, 500, PROMPT_LEN).tolist()
    errors, ours, theirs = run_greedy_with_logits(backend, hf, prompt, STEPS)
    tol = TOLERANCES["float16"]
    assert max(errors) <= tol["abs"], errors  # the documented bound (its relative part only adds slack)
    assert ours == theirs


@pytest.mark.parametrize("preset", ["1.2b", "32b"])
def test_left_padded_batch_equals_each_alone(bundles, checkpoints, preset):
    """Three prompts of different lengths, left-padded the transformers way, run as one batch."""
    lengths = [PROMPT_LEN, 17, 29]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(9, 500, n).tolist() for n in lengths]
    S = max(lengths)
    ids = np.zeros((3, S), dtype=np.int64)
    mask = np.zeros((3, S), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p) :] = p
        mask[b, S - len(p) :] = 1
    batch = OrtBackend(bundles[preset, "float32"], max_batch=3, capacity=S + 8)
    # The runtime's left-padding path: strip pads per row, one right-padded prompt step for the batch.
    packed = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    got = batch.prefill([0, 1, 2], packed)
    nxt = got.argmax(-1)
    got2 = batch.decode([0, 1, 2], nxt.tolist())
    alone = OrtBackend(bundles[preset, "float32"], max_batch=1, capacity=S + 8)
    hf = hf_model(checkpoints[preset])
    with torch.no_grad():
        hf_batch = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1].numpy()
    for b, p in enumerate(prompts):
        one = alone.prefill([0], [p])[0]
        np.testing.assert_allclose(got[b], one, atol=1e-5)
        np.testing.assert_allclose(got[b], hf_batch[b], atol=1e-4)
        np.testing.assert_allclose(got2[b], alone.decode([0], [int(nxt[b])])[0], atol=1e-5)


def test_gqa_window_semantics_pinned():
    """ONNX Runtime's GroupQueryAttention local_window_size must mean W keys including the current one."""
    from onnx import TensorProto, helper

    N, Nkv, H, C, W = 4, 2, 8, 24, 4
    names = ["q", "k", "v", "pk", "pv", "seqlens_k", "total"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names[:5]]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, None),
        helper.make_tensor_value_info("total", TensorProto.INT32, None),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        names,
        ["o", "ok", "ov"],
        domain="com.microsoft",
        num_heads=N,
        kv_num_heads=Nkv,
        local_window_size=W,
    )
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "ok", "ov")]
    model = helper.make_model(
        helper.make_graph([node], "g", inputs, outs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    S = 12
    q, k, v = (rng.standard_normal((1, S, n * H)).astype(np.float32) for n in (N, Nkv, Nkv))
    pk = np.zeros((1, Nkv, C, H), np.float32)
    pv = np.zeros_like(pk)
    seqlens, total = np.array([S - 1], np.int32), np.array(S, np.int32)
    o, ok, ov = sess.run(None, dict(q=q, k=k, v=v, pk=pk, pv=pv, seqlens_k=seqlens, total=total))
    ro, rk, rv = attention_ref(q, k, v, pk, pv, seqlens, S, num_heads=N, kv_num_heads=Nkv, window=W)
    np.testing.assert_allclose(o, ro, atol=1e-5)
    np.testing.assert_allclose(ok, rk, atol=1e-6)
    # and a decode step past the window, from the shared buffer
    q1, k1, v1 = (rng.standard_normal((1, 1, n * H)).astype(np.float32) for n in (N, Nkv, Nkv))
    o1, _, _ = sess.run(
        None, dict(q=q1, k=k1, v=v1, pk=ok, pv=ov, seqlens_k=np.array([S], np.int32), total=np.array(S + 1, np.int32))
    )
    r1, _, _ = attention_ref(q1, k1, v1, rk, rv, np.array([S]), S + 1, num_heads=N, kv_num_heads=Nkv, window=W)
    np.testing.assert_allclose(o1, r1, atol=1e-5)


def test_graphs_pass_checker_and_have_contract(bundles):
    for (preset, _dtype), path in bundles.items():
        m = load_manifest(path)
        assert m.spec.num_layers == (4 if preset == "1.2b" else 8)
        for name in ("canonical.onnx", "model.onnx"):
            onnx.checker.check_model(str(path / name), full_check=True)
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
        ops = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(ops) == m.spec.num_layers
        for node, layer in zip(ops, m.spec.layers):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["local_window_size"] == (layer.window if layer.sliding else -1)
            assert attrs["do_rotary"] == int(layer.rope)
            assert (len(node.input) > 7 and node.input[7] != "") == layer.rope
        names = [i.name for i in model.graph.input]
        assert names[:4] == ["input_ids", "seqlens_k", "total_sequence_length", "logits_index"]
        assert model.graph.output[0].name == "logits"
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        # The canonical graph carries our custom op; the weights live in one shared external file.
        canon = onnx.load(str(path / "canonical.onnx"), load_external_data=False)
        assert (
            sum(n.op_type == "EXAONEAttention" and n.domain == "ai.exaone_deploy" for n in canon.graph.node)
            == m.spec.num_layers
        )
        # Weights live in the shared external file; the ort graph's fused q/k/v and gate/up weights in fused.data.
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.data", "fused.data"}
        assert sum(n.op_type == "MatMul" for n in model.graph.node) == 4 * m.spec.num_layers + 1
        assert {e.value for t in canon.graph.initializer for e in t.external_data if e.key == "location"} == {
            "weights.data"
        }


def test_32b_layer_plan_in_graph(bundles):
    m = load_manifest(bundles["32b", "float32"])
    assert [layer["kind"] for layer in m.data["layers"]] == ["sliding"] * 3 + ["global"] + ["sliding"] * 3 + ["global"]
    assert [layer["rope"] for layer in m.data["layers"]] == [True] * 3 + [False] + [True] * 3 + [False]


def test_trt_lowering_has_plugin_nodes(workdir, checkpoints):
    path = export_bundle(
        checkpoints["32b"], workdir / "trt32", ExportOptions(target="trt", max_seq_len=64), progress=False
    )
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == TRT_OP_TYPE]
    assert len(nodes) == 8
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_version"] == TRT_PLUGIN_VERSION.encode()
        assert attrs["plugin_namespace"] == TRT_PLUGIN_NAMESPACE.encode()
        assert {"num_heads", "kv_num_heads", "window", "rotary", "ring", "scale"} <= set(attrs)
    assert not [n for n in model.graph.node if n.domain in ("com.microsoft", "ai.exaone_deploy")]
    assert load_manifest(path).target == "trt"


def test_export_is_byte_identical(workdir, checkpoints):
    a = export_bundle(checkpoints["32b"], workdir / "det-a", ExportOptions(max_seq_len=64), progress=False)
    b = export_bundle(checkpoints["32b"], workdir / "det-b", ExportOptions(max_seq_len=64), progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---- bad input ------------------------------------------------------------------------------------


def _no_partial(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]
    assert not leftovers, leftovers
    assert not (parent / name).exists()


def test_missing_tensor_is_reported(workdir, checkpoints):
    from safetensors.numpy import load_file, save_file

    bad = workdir / "bad-missing"
    shutil.copytree(checkpoints["1.2b"], bad)
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = bad / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    out = workdir / "out-missing"
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.layers.1.mlp.up_proj.weight"):
        export_bundle(bad, out, progress=False)
    _no_partial(workdir, out.name)


def test_unknown_dtype_and_target(workdir, checkpoints):
    with pytest.raises(ExportError, match="unsupported dtype 'int8'"):
        export_bundle(checkpoints["1.2b"], workdir / "x", ExportOptions(dtype="int8"), progress=False)
    with pytest.raises(ExportError, match="unknown target"):
        export_bundle(checkpoints["1.2b"], workdir / "x", ExportOptions(target="tflite"), progress=False)


def test_existing_output_needs_force(workdir, checkpoints, bundles):
    existing = bundles["1.2b", "float32"]
    before = (existing / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(checkpoints["1.2b"], existing, progress=False)
    assert (existing / "manifest.json").read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output(workdir, checkpoints):
    ro = workdir / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="cannot write"):
            export_bundle(checkpoints["1.2b"], ro / "b", progress=False)
    finally:
        ro.chmod(0o700)


def test_output_under_a_file_is_a_clear_error(workdir, checkpoints):
    blocker = workdir / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write"):
        export_bundle(checkpoints["1.2b"], blocker / "bundle", progress=False)


def test_interrupted_export_leaves_no_bundle(workdir, checkpoints, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod.lower, "check_model", boom)
    out = workdir / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(checkpoints["1.2b"], out, progress=False)
    _no_partial(workdir, out.name)


def test_tampered_bundle_is_refused(workdir, bundles):
    copy = workdir / "tampered"
    shutil.copytree(bundles["1.2b", "float32"], copy)
    with open(copy / "weights.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_manifest(copy)


# ---- CLI ------------------------------------------------------------------------------------------


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "exaone_deploy.cli", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(r.stdout + r.stderr)
    return r


def test_cli_verify_passes_and_fails(workdir, checkpoints, bundles):
    r = _cli("verify", bundles["32b", "float32"], "--reference", checkpoints["32b"], "--steps", "4", "--json")
    report = json.loads(r.stdout)
    assert report["ok"] and report["max_abs"] <= 1e-4 and report["greedy_agreement"] == 1.0
    # Same config, other weights: the bundle no longer matches its "reference".
    other = make_tiny(workdir / "other-32b", "32b", seed=4, dtype="float32")
    r = _cli("verify", bundles["32b", "float32"], "--reference", other, "--steps", "2", check=False)
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_cli_export_errors_are_one_line(workdir):
    r = _cli("export", workdir / "does-not-exist", "-o", workdir / "nope", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does-not-exist" in r.stderr


def test_window_sized_caches_for_sliding_layers(bundles):
    """The 32b preset's sliding layers keep W-sized caches; interleaved decoding stays exact."""
    m = load_manifest(bundles["32b", "float32"])
    assert m.io.cache_lengths == [8, 8, 8, "cache_len", 8, 8, 8, "cache_len"]
    model = onnx.load(str(m.model_path), load_external_data=False)
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["past_key_values.0.key"][2] == 8 and dims["past_key_values.3.key"][2] == "cache_len"
    rng = np.random.default_rng(5)
    prompts = [rng.integers(9, 500, n).tolist() for n in (20, 13, 31)]
    batch = OrtBackend(m, max_batch=3, capacity=64)
    assert batch.windowed
    first = batch.prefill([0, 1, 2], prompts)
    alone = OrtBackend(m, max_batch=1, capacity=64)
    expected = []
    for p in prompts:
        steps = [alone.prefill([0], [p])[0]]
        for _ in range(3):
            steps.append(alone.decode([0], [int(steps[-1].argmax())])[0])
        expected.append(steps)
    tok = [int(x.argmax()) for x in first]
    for step in range(3):  # slot 1 is live but idle for the first two steps: it must not be disturbed
        active = [0, 2] if step < 2 else [0, 1, 2]
        if step == 2:
            tok[1] = int(expected[1][0].argmax())
        out = batch.decode(active, [tok[s] for s in active])
        for row, s in zip(out, active):
            want = expected[s][step + 1] if s != 1 else expected[1][1]
            np.testing.assert_allclose(row, want, atol=1e-5)
            tok[s] = int(row.argmax())


def test_full_length_cache_option(workdir, checkpoints, bundles):
    full = export_bundle(
        checkpoints["32b"],
        workdir / "fullcache",
        ExportOptions(max_seq_len=MAX_SEQ, window_cache=False),
        progress=False,
    )
    assert load_manifest(full).io.cache_lengths == ["cache_len"] * 8
    prompt = np.random.default_rng(6).integers(9, 500, PROMPT_LEN).tolist()
    a = OrtBackend(full, capacity=64)
    b = OrtBackend(bundles["32b", "float32"], capacity=64)
    np.testing.assert_allclose(a.prefill([0], [prompt]), b.prefill([0], [prompt]), atol=1e-5)
    for t in (11, 12, 13):
        np.testing.assert_allclose(a.decode([0], [t]), b.decode([0], [t]), atol=1e-5)
    assert b.cache_bytes() < a.cache_bytes()


def test_ort_needs_head_dim_multiple_of_16(workdir, checkpoints):
    bad = workdir / "hd40"
    shutil.copytree(checkpoints["1.2b"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["head_dim"] = 40
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="head_dim 40 is not a multiple of 16"):
        export_bundle(bad, workdir / "hd40-out", progress=False)
    _no_partial(workdir, "hd40-out")


def test_atomic_dir_commits_0755_replaces_only_when_allowed_and_cleans_up(tmp_path):
    from exaone_deploy.bundle import FORMAT, MANIFEST, atomic_dir, is_checkpoint_dir

    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    assert (out / MANIFEST).exists() and oct(out.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(BundleError, match="already exists \\(use --force"):
        with atomic_dir(out):
            raise AssertionError("not reached")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and (out / MANIFEST).exists()  # untouched, no leftovers
    with atomic_dir(out, force=True) as tmp:  # a bundle of ours: --force replaces it
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(BundleError, match="not an exaone-deploy bundle"):  # no longer ours: never replaced
        with atomic_dir(out, force=True):
            raise AssertionError("not reached")
    with pytest.raises(FileExistsError, match="refusing"):  # tiny/: only empty or checkpoint directories
        with atomic_dir(out, replaceable=is_checkpoint_dir, error=FileExistsError):
            pass
