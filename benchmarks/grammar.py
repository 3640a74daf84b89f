"""Grammar engines for constrained decoding, measured on this CPU: llguidance vs xgrammar.

    python benchmarks/grammar.py [--vocab 102400] [--tokens 400] [--engines llguidance,xgrammar] [--json]

What it measures, per engine, on a byte-level BPE of EXAONE 4.0's vocabulary size (102,400 tokens, trained here by
``exaone_deploy.tiny.tokenizer.train_tokenizer`` on Tiny Shakespeare plus synthetic JSON and Korean/Latin
pseudo-words so the vocabulary fills up with multi-byte and JSON-ish tokens the way the real one does; cached under
``--cache``):

- tokenizer-info time: building the engine's per-tokenizer index once (a server does this once at start-up);
- compile time: a nested JSON schema (objects, arrays, enums, required fields) compiled to a grammar (per request,
  unless cached);
- mask ms/step p50/p99 at batch 1 (one matcher) and batch 8 (eight matchers, one bitmask each, by the engine's
  own batch call: llguidance's ``LLExecutor``, xgrammar's ``BatchGrammarMatcher``; ``llguidance-seq``: one
  matcher after another, what ``runtime.grammar.apply_batch`` does): the time to compute the next-token
  bitmask(s) for one decode step, with two drivers: "ran", tokens sampled at temperature 1 from random logits
  restricted to the mask (mostly long strings: the model that knows no JSON), and "doc", the tokens of valid
  documents of the schema (keys, numbers, enums, Korean and accented strings: a model that writes JSON); a
  matcher restarts when its JSON is complete or after 256 tokens;
- apply ms: ``runtime.grammar.apply_bitmask`` on the step's real masks and (batch, V) float32 logits (unpack
  the bits, set the disallowed logits to -inf), the numpy half of a constrained step.

The per-step mask time is what a constrained decode step adds unless it is overlapped with the model's forward.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, print_table

from exaone_deploy.runtime.grammar import apply_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                },
            },
            "required": ["city", "geo"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "role", "address", "tags"],
    "additionalProperties": False,
}

MAX_TOKENS = 256  # a matcher restarts after this many tokens (random logits can write long strings)


def _synthetic_texts(seed: int = 0):
    """Pseudo-words (Latin and Hangul syllables) and JSON documents: enough distinct pairs for a 100k BPE."""
    rng = random.Random(seed)
    latin = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    hangul = [chr(0xAC00 + i) for i in range(0, 11172, 7)]
    keys = ["name", "id", "value", "items", "type", "city", "tags", "score", "user", "data", "text", "date"]
    for _ in range(20000):
        words = []
        for _ in range(40):
            syll = hangul if rng.random() < 0.35 else latin
            words.append("".join(rng.choice(syll) for _ in range(rng.randint(2, 5))))
        yield " ".join(words)
        doc = {
            rng.choice(keys): rng.choice([rng.randint(0, 10**6), " ".join(words[:3]), [1.5, words[3]], None])
            for _ in range(4)
        }
        yield json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))


def build_tokenizer(vocab: int, cache: Path) -> Path:
    """A byte-level BPE of ``vocab`` tokens laid out like EXAONE 4.0's (cached: training takes a minute)."""
    from exaone_deploy.tiny.tokenizer import train_tokenizer

    out = cache / f"bpe-{vocab}"
    if not (out / "tokenizer.json").is_file():
        shakespeare = Path(__file__).resolve().parent.parent / "exaone_deploy" / "assets" / "tinyshakespeare.txt"
        lines = shakespeare.read_text(encoding="utf-8").splitlines()
        train_tokenizer(iter(lines + list(_synthetic_texts())), vocab, out)
    return out


# ---- engines: each returns (info_s, compile_s, make_matchers(n), fill(matchers, bitmask), accept, done) ------------


