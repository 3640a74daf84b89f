"""Train a small byte-level BPE tokenizer laid out like EXAONE 4.0's.

The real tokenizer (102,400 tokens) is a byte-level BPE whose files we cannot download here. This trains a small
one with the same pieces: a ByteLevel pre-tokenizer and decoder, no normaliser (so Korean and Spanish text
round-trips byte for byte), EXAONE's special tokens, the reasoning/tool tags as plain added tokens (so decoding
keeps them), and the EXAONE 4.0 chat template. The ids differ from the real model's: consumers must read them
from the tokenizer files, never hard-code them.

Files written: tokenizer.json, tokenizer_config.json and special_tokens_map.json, loadable by
``tokenizers.Tokenizer.from_file`` and by transformers' ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "SPECIAL_TOKENS",
    "ADDED_TOKENS",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "chat_template",
    "train_tokenizer",
]

PAD_TOKEN = "[PAD]"
BOS_TOKEN = "[BOS]"
UNK_TOKEN = "[UNK]"
EOS_TOKEN = "[|endofturn|]"  # the end of a turn ends generation: tokenizer eos and generation eos

# Special tokens, in id order from 0 (the real model has [PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3 too).
# decode(skip_special_tokens=True) drops these.
SPECIAL_TOKENS = [
    PAD_TOKEN,
    BOS_TOKEN,
    "[EOS]",
    UNK_TOKEN,
    "[|system|]",
    "[|tool|]",
    "[|assistant|]",
    "[|user|]",
    EOS_TOKEN,
]

# Tags the model reads and writes as single tokens but that are text, not control: decode keeps them.
ADDED_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_result>",
    "</tool_result>",
    "<tool>",
    "</tool>",
]

CHAT_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "assets" / "exaone4_chat_template.jinja"

# transformers' "no limit" value, as in the real tokenizer_config.json.
MODEL_MAX_LENGTH = 1000000000000000019884624838656


def chat_template() -> str:
    """The EXAONE 4.0 chat template (Jinja source) bundled with the package."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def _added_token_entry(token: AddedToken, special: bool) -> dict:
    # The per-token entry of tokenizer_config.json's "added_tokens_decoder", as transformers writes it.
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": special,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> None:
    """Train a byte-level BPE of ``vocab_size`` tokens in all on ``texts`` and write it to ``out_dir``.

    Ids: the special tokens come first (``[PAD]`` 0, ``[BOS]`` 1, ``[EOS]`` 2, ``[UNK]`` 3, then the role tokens
    and ``[|endofturn|]``), then the 256 byte tokens and the learned merges, then the think/tool tags last.
    Training is deterministic: the same texts give the same files.
    """
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet()) + len(ADDED_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + 256 bytes + tags)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=[AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tags = [AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS]
    tokenizer.add_tokens(tags)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    added_tokens_decoder = {}
    for token in [AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS]:
        added_tokens_decoder[str(tokenizer.token_to_id(token.content))] = _added_token_entry(token, True)
    for token in tags:
        added_tokens_decoder[str(tokenizer.token_to_id(token.content))] = _added_token_entry(token, False)

    special_tokens_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    config = {
        "add_bos_token": False,  # the chat template adds no BOS, like the real tokenizer
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)
