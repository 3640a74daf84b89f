"""EXAONE 4 task heads against transformers' own classes and pipelines.

Checkpoints: transformers' ``Exaone4For{Sequence,Token}Classification`` and ``Exaone4ForQuestionAnswering``
built on the ``make_tiny`` backbones (the hybrid ``32b`` preset and the all-global ``1.2b``), with random heads
(std 1, so predictions are decisive rather than ties), saved with ``save_pretrained``. Then:

* our spec and checkpoint validation read them;
* our reference head logits equal transformers' (fp32, 1e-4) for a right-padded batch of texts of different
  lengths, padded with the pad id as transformers' pooling expects;
* our torch-free post-processing, given transformers' logits, equals transformers' pipelines.
"""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from exaone_deploy.checkpoint import Checkpoint, CheckpointError
from exaone_deploy.exporter.heads import load_head_reference
from exaone_deploy.runtime import heads as rh
from exaone_deploy.spec import load_spec
from exaone_deploy.text.tokenizer import Tokenizer

CLASSES = {
    "sequence-classification": "Exaone4ForSequenceClassification",
    "token-classification": "Exaone4ForTokenClassification",
    "question-answering": "Exaone4ForQuestionAnswering",
}
SEQ_LABELS = ("comedy", "tragedy", "history")
TOKEN_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC")
TEXTS = [
    "ROMEO: But, soft! what light through yonder window breaks?",
    "Now is the winter of our discontent",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings",
    "Peace!",
]


def _make_head(base, out, task: str, seed: int = 0):
    config = transformers.AutoConfig.from_pretrained(base)
    if task != "question-answering":
        labels = SEQ_LABELS if task == "sequence-classification" else TOKEN_LABELS
        config.id2label = dict(enumerate(labels))
        config.label2id = {v: k for k, v in enumerate(labels)}
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[task])(config).float().eval()
    causal = transformers.Exaone4ForCausalLM.from_pretrained(base, dtype=torch.float32)
    getattr(model, model.base_model_prefix).load_state_dict(causal.model.state_dict())
    layer = model.qa_outputs if task == "question-answering" else model.score
    torch.nn.init.normal_(layer.weight, std=1.0)
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias, std=1.0)
    model.save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def head_dirs(tiny_dirs, tmp_path_factory):
    """{(preset, task): checkpoint dir} of transformers' head classes on the tiny backbones."""
    root = tmp_path_factory.mktemp("heads")
    return {
        (preset, task): _make_head(tiny_dirs[preset], root / f"{preset}-{task}", task)
        for preset in ("32b", "1.2b") for task in CLASSES
    }


def _hf_model(path, task):
    return getattr(transformers, CLASSES[task]).from_pretrained(path, dtype=torch.float32).eval()


def _hf_tokenizer(path):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    ours = Tokenizer.from_dir(path)
    tok.add_special_tokens({k: v for k, v in ours.special_tokens.items()})
    return tok


# ---- spec and checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize("task", CLASSES)
def test_spec_and_checkpoint_read_head_classes(head_dirs, task):
    path = head_dirs[("32b", task)]
    spec = load_spec(path)
    assert spec.head.task == task and spec.is_hybrid
    assert spec.head.labels == {"sequence-classification": SEQ_LABELS, "token-classification": TOKEN_LABELS,
                                "question-answering": ()}[task]
    ckpt = Checkpoint(path)
    ckpt.validate(spec)
    assert ckpt.nbytes == 4 * spec.num_parameters()  # fp32: every tensor counted, none unexpected
    prefix = "transformer" if task == "question-answering" else "model"
    assert f"{prefix}.layers.0.self_attn.q_proj.weight" in ckpt and "lm_head.weight" not in ckpt


def test_head_checkpoint_mismatch_is_named(head_dirs, tmp_path):
    """A classifier checkpoint under a causal-LM config: the head tensors are reported by name."""
    path = head_dirs[("32b", "sequence-classification")]
    spec = load_spec(head_dirs[("32b", "token-classification")])
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): score.bias") as e:
        Checkpoint(path).validate(spec)
    assert "mis-shaped tensors (1): score.weight: expected [6, 64], found [3, 64]" in str(e.value)


# ---- logits ------------------------------------------------------------------------------------


def _batch(path, texts):
    tok = Tokenizer.from_dir(path)
    rows = [tok.encode(t) for t in texts]
    ids, lengths = rh.pad_batch(rows, load_spec(path).head.pad_token_id)
    return rows, ids, lengths


@pytest.mark.parametrize("preset", ["32b", "1.2b"])
@pytest.mark.parametrize("task", CLASSES)
def test_head_logits_match_transformers(head_dirs, preset, task):
    path = head_dirs[(preset, task)]
    rows, ids, lengths = _batch(path, TEXTS)
    assert len(set(map(len, rows))) == len(rows) and max(map(len, rows)) > 8  # past the 32b window
    ours = load_head_reference(path, max_positions=256)
    hf = _hf_model(path, task)
    ids_t, len_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    mask = (torch.arange(ids.shape[1])[None] < len_t[:, None]).long()
    with torch.no_grad():
        got = ours(ids_t, len_t)
        want = hf(input_ids=ids_t, attention_mask=mask)
    if task == "sequence-classification":
        assert got.shape == (len(TEXTS), len(SEQ_LABELS))
        torch.testing.assert_close(got, want.logits, atol=1e-4, rtol=1e-4)
        # one row alone (no padding) gives the same logits as in the batch
        torch.testing.assert_close(ours(ids_t[1:2, : lengths[1]], len_t[1:2]), want.logits[1:2], atol=1e-4, rtol=1e-4)
        return
    outs = (got,) if task == "token-classification" else got
    refs = (want.logits,) if task == "token-classification" else (want.start_logits, want.end_logits)
    for o, r in zip(outs, refs):
        assert o.dtype == torch.float32 and o.shape[:2] == ids.shape
        for b, n in enumerate(lengths):  # padded positions are unspecified
            torch.testing.assert_close(o[b, :n], r[b, :n], atol=1e-4, rtol=1e-4)