def _llguidance(tok_dir: Path, vocab: int, eos: int, parallel: bool = True):
    import llguidance
    import llguidance.numpy as llnp

    t0 = time.perf_counter()
    info = llguidance.LLTokenizer((tok_dir / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    first = llguidance.LLMatcher(info, grammar, log_level=0)
    t2 = time.perf_counter()
    if first.is_error():
        raise RuntimeError(first.get_error())
    executor = llguidance.LLExecutor()

    def make(n):
        return [first.deep_copy() for _ in range(n)]

    def fill(matchers, bitmask):
        if len(matchers) == 1 or not parallel:
            for i, m in enumerate(matchers):
                llnp.fill_next_token_bitmask(m, bitmask, i)
        else:
            llnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(m, token):
        assert m.consume_token(token), m.get_error()

    return t1 - t0, t2 - t1, make, fill, accept, lambda m: m.is_stopped() or m.is_accepting()


def _xgrammar(tok_dir: Path, vocab: int, eos: int):
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    t2 = time.perf_counter()
    batch = xgrammar.BatchGrammarMatcher()

    def make(n):
        return [xgrammar.GrammarMatcher(compiled) for _ in range(n)]

    def fill(matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(m, token):
        assert m.accept_token(token)

    return t1 - t0, t2 - t1, make, fill, accept, lambda m: m.is_terminated() or m.is_completed()


ENGINES = {
    "llguidance": _llguidance,  # batch 8: LLExecutor (native threads)
    "llguidance-seq": lambda *a: _llguidance(*a, parallel=False),  # batch 8: one matcher after another
    "xgrammar": _xgrammar,
}


def instance(rng: random.Random) -> dict:
    """A random document valid under SCHEMA, as a model would write it (the "document" driver's path)."""
    words = ["Seoul", "서울특별시", "Busan", "King Lear", "quarterly report", "naïve café", "data", "x"]
    doc = {
        "name": rng.choice(words),
        "age": rng.randint(0, 99),
        "role": rng.choice(["admin", "user", "guest"]),
        "address": {
            "city": rng.choice(words),
            "zip": f"{rng.randint(0, 99999):05d}",
            "geo": {"lat": round(rng.uniform(-90, 90), 4), "lon": round(rng.uniform(-180, 180), 4)},
        },
        "tags": rng.sample(words, rng.randint(0, 4)),
        "scores": [round(rng.uniform(0, 100), 2) for _ in range(rng.randint(0, 5))],
        "active": rng.random() < 0.5,
    }
    return doc


def drive(
    make, fill, accept, done, batch: int, steps: int, vocab: int, eos: int, seed: int, documents=None
) -> tuple[list[float], list[float]]:
    """Per-step times (s) of computing the masks of ``batch`` matchers and of applying them to (batch, V) logits.

    With ``documents`` (a list of token-id lists), each matcher is fed whole documents in turn; else its tokens
    are sampled at temperature 1 from random logits restricted to the mask.
    """
    rng = np.random.default_rng(seed)
    doc_of: list[list[int]] = [[] for _ in range(batch)]
    matchers = make(batch)
    counts = [0] * batch
    bitmask = np.full((batch, (vocab + 31) // 32), -1, dtype=np.int32)
    times, apply_times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        fill(matchers, bitmask)
        times.append(time.perf_counter() - t)
        logits = rng.standard_normal((batch, vocab)).astype(np.float32)
        t = time.perf_counter()
        apply_bitmask(logits, bitmask)
        apply_times.append(time.perf_counter() - t)
        for i, m in enumerate(matchers):
            if documents is not None:
                doc = documents[(i * 7919 + len(times)) % len(documents)] if counts[i] == 0 else doc_of[i]
                token = doc[counts[i]] if counts[i] < len(doc) else eos
                doc_of[i] = doc
                assert logits[i, token] > -np.inf, "a valid document's token is masked out"
            else:
                p = np.exp(logits[i] - logits[i].max())
                token = int(rng.choice(vocab, p=p / p.sum()))
            if token == eos or counts[i] >= MAX_TOKENS or done(m):
                matchers[i] = make(1)[0]
                counts[i] = 0
                continue
            accept(m, token)
            counts[i] += 1
    return times, apply_times


def _ms(times, q):
    return 1e3 * float(np.percentile(times, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=102400)
    parser.add_argument("--tokens", type=int, default=400, help="decode steps measured per engine and batch")
    parser.add_argument("--engines", default="llguidance,llguidance-seq,xgrammar")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "exaone-deploy-bench-grammar")
    add_json_flag(parser)
    args = parser.parse_args()

    tok_dir = build_tokenizer(args.vocab, args.cache)
    from exaone_deploy.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tok_dir)
    eos = tokenizer.token_to_id("[|endofturn|]")
    doc_rng = random.Random(0)
    documents = [tokenizer.encode(json.dumps(instance(doc_rng), ensure_ascii=False)) for _ in range(50)]
    rows = []
    for name in args.engines.split(","):
        try:
            info_s, compile_s, make, fill, accept, done = ENGINES[name](tok_dir, args.vocab, eos)
        except ImportError as e:
            print(f"{name}: skipped ({e}; pip install 'exaone-deploy[bench,grammar]')", file=sys.stderr)
            continue
        row = {
            "engine": name,
            "vocab": args.vocab,
            "tokenizer_info_s": round(info_s, 3),
            "compile_ms": round(1e3 * compile_s, 1),
        }
        for mode, docs in (("random", None), ("document", documents)):
            for batch in (1, 8):
                drive(make, fill, accept, done, batch, 20, args.vocab, eos, 1, docs)  # warm-up
                times, apply_times = drive(make, fill, accept, done, batch, args.tokens, args.vocab, eos, 0, docs)
                row[f"{mode}_b{batch}_p50_ms"] = round(_ms(times, 50), 3)
                row[f"{mode}_b{batch}_p99_ms"] = round(_ms(times, 99), 3)
                row[f"{mode}_b{batch}_apply_p50_ms"] = round(_ms(apply_times, 50), 3)
        rows.append(row)

    result = {"rows": rows}
    cells = [(m, b, q) for m in ("random", "document") for b in (1, 8) for q in ("p50", "p99", "apply_p50")]
    cols = ["engine", "vocab", ("tokenizer_info_s", "info s"), ("compile_ms", "compile ms")]
    cols += [(f"{m}_b{b}_{q}_ms", f"{m[:3]} b{b} {q.replace('_', ' ')}") for m, b, q in cells]

    def table():
        print_table(
            rows,
            cols,
            title="ms per decode step: compute the masks (b8: 8 at once), apply them to logits "
            "(runtime.grammar.apply_bitmask); ran: random logits, doc: valid documents",
        )

    emit(result, args.json, table)


if __name__ == "__main__":
    main()
