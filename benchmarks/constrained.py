"""Per-token cost of grammar-constrained decoding, end to end, on a bundle: constrained vs free decode tok/s.

    exaone-deploy make-tiny /tmp/ckpt-1.2b --preset 1.2b-full
    exaone-deploy export /tmp/ckpt-1.2b /tmp/bundle-1.2b --max-seq-len 1024
    python benchmarks/constrained.py /tmp/bundle-1.2b [--batch 1,8] [--tokens 64] [--rounds 3] [--json]
                                     [--tokenizer DIR]

A random-weight bundle's own tokenizer is small (make-tiny trains it on a little text), and the grammar's mask
cost grows with the number of real tokens: ``--tokenizer DIR`` decodes with another tokenizer of at most the
model's vocabulary instead, e.g. the 102,400-token byte-level BPE that ``benchmarks/grammar.py`` builds (cached in
``$TMPDIR/exaone-deploy-bench-grammar/bpe-102400``), so the masks cost what they would with EXAONE's vocabulary.

Each round runs, for each batch size, a free and a constrained generation of the same prompts, one right after the
other (interleaved, so a loaded machine slows both alike), with ``generate.Generator`` (the path the scheduler's
sampling step shares: ``sample_batch``: grammar masks by ``apply_batch``, then the sampler, then ``accept``).
Free rows ignore EOS; constrained rows follow a JSON schema whose one unbounded string keeps them going (the
case of a model that knows no JSON: mostly string states), so both decode ``--tokens`` tokens. Reported: decode
tokens/s per row (median over rounds) and the constrained overhead, ``free_tok_s / constrained_tok_s - 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import add_json_flag, emit, print_table

from exaone_deploy.runtime.generate import Generator
from exaone_deploy.runtime.grammar import GrammarConstraint
from exaone_deploy.runtime.sampling import SamplingParams
from exaone_deploy.text.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {"role": {"enum": ["king", "queen", "fool"]}, "speech": {"type": "string"}},
    "required": ["role", "speech"],
}


def measure(gen: Generator, batch: int, params: SamplingParams) -> float:
    """Decode tokens/s of one row (decode steps over decode seconds) for ``batch`` rows."""
    results = gen.generate(["ROMEO:\n"] * batch, [dataclasses.replace(params, seed=i) for i in range(batch)])
    t = results[0].timings
    return t["decode_steps"] / t["decode_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=None, help="decode with this tokenizer directory")
    add_json_flag(parser)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    gen = Generator.from_bundle(args.bundle, max_batch=max(batches), verify=False)
    if args.tokenizer is not None:
        gen = Generator(gen.backend, Tokenizer.from_dir(args.tokenizer))
    grammar = GrammarConstraint.json_schema(gen.tokenizer, SCHEMA, gen.backend.spec.vocab_size).grammar
    free = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    constrained = dataclasses.replace(free, ignore_eos=False, grammar=grammar)
    measure(gen, 1, constrained)  # warm-up: the token index, the sessions
    runs: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for b in batches:
            for name, params in (("free", free), ("constrained", constrained)):
                runs.setdefault((b, name), []).append(measure(gen, b, params))
    rows = []
    for b in batches:
        f, c = (statistics.median(runs[(b, n)]) for n in ("free", "constrained"))
        rows.append(
            {
                "batch": b,
                "free_tok_s": round(f, 2),
                "constrained_tok_s": round(c, 2),
                "overhead_pct": round(100 * (f / c - 1), 2),
                "rounds": args.rounds,
                "tokens": args.tokens,
            }
        )
    result = {
        "bundle": str(args.bundle),
        "vocab": gen.backend.spec.vocab_size,
        "tokenizer_tokens": gen.tokenizer.vocab_size,
        "results": rows,
    }
    emit(result, args.json, lambda: print_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
