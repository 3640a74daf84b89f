"""Train the bundled tiny EXAONE 4.0 model on tinyshakespeare.

    python -m exaone_deploy.tiny.train --out exaone_deploy/assets/tiny [--steps N --seed S]

The model is a ``transformers.Exaone4ForCausalLM`` whose config.json uses the real EXAONE 4.0 spellings (as
``exaone_deploy.tiny.make`` writes them for its "32b" preset: ``rope_scaling`` llama3 + ``rope_theta``,
``sliding_window``, ``sliding_window_pattern`` "LLLG" and ``layer_types``): three sliding-window RoPE layers then a
global NoPE layer, embeddings tied to the LM head, fp32 weights.

Data: ``exaone_deploy/assets/tinyshakespeare.txt`` split by characters at 90% (``exaone_deploy.assets``): the
first 90% trains the tokenizer (``train_tokenizer``: byte-level BPE with EXAONE's special tokens and chat
template) and the model; the last 10% is held out. Training draws random windows of ``seq_len + 1`` tokens from
the tokenised training split (no document boundaries, no BOS), AdamW with linear warmup and cosine decay.

Held-out metrics (``train_report.json``): the held-out split is tokenised on its own and every token but the
first is scored, in windows of ``seq_len`` tokens that advance by ``seq_len // 2`` (every token after the first
window is predicted with at least ``seq_len // 2`` tokens of context). Perplexity is ``exp`` of the mean token
NLL; bits per character is the summed NLL in bits over the characters those tokens spell, so it compares across
tokenizers.

Deterministic for a seed, as far as torch on CPU allows (same thread count, same torch build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# OpenMP threads that sleep instead of spinning when they wait: on a busy 2-core machine spinning threads make
# 2-thread training several times slower than 1 thread. Read when torch loads OpenMP, so set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ..assets import heldout_text, split_index, train_text
from ..bundle import atomic_dir, is_checkpoint_dir
from .make import TRANSFORMERS_VERSION, _config
from .tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, train_tokenizer

__all__ = ["MODEL", "evaluate", "train"]

# The architecture. hidden = heads * head_dim, GQA 4:1, MLP ~2.7x hidden; ~1.4M parameters, ~5.5 MB in fp32.
# head_dim is a multiple of 16, as ONNX Runtime's GroupQueryAttention requires (the real models use 64/128).
MODEL = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=32,
    sliding_window_pattern="LLLG",
    tie_word_embeddings=True,
    dtype="float32",
)
VOCAB_SIZE = 1536

DEFAULTS = dict(
    steps=1000,
    seed=0,
    batch_size=16,
    seq_len=256,
    lr=2e-3,
    min_lr_ratio=0.1,
    warmup=100,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_every=250,
    threads=2,
)

SAMPLE_PROMPT = "ROMEO:\n"


def _write_json(path: Path, obj: dict, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def _lr_at(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Summed NLL (nats) of ``ids[1:]`` given what precedes them, in windows of ``seq_len`` advancing by half."""
    model.eval()
    stride = seq_len // 2
    windows = []  # (start, first scored target position within the window)
    start = 0
    while True:
        end = min(start + seq_len + 1, len(ids))
        windows.append((start, 0 if start == 0 else seq_len - stride, end))
        if end == len(ids):
            break
        start += stride
    total, scored = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(end - start for start, _, end in group)
        x = torch.zeros((len(group), width - 1), dtype=torch.long)
        y = torch.full((len(group), width - 1), -100, dtype=torch.long)
        for row, (start, first, end) in enumerate(group):
            chunk = ids[start:end]
            x[row, : len(chunk) - 1] = chunk[:-1]
            # Score targets from `first` on; earlier ones were scored by the previous window with more context.
            # Targets past the previous window's end are all new, so skip exactly what it already scored.
            y[row, first : len(chunk) - 1] = chunk[1 + first :]
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        scored += int((y != -100).sum())
    assert scored == len(ids) - 1, (scored, len(ids))
    model.train()
    return total


def _save_weights(model, path: Path, tied: bool) -> int:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, as the real tied checkpoints store
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates it 0600
    return sum(v.numel() for v in state.values())


def _samples(model, tokenizer, seed: int, max_new_tokens: int = 120) -> dict[str, str]:
    model.eval()
    ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        torch.manual_seed(seed)
        sampled = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50, top_p=1.0
        )
    model.train()
    return {
        "prompt": SAMPLE_PROMPT,
        "greedy": tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True),
        "sampled (temperature 0.8, top_k 50)": tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=True),
    }


def train(out_dir: str | Path, **overrides) -> dict:
    """Train the tiny model, write it to ``out_dir`` (replaced atomically) and return the training report."""
    import transformers
    from transformers import AutoTokenizer, Exaone4Config, Exaone4ForCausalLM

    args = {**DEFAULTS, **overrides}
    torch.set_num_threads(args["threads"])
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    with atomic_dir(out_dir, replaceable=is_checkpoint_dir, error=FileExistsError) as tmp:
        report = _train_into(tmp, args, AutoTokenizer, Exaone4Config, Exaone4ForCausalLM)
    return report


