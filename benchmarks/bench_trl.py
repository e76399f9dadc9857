"""Alignment speed: the built-in loop (`rwasym.train.align`) versus TRL's DPOTrainer (`align_trl`).

Both train the same native base (the quick default pair's pretrained base: the demo architecture,
d_model 128, 2 layers, vocab 512) on the same pairs with the same `AlignConfig` (batch, steps, lr,
seed, β), writing step 0 and final checkpoints. Each call's wall time includes loading the base
and scoring the reference; the per-step time is the difference between a long and a short run
divided by the extra steps, so that setup cancels. Usage:

    .venv/bin/python benchmarks/bench_trl.py [--steps 60] [--short 10] [--batch 64] [--threads 1]
"""

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import rwasym
from rwasym.studies.default_pair import default_pair, default_spec, load_default_pairs
from rwasym.train import align
from rwasym.train.trl_backend import align_trl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="long run")
    ap.add_argument("--short", type=int, default=10, help="short run (its time is subtracted)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="best of (runs interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="rwasym-bench-trl-"))
    _, _, info = default_pair(cache_dir=root / "cache", quick=True, progress=False)
    base = Path(info["base"])
    pairs = load_default_pairs(info)[0]
    cfg = replace(default_spec().align, batch_size=args.batch, checkpoint_every=0, log_every=10)

    def builtin(steps: int, out: Path):
        return align(rwasym.load(base), rwasym.load(base), pairs, replace(cfg, steps=steps), out=out, progress=False)

    def trl(steps: int, out: Path):
        return align_trl(base, pairs, replace(cfg, steps=steps), out, progress=False)

    trl(2, root / "warmup")  # first import of trl / transformers / datasets is not timed
    backends = {"built-in align": builtin, "TRL DPOTrainer": trl}
    best = {(name, steps): float("inf") for name in backends for steps in (args.short, args.steps)}
    losses = {}
    for r in range(args.repeats):  # interleaved, so load from other jobs hits both backends alike
        for name, run in backends.items():
            for steps in (args.short, args.steps):
                t0 = time.perf_counter()
                result = run(steps, root / f"{name[:3]}-{steps}-{r}")
                best[name, steps] = min(best[name, steps], time.perf_counter() - t0)
                losses[name] = result.final_loss
    extra = args.steps - args.short
    rows = {
        name: (best[name, args.steps], (best[name, args.steps] - best[name, args.short]) / extra) for name in backends
    }
    print(
        f"base {base} ({info['spec']['model']}), {len(pairs)} train pairs, batch {args.batch}, "
        f"{args.threads} thread(s), {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"| backend | wall, {args.steps} steps (s) | s / step | steps / s | final loss |")
    print("|---|---|---|---|---|")
    for name, (wall, per_step) in rows.items():
        print(f"| {name} | {wall:.2f} | {per_step:.4f} | {1 / per_step:.1f} | {losses[name]:.4f} |")
    ratio = rows["TRL DPOTrainer"][1] / rows["built-in align"][1]
    print(f"built-in / TRL steps per second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
