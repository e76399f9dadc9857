"""What readouts add to a probe (issue #32): the same probe of the real pair with and without ``readouts=2``.

SmolLM2-135M-Instruct (30 layers) against its seed-0 DPO fine-tune (the cached real pair,
`rwasym.studies.real_pair.real_pair`), every W_O and W_out (60 matrices), k = 8, no heads, no curves, no null
draws, on 64 rows × 64 tokens of generic text (`rwasym.studies.collateral.generic_text`). Baseline, in the same
run: the probe without readouts. Reported: wall time of each (best of ``--repeats``), the ratio, and the two
parts readouts add: the SVDs of every ΔW before the capture and the top-context scoring inside it.

Usage:
    .venv/bin/python benchmarks/bench_readouts.py [--repeats 2]
"""

import argparse
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    import rwasym
    from rwasym.studies.collateral import generic_text
    from rwasym.studies.real_pair import real_pair

    base, tuned, _ = real_pair(seed=0, progress=False)
    data, _ = generic_text(base.tokenizer, n_rows=64, seq_len=64)
    kw = dict(k=8, null_samples=0, heads=False, curves=False, matrices=["blocks.*.attn.W_O", "blocks.*.mlp.W_out"])
    times: dict = {0: [], 2: []}
    for _ in range(args.repeats):
        for n in (0, 2):
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rwasym.probe(base, tuned, data, readouts=n, progress=False, **kw)
            times[n].append(time.perf_counter() - t)
    plain, read = min(times[0]), min(times[2])
    print(f"torch threads {torch.get_num_threads()}, tokens {data.numel()}, 60 matrices")
    print(f"probe without readouts  {plain:7.1f} s")
    print(f"probe with readouts=2   {read:7.1f} s")
    print(f"ratio {read / plain:.3f} (readouts add {read - plain:+.1f} s)")


if __name__ == "__main__":
    main()
