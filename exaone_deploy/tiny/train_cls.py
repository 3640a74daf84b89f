"""Fine-tune the bundled tiny model into ``tiny-cls``: which play does a Tiny Shakespeare line come from?

    python -m exaone_deploy.tiny.train_cls --out exaone_deploy/assets/tiny-cls [--steps N --seed S]

Labels. Tiny Shakespeare has no play titles: it is speeches (``NAME:`` then the lines spoken) from a dozen plays
laid end to end. A speech is labelled with its play when its speaker is one of that play's principal characters
and the name occurs in no other play of the corpus (:data:`PLAYS`: e.g. ROMEO, JULIET, MERCUTIO ->
romeo_and_juliet). Names several plays share (GLOUCESTER, YORK, QUEEN, Servant, First Citizen, ...) are left out,
and so are the speeches of the plays not chosen. Each non-empty line of a labelled speech is one example, without
its speaker's name (the name would give the answer away).

Split: by speech, not by line (the lines of one speech are near-duplicates in style and would leak), the speeches
whose seeded hash falls in the last ``heldout`` fraction held out. The tiny LM itself was pretrained (without
labels) on the corpus's first 90%, so most held-out lines were seen as plain text; what is held out is their label.

Model: transformers' ``Exaone4ForSequenceClassification`` on the tiny config (``id2label`` = the plays, pad id 0),
backbone initialised from the tiny causal LM, ``score`` from zero-mean noise; AdamW with linear warmup and cosine
decay on batches of right-padded lines, cross-entropy. Saved in bfloat16 (the asset stays under 5 MB) with the
tiny tokenizer files; ``train_report.json`` has the held-out accuracy of the saved (bfloat16) weights, the
majority-class baseline and the counts per play.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ..assets import corpus_path, tiny_model_dir  # noqa: E402
from ..bundle import atomic_dir, is_checkpoint_dir  # noqa: E402
from .train import _lr_at  # noqa: E402

__all__ = ["PLAYS", "labelled_lines", "split", "train"]

# play -> principal characters found in that play only (within tinyshakespeare), as the corpus spells them
PLAYS = {
    "coriolanus": ("CORIOLANUS", "MARCIUS", "MENENIUS", "VOLUMNIA", "SICINIUS", "COMINIUS", "AUFIDIUS"),
    "romeo_and_juliet": (
        "ROMEO",
        "JULIET",
        "FRIAR LAURENCE",
        "MERCUTIO",
        "BENVOLIO",
        "CAPULET",
        "LADY CAPULET",
        "Nurse",
    ),
    "richard_ii": ("KING RICHARD II", "HENRY BOLINGBROKE", "JOHN OF GAUNT", "THOMAS MOWBRAY", "DUKE OF AUMERLE"),
    "measure_for_measure": ("DUKE VINCENTIO", "ISABELLA", "ANGELO", "LUCIO", "POMPEY", "CLAUDIO", "ELBOW"),
    "taming_of_the_shrew": (
        "PETRUCHIO",
        "KATHARINA",
        "TRANIO",
        "HORTENSIO",
        "LUCENTIO",
        "GRUMIO",
        "GREMIO",
        "BAPTISTA",
        "BIONDELLO",
    ),
    "winters_tale": (
        "LEONTES",
        "POLIXENES",
        "HERMIONE",
        "PAULINA",
        "CAMILLO",
        "AUTOLYCUS",
        "FLORIZEL",
        "PERDITA",
        "ANTIGONUS",
    ),
}
LABELS = tuple(PLAYS)
DEFAULTS = dict(
    steps=600, seed=0, batch_size=64, lr=1e-3, warmup=60, min_lr_ratio=0.1, weight_decay=0.01, heldout=0.1, threads=2
)


def labelled_lines(text: str | None = None) -> list[tuple[int, str, int]]:
    """(speech index, line, label id) for every line of every labelled speech, in corpus order."""
    text = corpus_path().read_text(encoding="utf-8") if text is None else text
    play_of = {name: i for i, play in enumerate(LABELS) for name in PLAYS[play]}
    out = []
    for s, block in enumerate(text.split("\n\n")):
        speaker, _, body = block.strip("\n").partition("\n")
        label = play_of.get(speaker[:-1]) if speaker.endswith(":") else None
        if label is not None:
            out.extend((s, line.strip(), label) for line in body.split("\n") if line.strip())
    return out


def split(examples: list[tuple[int, str, int]], heldout: float, seed: int):
    """(train, held out): whole speeches go to one side, by a seeded hash of the speech index."""

    def held(s: int) -> bool:
        return zlib.crc32(f"{seed}:{s}".encode()) / 2**32 >= 1.0 - heldout

    train = [(line, y) for s, line, y in examples if not held(s)]
    test = [(line, y) for s, line, y in examples if held(s)]
    return train, test


def _batch(tok, lines: list[str]):
    rows = [tok.encode(line, add_special_tokens=True) for line in lines]
    n = max(map(len, rows))
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def accuracy(model, tok, data: list[tuple[str, int]], batch_size: int = 256) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        ids, mask = _batch(tok, [x for x, _ in chunk])
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        hits += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return hits / len(data)


def train(out_dir: str | Path, **overrides) -> dict:
    """Fine-tune, save the checkpoint into ``out_dir`` (atomically) and return the report."""
    import transformers

    args = {**DEFAULTS, **overrides}
    torch.manual_seed(args["seed"])
    random.seed(args["seed"])
    torch.set_num_threads(args["threads"])
    src = tiny_model_dir()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    train_set, test_set = split(labelled_lines(), args["heldout"], args["seed"])
    config = transformers.AutoConfig.from_pretrained(src)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {v: k for k, v in enumerate(LABELS)}
    config.pad_token_id = 0
    model = transformers.Exaone4ForSequenceClassification(config).float()
    lm = transformers.Exaone4ForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.load_state_dict(lm.model.state_dict())
    torch.nn.init.normal_(model.score.weight, std=0.02)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args["lr"],
    )
    t0, losses = time.perf_counter(), []
    for step in range(args["steps"]):
        model.train()
        lr = _lr_at(step, args["steps"], args["lr"], args["warmup"], args["min_lr_ratio"])
        for group in opt.param_groups:
            group["lr"] = lr
        chunk = random.sample(train_set, args["batch_size"])
        ids, mask = _batch(tok, [x for x, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([y for _, y in chunk])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1}/{args['steps']} loss {sum(losses[-100:]) / 100:.4f} lr {lr:.2e} "
                f"{time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    model = model.to(torch.bfloat16).float()  # what the bfloat16 asset holds
    counts = [sum(y == i for _, y in test_set) for i in range(len(LABELS))]
    report = {
        "task": "sequence-classification: which play a Tiny Shakespeare line comes from",
        "labels": list(LABELS),
        "speakers": PLAYS,
        "examples": {"train": len(train_set), "heldout": len(test_set)},
        "heldout_per_play": dict(zip(LABELS, counts)),
        "heldout_accuracy": round(accuracy(model, tok, test_set), 4),
        "majority_baseline": round(max(counts) / len(test_set), 4),
        "train_accuracy_sample": round(accuracy(model, tok, random.sample(train_set, 2000)), 4),
        "hyperparameters": {k: args[k] for k in DEFAULTS},
        "train_seconds": round(train_s, 1),
        "final_loss": round(sum(losses[-50:]) / 50, 4),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with atomic_dir(out_dir, replaceable=is_checkpoint_dir) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(src / name, tmp / name)
        (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600; the asset ships readable
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    a = vars(parser.parse_args(argv))
    report = train(a.pop("out"), **a)
    print(json.dumps({k: report[k] for k in ("examples", "heldout_accuracy", "majority_baseline")}))


if __name__ == "__main__":
    main()
