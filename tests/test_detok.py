"""IncrementalDecoder: streamed deltas join to exactly the full decode, without U+FFFD for split characters."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from exaone_deploy.text.detok import IncrementalDecoder
from exaone_deploy.text.tokenizer import Tokenizer
from exaone_deploy.tiny.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Streaming text arrives one token at a time.",
    "안녕하세요, 반갑습니다. 오늘 서울의 날씨는 맑고 따뜻합니다. 한국어 문장을 토큰으로 나눕니다.",
    "¿Dónde está la biblioteca? Mañana será otro día, señor. El niño comió piñas y jamón.",
] * 10

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog, twice.\nNew line, tabs\tand  spaces.",
    "korean": "안녕하세요! 오늘 서울의 날씨는 맑습니다. 처음 보는 글자: 뷁, 똠방각하.",
    "spanish": "¿Qué tal? Mañana iré a la biblioteca con el niño; ¡olé! Canción, corazón, pingüino.",
    "mixed": "EXAONE 4.0 — 한국어/Español/English 🎉🇰🇷 中文 𝄞 naïve café [|user|] <think>",
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS, 500, path)
    return Tokenizer.from_dir(path)


class CountingTokenizer:
    """Wraps a tokenizer and records the longest id list each decode call saw."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.longest = 0
        self.calls = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(tok, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", list(TEXTS))
def test_deltas_join_to_text(tok, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # every prefix of the stream is a prefix of the text: nothing is ever taken back
    shown = ""
    for d in deltas:
        shown += d
        assert text.startswith(shown)


def test_split_characters_are_held_back(tok):
    # a 4-byte character unseen in training spans several byte tokens: nothing shows until the last one
    ids = tok.encode("𝄞")
    assert len(ids) >= 3
    decoder = IncrementalDecoder(tok)
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["𝄞"]
    assert decoder.flush() == ""
    assert tok.decode(ids[:2]) == "\ufffd"  # what a naive prefix decode would show


def test_korean_streams_character_by_character(tok):
    ids = tok.encode("뷁똠")  # rare syllables: byte tokens
    deltas = stream(tok, ids)
    assert [d for d in deltas if d] == ["뷁", "똠"]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_random_token_sequences(tok, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 80))]
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(stream(tok, ids, skip_special_tokens)) == expected


def test_random_byte_soup(tok):
    # only single-byte tokens: mostly invalid UTF-8, the hard case for holding back
    byte_ids = sorted({i for ch in "𝄞🎉中뷁ñ" for i in tok.encode(ch)})
    rng = random.Random(7)
    for _ in range(400):
        ids = [rng.choice(byte_ids) for _ in range(rng.randint(1, 60))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_unfinished_character_at_end_is_flushed(tok):
    ids = tok.encode("ok 𝄞")[:-2]
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.push(i) for i in ids) == "ok "
    assert decoder.flush() == "\ufffd"


def test_matches_transformers_decode(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    train_tokenizer(CORPUS, 500, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(5)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 50))]
        assert "".join(stream(tok, ids)) == hf.decode(ids)


@pytest.mark.parametrize(
    "make_ids",
    [
        lambda tok: tok.encode(" ".join(TEXTS.values()) * 30),
        lambda tok: tok.encode("𝄞")[:1] * 1000,  # lead bytes that never complete
        lambda tok: tok.encode("𝄞")[:2] * 500,  # incomplete sequences, back to back
        lambda tok: tok.encode("𝄞")[1:2] * 1000,  # stray continuation bytes
    ],
)
def test_window_stays_short(tok, make_ids):
    ids = make_ids(tok)
    counting = CountingTokenizer(tok)
    assert "".join(stream(counting, ids)) == tok.decode(ids)
    assert counting.longest <= 40  # decodes a short window, never the whole sequence
    assert counting.calls <= 3 * len(ids) + 1
