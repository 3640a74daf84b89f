"""Export of pre-quantized checkpoints (exporter/prequant_lower.py): the bundle keeps the publisher's values.

For every format on the hybrid ``32b`` preset (sliding + NoPE global layers) and the ``1.2b`` preset:

* the ort bundle's ``MatMulNBits`` initializers, unpacked here with NumPy from the op's documented layout (B
  [N, blocks, block*bits/8] low nibble first, scales [N*blocks], zero points two blocks a byte, default
  2**(bits-1)), and an act-order ``Gather``'s indices, give exactly the checkpoint's dequantized weights;
* greedy decoding equals transformers' ``Exaone4ForCausalLM`` holding those dequantized weights in float32, for
  32 tokens past the window;
* the trt graph passes TensorRT's static checks and its DequantizeLinear weights dequantize exactly too.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exaone_deploy.bundle import load_manifest
from exaone_deploy.exporter.export import ExportOptions, export_bundle
from exaone_deploy.prequant import PrequantConfigError, dequantized_linears, make_prequantized
from exaone_deploy.prequant.st import SafetensorsDir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT_LEN, STEPS = 40, 32  # the 32b preset's window is 8: decoding runs 64 tokens past it
VARIANTS = {
    "gptq": ("gptq", {}),
    "gptq-asym-actorder": ("gptq", {"sym": False, "desc_act": True}),
    "gptq-int8-whole-row": ("gptq", {"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}),
    "awq": ("awq", {}),
    "fp8": ("fp8", {}),  # the real [128, 128] blocks, wider than the tiny linears
    "ct-int4-asym": ("compressed-tensors", {"sym": False}),
    "ct-fp8-block": ("compressed-tensors", {"weight_type": "float", "block_size": (32, 32)}),
    "gptq-actorder": ("gptq", {"desc_act": True}),
}
ORT_CASES = [("32b", v) for v in VARIANTS if v != "gptq-actorder"] + [
    ("1.2b", v) for v in ("gptq-asym-actorder", "awq", "fp8", "ct-int4-asym")
]


@pytest.fixture(scope="module")
def made(tiny_dirs, tmp_path_factory):
    """``made(preset, variant)`` -> checkpoint; ``made(preset, variant, target, dtype)`` -> its bundle (cached)."""
    root, cache = tmp_path_factory.mktemp("prequant-export"), {}

    def get(preset, variant, target=None, dtype="float32"):
        key = (preset, variant, target, dtype)
        if key not in cache:
            if target is None:
                fmt, opts = VARIANTS[variant]
                cache[key] = make_prequantized(tiny_dirs[preset], root / f"{preset}-{variant}", fmt, **opts)
            else:
                cache[key] = export_bundle(
                    get(preset, variant),
                    root / f"{preset}-{variant}-{target}-{dtype}",
                    ExportOptions(target=target, dtype=dtype, max_seq_len=128),
                    progress=False,
                )
        return cache[key]

    return get


def _initializers(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}, m


def _act_orders(m: onnx.ModelProto, inits: dict) -> dict[str, tuple[str, np.ndarray]]:
    """module -> (the act-order Gather feeding its linear, that Gather's order), for linears fed by one."""
    prod = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("MatMulNBits", "MatMul"):
            src = prod.get(n.input[0])
            while src is not None and src.op_type in ("Pad", "Cast"):
                src = prod.get(src.input[0])
            w = prod.get(n.input[1])  # trt: MatMul(x, [Cast](DequantizeLinear named "<module>/..."))
            while w is not None and w.op_type == "Cast":
                w = prod.get(w.input[0])
            module = n.input[1].rpartition(".")[0] if n.op_type == "MatMulNBits" else w and w.name.partition("/")[0]
            if src is not None and src.op_type == "Gather" and src.name.endswith("/act_order"):
                out[module] = (src.name, inits[src.input[1]])
    return out


def _in_checkpoint_order(stored: dict[str, np.ndarray], orders: dict, ckpt) -> dict[str, np.ndarray]:
    """Stored weights [N, K] back in the checkpoint's order. Column j of a linear fed by an act-order Gather reads
    input ``order[j]``; a ``down_proj`` fed without one reads its input in the checkpoint's act-order
    (``argsort(g_idx)``), which the layer's gate/up produce by storing their output rows in that order (the fold)."""
    st = SafetensorsDir(ckpt)

    def down_order(module):
        layer = module.rpartition(".")[0]
        g = f"{layer}.down_proj.g_idx"
        return np.argsort(st[g], kind="stable") if g in st and f"{layer}.down_proj" not in orders else None

    out = {}
    for module, w in stored.items():
        cols = orders[module][1] if module in orders else down_order(module) if module.endswith("down_proj") else None
        rows = down_order(module) if module.endswith(("gate_proj", "up_proj")) else None
        w = w.copy()
        if cols is not None:
            w[:, cols] = w.copy()
        if rows is not None:
            w[rows] = w.copy()
        out[module + ".weight"] = w
    return out


def _unpack_matmulnbits(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    """W [N, K] float32 from a MatMulNBits node's initializers, read from the op's layout (not our packer)."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    b = inits[node.input[1]]
    nb = -(-k // block)
    assert b.shape == (n, nb, block * bits // 8) and b.dtype == np.uint8
    codes = np.stack([b & 15, b >> 4], -1).reshape(n, nb, block) if bits == 4 else b
    scales = inits[node.input[2]].astype(np.float32).reshape(n, nb)
    zp = np.full((n, nb), 1 << (bits - 1), np.float32)
    if len(node.input) > 3 and node.input[3]:
        z = inits[node.input[3]].reshape(n, -1)
        zp = (np.stack([z & 15, z >> 4], -1).reshape(n, -1) if bits == 4 else z)[:, :nb].astype(np.float32)
    w = (codes.astype(np.float32) - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, nb * block)[:, :k]


@pytest.mark.parametrize("preset, variant", ORT_CASES)
def test_ort_weights_are_the_checkpoints_values(made, preset, variant):
    want = dequantized_linears(made(preset, variant))
    bundle = made(preset, variant, "ort")
    inits, m = _initializers(bundle / "model.onnx")
    orders = _act_orders(m, inits)
    nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    fmt, opts = VARIANTS[variant]
    fp8 = opts.get("weight_type") == "float" or fmt == "fp8"
    if fp8:
        assert not nodes  # FP8: dequantized to the bundle dtype (the canonical graph holds each linear's W^T)
        canonical, _ = _initializers(bundle / "canonical.onnx")
        got = {name: canonical[name + ".T"].T for name in want}
    else:
        stored = {node.input[1].removesuffix(".nbits"): _unpack_matmulnbits(node, inits) for node in nodes}
        got = _in_checkpoint_order(stored, orders, made(preset, variant))
        assert not any(name.endswith(".weight.T") and name[:-2] in want for name in inits)  # no float copy
    assert (
        sorted(got) == sorted(want)
        and len(want) == 7 * json.loads((bundle / "config.json").read_text())["num_hidden_layers"]
    )
    for name, w in want.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], w), name
    if variant == "gptq-asym-actorder":  # one Gather per layer input (q/k/v, o, gate/up); down_proj's is folded
        layers = len(want) // 7
        assert len({name for name, _ in orders.values()}) == 3 * layers and len(orders) == 6 * layers
        assert not any(module.endswith("down_proj") for module in orders)
    manifest = json.loads((bundle / "manifest.json").read_text())["prequantized"]
    assert manifest["method"] == fmt and manifest["bits"] == opts.get("bits", 8 if fp8 else 4)
    assert manifest["quantized_linears"] == len(want) and manifest["unquantized"] == []


@pytest.mark.parametrize("preset, variant", ORT_CASES)
def test_greedy_matches_transformers_with_dequantized_weights(made, tiny_dirs, preset, variant):
    from exaone_deploy.runtime.ort_backend import OrtBackend

    hf = transformers.Exaone4ForCausalLM.from_pretrained(str(tiny_dirs[preset]), dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in dequantized_linears(made(preset, variant)).items()}
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not set(state) & set(result.missing_keys)
    assert len(state) == 7 * hf.config.num_hidden_layers
    backend = OrtBackend(made(preset, variant, "ort"), capacity=PROMPT_LEN + STEPS + 2)
    prompt = np.random.default_rng(0).integers(9, 500, PROMPT_LEN).tolist()
    steps = [backend.prefill([0], [prompt])[0]]  # our logits, decoding our own greedy tokens
    for _ in range(STEPS):
        steps.append(backend.decode([0], [int(np.argmax(steps[-1]))])[0])
    ours = [int(np.argmax(x)) for x in steps]
    with torch.no_grad():  # transformers over the same sequence: its greedy choice after every prefix
        ref = hf(torch.tensor([prompt + ours[:-1]])).logits[0, PROMPT_LEN - 1 :].numpy()
    theirs = [int(t) for t in ref.argmax(-1)]
    errors = np.abs(np.stack(steps) - ref).max(-1)
    assert ours == theirs
    assert max(errors) <= 1e-4, errors


def test_int4_bundle_size_is_the_checkpoints(made):
    """float16 bundle of a 4-bit GPTQ checkpoint: its tensors within 10% of the checkpoint's (bf16 embeddings
    and lm_head become fp16 of the same size): no float copy of the linears anywhere."""
    from exaone_deploy.checkpoint import Checkpoint

    ckpt_bytes = Checkpoint(made("32b", "gptq")).nbytes
    bundle = made("32b", "gptq", "ort", "float16")
    inits, _ = _initializers(bundle / "model.onnx")
    bundle_bytes = sum(a.nbytes for a in inits.values() if a.ndim)  # tensors, not the shape constants
    files = sum((bundle / f).stat().st_size for f in ("weights.data",))
    assert abs(bundle_bytes - ckpt_bytes) <= 0.1 * ckpt_bytes, (bundle_bytes, ckpt_bytes)
    assert files <= 1.1 * ckpt_bytes and not (bundle / "fused.data").exists()
    # inspect's estimate (before export) is the bundle's size, less the RoPE tables it does not count
    from exaone_deploy.exporter.prequant_lower import estimate
    from exaone_deploy.spec import load_spec

    est = estimate(Checkpoint(made("32b", "gptq")), load_spec(bundle), "ort", "float16")
    rope = sum(a.nbytes for n, a in inits.items() if n in ("cos_cache", "sin_cache"))
    assert est["bundle_weight_bytes"] == bundle_bytes - rope and est["checkpoint_bytes"] == ckpt_bytes


def test_cli_make_tiny_quantized_and_inspect(tmp_path):
    from click.testing import CliRunner

    from exaone_deploy.cli import main

    runner = CliRunner()
    out = tmp_path / "awq"
    r = runner.invoke(main, ["make-tiny", str(out), "--preset", "32b", "--quantized", "awq", "--group-size", "64"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "quantization: awq (gemm), int4, group/block 64, sym False" in r.output
    assert "left unquantized: embed_tokens, norms, lm_head" in r.output and "matmulnbits block 64" in r.output
    r = runner.invoke(main, ["inspect", str(out), "--json"])
    q = json.loads(r.output)["quantization"]
    assert q["method"] == "awq" and q["quantized_linears"] == 56 and q["bundle_weight_bytes"] > 0
    r = runner.invoke(main, ["inspect", str(out), "--target", "trt"])
    assert r.exit_code != 0 and "quantization_config.zero_point = True for trt" in r.output


def _unpack_dq(node: onnx.NodeProto, inits: dict, k: int) -> np.ndarray:
    """W [N, K] float32 from a weight DequantizeLinear (x [K(padded), N], axis 0 blocks or axis 1 channels)."""
    q, s = inits[node.input[0]].astype(np.float32), inits[node.input[1]].astype(np.float32)
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    full = np.repeat(s, a["block_size"], axis=0) if a.get("axis") == 0 else s[None, :]
    return (q * full)[:k].T


@pytest.mark.parametrize("variant", ["gptq", "gptq-actorder", "fp8", "ct-fp8-block", "gptq-int8-whole-row"])
def test_trt_graph_passes_checks_and_keeps_the_values(made, variant):
    from exaone_deploy.tensorrt.checks import check_bundle

    want = dequantized_linears(made("32b", variant))
    bundle = made("32b", variant, "trt")
    report = check_bundle(bundle)
    assert report.ok, [str(i) for i in report.errors]
    qtype = {"fp8": "FP8", "ct-fp8-block": "FP8", "gptq-int8-whole-row": "INT8"}.get(variant, "INT4")
    assert report.quantization == {qtype: len(want)}
    inits, m = _initializers(bundle / "model.onnx")
    orders = _act_orders(m, inits)
    stored = {
        n.name.partition("/")[0]: _unpack_dq(n, inits, want[n.name.partition("/")[0] + ".weight"].shape[1])
        for n in m.graph.node
        if n.op_type == "DequantizeLinear"
    }
    got = _in_checkpoint_order(stored, orders, made("32b", variant))
    for module, w in got.items():
        assert np.array_equal(w, want[module]), module


def test_verify_passes_on_a_gptq_checkpoint(made):
    from exaone_deploy.validate.verify import verify_bundle

    report = verify_bundle(made("32b", "gptq-asym-actorder", "ort"), made("32b", "gptq-asym-actorder"), steps=16)
    assert report["ok"] and report["max_abs"] <= 1e-4 and report["greedy_agreement"] == 1.0


@pytest.mark.parametrize(
    "variant, target, dtype, message",
    [
        ("awq", "trt", "float32", "quantization_config.zero_point = True for trt"),
        ("ct-int4-asym", "trt", "float32", "quantization_config.sym = False for trt"),
        ("gptq", "ort", "bfloat16", "needs --dtype float32 or float16 on ort"),
    ],
)
def test_unsupported_lowering_refused_naming_field(made, tmp_path, variant, target, dtype, message):
    from exaone_deploy.errors import ExaoneDeployError

    with pytest.raises(ExaoneDeployError, match=message) as e:
        export_bundle(made("32b", variant), tmp_path / "b", ExportOptions(target=target, dtype=dtype), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


def test_grouped_int8_refused_on_trt(made, tiny_dirs, tmp_path):
    from exaone_deploy.exporter.prequant_lower import PrequantLowerError

    ckpt = make_prequantized(tiny_dirs["32b"], tmp_path / "q", "gptq", bits=8, group_size=32)
    with pytest.raises(PrequantLowerError, match="quantization_config.group_size = 32 with bits = 8 for trt"):
        export_bundle(ckpt, tmp_path / "b", ExportOptions(target="trt"), progress=False)


def test_quantized_lm_head_and_bad_shapes_refused(made, tmp_path):
    import shutil

    from exaone_deploy.checkpoint import Checkpoint, CheckpointError
    from exaone_deploy.spec import load_spec

    src = made("32b", "gptq")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    for name in ("config.json",):
        config = json.loads((dst / name).read_text())
        config["quantization_config"]["lm_head"] = True
        (dst / name).write_text(json.dumps(config))
    with pytest.raises(PrequantConfigError, match="quantization_config.lm_head = True"):
        Checkpoint(dst)
    # A group size the tensors do not have: the packed tensors are reported mis-shaped, by name.
    config["quantization_config"].update(lm_head=False, group_size=16)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "quantize_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.scales: expected \[8, 64\]"):
        Checkpoint(dst).validate(load_spec(dst))


def test_accuracy_level_option_sets_matmulnbits_and_manifest(made, tmp_path):
    """--accuracy-level 4 (int8 activations, the arithmetic of our own int4 bundles): the attribute is set on every
    MatMulNBits and recorded in the manifest; out-of-range levels are refused."""
    from click.testing import CliRunner

    from exaone_deploy.commands import main

    ckpt = made("32b", "gptq")
    outs = {}
    for level in (0, 4):
        out = tmp_path / f"l{level}"
        r = CliRunner().invoke(
            main,
            [
                "export",
                str(ckpt),
                "-o",
                str(out),
                "--accuracy-level",
                str(level),
                "--max-seq-len",
                "128",
                "--no-progress",
            ],
        )
        assert r.exit_code == 0, r.output
        m = onnx.load(out / "model.onnx", load_external_data=False)
        levels = {
            a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"
        }
        assert levels == {level}
        assert load_manifest(out).get("prequantized")["accuracy_level"] == level
        outs[level] = out
    r = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "bad"), "--accuracy-level", "7"])
    assert r.exit_code != 0


def _mlp_graph(extra_use: bool):
    """x -> gate/up (Transpose(W) -> MatMul) -> silu(gate) * up -> down, as the exporter traces EXAONE's MLP;
    ``extra_use``: gate's output is also a graph output (a second consumer the fold must not reorder)."""
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([1, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21})
    transposes, outs = {}, {}
    for module, src in (("mlp.gate_proj", x), ("mlp.up_proj", x), ("mlp.down_proj", None)):
        w = ir.Value(name=f"{module}.weight", const_value=ir.tensor(np.ones((4, 4), np.float32)))
        graph.register_initializer(w)
        t = ir.node("Transpose", [w], name=f"{module}/t")
        if src is None:
            sig = ir.node("Sigmoid", [outs["mlp.gate_proj"]])
            silu = ir.node("Mul", [outs["mlp.gate_proj"], sig.outputs[0]])
            prod = ir.node("Mul", [silu.outputs[0], outs["mlp.up_proj"]])
            graph.extend([sig, silu, prod])
            src = prod.outputs[0]
        mm = ir.node("MatMul", [src, t.outputs[0]], name=f"{module}/mm")
        graph.extend([t, mm])
        transposes[module], outs[module] = t, mm.outputs[0]
    graph.outputs.append(outs["mlp.down_proj"])
    if extra_use:
        graph.outputs.append(outs["mlp.gate_proj"])
    return transposes


@pytest.mark.parametrize("extra_use", [False, True])
def test_act_order_fold_only_where_exact(extra_use):
    """down_proj's act-order folds into gate/up's output rows through silu(gate) * up, and not when gate's output
    has another consumer (reordering it would change that consumer's input)."""
    from exaone_deploy.exporter import prequant_lower as pl
    from exaone_deploy.prequant import PrequantScheme

    transposes = _mlp_graph(extra_use)
    scheme = PrequantScheme("gptq", 4, 2, sym=True, zero_point=True, desc_act=True)
    lins = {}
    for module in transposes:
        lin = lins[module] = pl._Linear.__new__(pl._Linear)
        lin.scheme, lin.plan = scheme, pl.LinearPlan(module, 4, 4, 4, 2, 2, "matmulnbits")
        lin.perm, lin.input_permuted, lin.out_perm = np.array([3, 1, 0, 2]), False, None
    pl._fold_act_orders(lins, transposes)
    folded = not extra_use
    assert lins["mlp.down_proj"].input_permuted is folded
    for module in ("mlp.gate_proj", "mlp.up_proj"):
        assert (lins[module].out_perm is lins["mlp.down_proj"].perm) is folded
        assert not lins[module].input_permuted  # x is the layer input: its own Gather stays
