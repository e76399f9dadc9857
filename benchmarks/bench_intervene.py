"""Fast batched evaluation of rank-1 edits versus the naive loop (same run, same model, same data).

naive: for each edit, deep-copy the host model, write W + u vᵀ into the copy, and measure it with
full forward passes (`Evaluator.measure`: chosen, rejected and text sequences in full).
fast: `Evaluator.measure_edits` — the clean prefix up to the edited block cached once, k edits per
forward (edit e on batch slice e), pair sequences cut after their last scored position and scored
in one pass when chosen and rejected share it, responses-only unembedding.
plain: one forward of the evaluation sequences (chosen, rejected, text) with no edit and no metric.

Prints the speedup (naive / fast), the fast path's time per edit relative to a plain forward of the
same tokens, and the largest metric difference; record them in benchmarks/RESULTS.md. Usage:
    .venv/bin/python benchmarks/bench_intervene.py [--directions 64] [--matrix blocks.1.attn.W_Q]
"""

import argparse
import copy
import time

import torch

import rwasym
from rwasym.analyses.behaviour import Evaluator
from rwasym.math.rank1 import directions
from rwasym.studies.language import PairConfig, corpus, make_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--matrix", action="append", help="matrix to edit (repeatable); default W_Q of layers 0 and 1")
    ap.add_argument("--edits-per-pass", type=int, default=4, help="the sweep's CPU default")
    ap.add_argument("--pairs", type=int, default=32, help="pairs per rule (2 rules)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--cont-len", type=int, default=1)
    ap.add_argument(
        "--text",
        type=int,
        default=0,
        help="separate held-out text sequences of 64 tokens (default 0: the sweep default, "
        "text = prompt + chosen of the pairs)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-layers", type=int, default=2, help="2 = the demo architecture")
    ap.add_argument("--naive-edits", type=int, default=16, help="naive loop timed on this many edits, scaled")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = rwasym.load(rwasym.native_config(n_layers=args.n_layers))  # demo: d_model 128, 2 layers, vocab 512
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for spec in tuned.matrices():
        w = tuned.weight(spec.name)
        tuned.set_weight(spec.name, w + 0.02 * w.std() * torch.randn(spec.shape, generator=g, dtype=torch.float64))
    pairs = make_pairs(PairConfig(n_per_rule=args.pairs, prompt_len=args.prompt_len, cont_len=args.cont_len))
    text = corpus(args.text, 64, seed=123) if args.text else None
    ev = Evaluator(base, tuned, pairs, text=text)
    n_tok = sum(t.numel() for t in (ev.data.chosen, ev.data.rejected, ev.data.text))
    print(
        f"data: {len(pairs)} pairs (prompt {args.prompt_len}, response {args.cont_len}), "
        f"text {tuple(ev.data.text.shape)}; "
        f"{n_tok} tokens per full evaluation; {args.directions} directions; {args.edits_per_pass} edits per pass; "
        f"{torch.get_num_threads()} thread(s)"
    )

    def plain():
        with torch.no_grad():
            for t in (ev.data.chosen, ev.data.rejected, ev.data.text):
                base.bridge(t)

    plain()
    t_plain = min(_timed(plain) for _ in range(3))
    last = args.n_layers - 1
    for name in args.matrix or ["blocks.0.attn.W_Q", f"blocks.{last}.attn.W_Q", f"blocks.{last}.mlp.W_out"]:
        delta = tuned.weight(name) - base.weight(name)
        dirs = directions("random", delta, args.directions, side="input", generator=torch.Generator().manual_seed(1))
        U = torch.stack([d.u for d in dirs]) * 50.0  # a visible effect
        V = torch.stack([d.v for d in dirs])

        def naive(n):
            out = []
            for e in range(n):
                m = copy.deepcopy(base)
                m.set_weight(name, m.weight(name) + torch.outer(U[e], V[e]))
                out.append(ev.measure(m))
            return out

        def fast():
            ev._runners.clear()  # include the prefix recording and self-check in the timing
            out = []
            for s in range(0, len(dirs), args.edits_per_pass):
                out += ev.measure_edits(base, name, U[s : s + args.edits_per_pass], V[s : s + args.edits_per_pass])
            return out

        n_naive = min(args.naive_edits, len(dirs))
        t0 = time.perf_counter()
        slow_rows = naive(n_naive)
        t_naive = (time.perf_counter() - t0) / n_naive * len(dirs)
        t0 = time.perf_counter()
        fast_rows = fast()
        t_fast = time.perf_counter() - t0
        keys = [k for k in slow_rows[0] if "accuracy" not in k]
        diff = max(abs(a[k] - b[k]) for a, b in zip(slow_rows, fast_rows) for k in keys)
        flips = [k for a, b in zip(slow_rows, fast_rows) for k in slow_rows[0] if "accuracy" in k and a[k] != b[k]]
        runner = next(iter(ev._runners.values()))
        print(
            f"{name}: naive {t_naive:.2f} s, fast {t_fast:.2f} s for {len(dirs)} edits -> speedup "
            f"{t_naive / t_fast:.1f}x; fast per edit = {t_fast / len(dirs) / t_plain:.2f}x a plain forward of "
            f"the same tokens ({t_plain * 1e3:.0f} ms); naive per edit = {t_naive / len(dirs) / t_plain:.2f}x; "
            f"max |metric diff| {diff:.1e} (accuracy values differing at a float tie: {flips or 'none'}); "
            f"prefix reuse {runner.reuse}"
        )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
