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

import dataclasses
import shutil

import numpy as np
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
        for preset in ("32b", "1.2b")
        for task in CLASSES
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
    assert (
        spec.head.labels
        == {"sequence-classification": SEQ_LABELS, "token-classification": TOKEN_LABELS, "question-answering": ()}[task]
    )
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
    rows = [rh.encode_text(tok, t).ids for t in texts]
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


# ---- post-processing against transformers' pipelines ---------------------------------------------


def _hf_logits(path, task, texts):
    _, ids, lengths = _batch(path, texts)
    mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = _hf_model(path, task)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out, lengths


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification", "regression"])
def test_classify_matches_text_classification_pipeline(head_dirs, problem_type):
    path = head_dirs[("32b", "sequence-classification")]
    out, _ = _hf_logits(path, "sequence-classification", TEXTS)
    model = _hf_model(path, "sequence-classification")
    model.config.problem_type = problem_type
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=_hf_tokenizer(path))
    head = dataclasses.replace(load_spec(path).head, problem_type=problem_type)
    got = rh.classify(out.logits.numpy(), head)
    top2 = rh.classify(out.logits.numpy(), head, top_k=2)
    labels = {r["label"] for r in got}
    assert len(labels) > 1 or problem_type == "regression"  # not a constant answer
    for text, ours, ours2 in zip(TEXTS, got, top2):
        want = pipe(text)[0] if problem_type is None else pipe(text, top_k=1)[0]
        assert ours["label"] == want["label"] and ours["score"] == pytest.approx(want["score"], rel=1e-5)
        ranked = pipe(text, top_k=None)
        assert list(ours["probs"]) == [r["label"] for r in ranked]
        assert list(ours["probs"].values()) == pytest.approx([r["score"] for r in ranked], rel=1e-5)
        assert list(ours2["probs"]) == [r["label"] for r in ranked[:2]]


def test_token_entities_match_token_classification_pipeline(head_dirs):
    path = head_dirs[("32b", "token-classification")]
    texts = [*TEXTS, "Juliet and Romeo walked from Verona to Mantua with Friar Laurence."]
    out, lengths = _hf_logits(path, "token-classification", texts)
    pipe = transformers.pipeline(
        "token-classification",
        model=_hf_model(path, "token-classification"),
        tokenizer=_hf_tokenizer(path),
        aggregation_strategy="simple",
    )
    tok = Tokenizer.from_dir(path)
    grouped = 0
    for b, text in enumerate(texts):
        enc = rh.encode_text(tok, text)
        ours = rh.token_entities(text, enc, out.logits[b, : lengths[b]].numpy(), TOKEN_LABELS, tok)
        want = pipe(text)
        assert [{k: e[k] for k in ("entity_group", "word", "start", "end")} for e in ours] == [
            {k: e[k] for k in ("entity_group", "word", "start", "end")} for e in want
        ]
        assert [e["score"] for e in ours] == pytest.approx([float(e["score"]) for e in want], rel=1e-5)
        assert all(text[e["start"] : e["end"]].strip() == e["word"].strip() for e in ours)
        grouped += sum(e["end"] - e["start"] > len(tok.encode(e["word"])[:1]) for e in ours)
    assert grouped, "no multi-token entity: the grouping rules went untested"


def test_qa_windows_match_transformers_tokenizer(head_dirs):
    """qa_encode's windows are the pipeline's: HF fast tokenizer, only_second truncation with a stride."""
    path = head_dirs[("32b", "question-answering")]
    tok, hf = Tokenizer.from_dir(path), _hf_tokenizer(path)
    question, context = "Who is the prince?", " ".join(TEXTS * 3)
    windows = rh.qa_encode(tok, question, context, max_seq_len=48, doc_stride=16)
    want = hf(
        question,
        context,
        truncation="only_second",
        max_length=48,
        stride=16,
        padding="do_not_pad",
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    assert len(windows) == len(want["input_ids"]) > 2
    for i, w in enumerate(windows):
        assert w.ids == want["input_ids"][i] and w.offsets == [tuple(o) for o in want["offset_mapping"][i]]
        assert w.sequence_ids == want.sequence_ids(i)
        assert len(w.ids) <= 48
    with pytest.raises(ValueError, match="larger than max_seq_len"):
        rh.qa_encode(tok, question, context, max_seq_len=16, doc_stride=32)


def test_qa_span_scores_match_select_starts_ends(head_dirs):
    """Per window, the span search equals transformers' select_starts_ends (kept in 5.x for document QA)."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    path = head_dirs[("32b", "question-answering")]
    tok = Tokenizer.from_dir(path)
    windows = rh.qa_encode(tok, "Who speaks?", " ".join(TEXTS * 2), max_seq_len=40, doc_stride=12)
    ids, lengths = rh.pad_batch([w.ids for w in windows], tok.pad_id)
    with torch.no_grad():
        start, end = load_head_reference(path, max_positions=64)(torch.from_numpy(ids), torch.from_numpy(lengths))
    for b, w in enumerate(windows):
        n = lengths[b]
        p_mask = np.array([[sid != 1 for sid in w.sequence_ids]], dtype=np.int64)
        want = select_starts_ends(
            start[b : b + 1, :n].numpy(),
            end[b : b + 1, :n].numpy(),
            p_mask,
            np.ones((1, n), np.int64),
            top_k=7,
            max_answer_len=6,
        )
        got = rh._spans(start[b : b + 1, :n].numpy(), end[b : b + 1, :n].numpy(), p_mask == 0, 7, 6, 1e6, False)
        for g, x in zip(got[:3], want[:3]):
            np.testing.assert_allclose(g, x, rtol=1e-6)
        assert all(w.sequence_ids[s] == 1 and s <= e < s + 6 for s, e in zip(*got[:2]))