def _train_into(tmp: Path, args: dict, AutoTokenizer, Exaone4Config, Exaone4ForCausalLM) -> dict:
    t_start = time.time()
    train_str, heldout_str = train_text(), heldout_text()

    # Tokenizer, on the training split only.
    train_tokenizer([train_str], VOCAB_SIZE, tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    ids = {
        "bos": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    }
    train_ids = torch.tensor(tokenizer(train_str).input_ids, dtype=torch.long)
    heldout_ids = torch.tensor(tokenizer(heldout_str).input_ids, dtype=torch.long)
    # Characters spelled by the scored held-out tokens (all but the first).
    heldout_chars = len(heldout_str) - len(tokenizer.decode(heldout_ids[:1]))
    print(
        f"tokens: train {len(train_ids)} ({len(train_str)} chars), held-out {len(heldout_ids)} "
        f"({len(heldout_str)} chars)",
        flush=True,
    )

    # Config in the real EXAONE 4.0 spelling; transformers reads it back from the file.
    config_dict = _config(MODEL, MODEL["num_hidden_layers"], MODEL["dtype"], len(tokenizer), ids)
    _write_json(tmp / "config.json", config_dict)
    _write_json(
        tmp / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": ids["bos"],
            "do_sample": False,
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "transformers_version": TRANSFORMERS_VERSION,
        },
    )
    config = Exaone4Config.from_pretrained(tmp)
    config.use_cache = False
    config._attn_implementation = "sdpa"

    torch.manual_seed(args["seed"])
    model = Exaone4ForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"parameters: {n_params}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args["seed"] + 1)
    B, T, steps = args["batch_size"], args["seq_len"], args["steps"]
    offsets = torch.arange(T + 1)
    history, window_losses, losses_tail = [], [], []
    t_train = time.time()
    for step in range(steps):
        lr = _lr_at(step, steps, args["lr"], args["warmup"], args["min_lr_ratio"])
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args["grad_clip"])
        opt.step()
        window_losses.append(loss.item())
        losses_tail = (losses_tail + [loss.item()])[-100:]
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.time() - t_train
            print(
                f"step {step + 1}/{steps} loss {sum(window_losses) / len(window_losses):.4f} lr {lr:.2e} "
                f"{elapsed:.0f}s {(step + 1) * B * T / elapsed:.0f} tok/s",
                flush=True,
            )
            window_losses = []
        if args["eval_every"] and ((step + 1) % args["eval_every"] == 0) and step + 1 != steps:
            nll = evaluate(model, heldout_ids, T)
            entry = {
                "step": step + 1,
                "train_loss": sum(losses_tail) / len(losses_tail),
                "heldout_loss": nll / (len(heldout_ids) - 1),
            }
            history.append(entry)
            print(
                f"  eval step {step + 1}: held-out loss {entry['heldout_loss']:.4f} "
                f"ppl {math.exp(entry['heldout_loss']):.2f} bpc {nll / math.log(2) / heldout_chars:.4f}",
                flush=True,
            )
    train_seconds = time.time() - t_train

    nll = evaluate(model, heldout_ids, T)
    heldout_loss = nll / (len(heldout_ids) - 1)
    final_train_loss = sum(losses_tail) / len(losses_tail)
    history.append({"step": steps, "train_loss": final_train_loss, "heldout_loss": heldout_loss})

    n_stored = _save_weights(model, tmp / "model.safetensors", config.tie_word_embeddings)
    # The saved files must load back in transformers to the same model.
    reloaded = Exaone4ForCausalLM.from_pretrained(tmp).eval()
    model.eval()
    probe = heldout_ids[:T][None]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=probe).logits, model(input_ids=probe).logits, atol=1e-5)
    samples = _samples(reloaded, tokenizer, args["seed"])

    report = {
        "seed": args["seed"],
        "steps": steps,
        "hyperparameters": {
            k: args[k]
            for k in ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "threads")
        },
        "optimizer": "AdamW(betas=(0.9, 0.95)), linear warmup then cosine decay to min_lr_ratio * lr",
        "tokens_seen": steps * B * T,
        "epochs": round(steps * B * T / len(train_ids), 2),
        "parameters": n_params,
        "stored_parameters": n_stored,
        "vocab_size": len(tokenizer),
        "data": {
            "corpus": "tinyshakespeare.txt",
            "corpus_chars": len(train_str) + len(heldout_str),
            "split": "by characters: train = text[:len(text) * 9 // 10], held-out = the rest",
            "split_index": split_index(),
            "train_chars": len(train_str),
            "train_tokens": len(train_ids),
            "heldout_chars": len(heldout_str),
            "heldout_tokens": len(heldout_ids),
        },
        "final_train_loss": round(final_train_loss, 4),  # mean minibatch loss of the last 100 steps
        "final_train_loss_steps": len(losses_tail),
        "heldout": {
            "loss": round(heldout_loss, 4),
            "perplexity": round(math.exp(heldout_loss), 3),
            "bits_per_char": round(nll / math.log(2) / heldout_chars, 4),
            "method": (
                f"held-out split tokenised alone; tokens 1.. scored in windows of {T} advancing by {T // 2}; "
                "perplexity = exp(mean token NLL); bpc = sum NLL / ln 2 / chars of the scored tokens"
            ),
        },
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()} for h in history],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_version": torch.__version__,
        "samples": samples,
    }
    _write_json(tmp / "train_report.json", report, sort_keys=False)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "tiny")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    a = parser.parse_args(argv)
    report = train(
        a.out,
        steps=a.steps,
        seed=a.seed,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        warmup=a.warmup,
        eval_every=a.eval_every,
        threads=a.threads,
    )
    print(
        json.dumps(
            {k: report[k] for k in ("steps", "final_train_loss", "heldout", "parameters", "train_seconds")}, indent=2
        )
    )
    for name, text in report["samples"].items():
        print(f"--- {name}\n{text}")


if __name__ == "__main__":
    main()
