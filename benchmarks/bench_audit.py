"""What the checkpoint audit costs on the real model (issue #32), against reading the same checkpoint.

On SmolLM2-135M-Instruct de-quantized to float32 (the real fixture, 513 MiB of safetensors) and a perturbed copy
of it (every matrix changed, as a fine-tune changes them; written once under /tmp):

- full audit: `rwasym.models.audit.fingerprint` (SHA-256 of every tensor's bytes), MiB/s;
- the probe's automatic check on a changed pair: `unchanged_matrices` over every studied matrix of two
  `CheckpointWeights` (byte comparison that stops at the first differing 64 KiB);
- the same check on an identical pair, a byte copy in another folder (every matrix read whole: the worst case);
- baseline, measured in the same run: reading every studied matrix's ΔW once (`WeightDeltas` over the two
  folders, what the probe itself does).

Each figure is the best of ``--repeats`` runs (the page cache warm after the first). Usage:
    .venv/bin/python benchmarks/bench_audit.py [--repeats 3]
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import torch


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from safetensors.torch import load_file, save_file

    from rwasym.models.audit import fingerprint, unchanged_matrices
    from rwasym.models.checkpoint import CheckpointWeights
    from rwasym.models.deltas import WeightDeltas
    from rwasym.testing import real_model_folder

    base = real_model_folder(cache_dir=os.path.expanduser("~/.cache/rwasym"))
    tuned = Path("/tmp/rwasym-bench-audit/tuned")
    if not (tuned / "model.safetensors").exists():
        shutil.copytree(base, tuned, dirs_exist_ok=True)
        state = load_file(str(base / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        for key, value in state.items():
            if value.dim() == 2:
                state[key] = value + 1e-3 * torch.randn(value.shape, generator=g, dtype=value.dtype)
        save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    copy = Path("/tmp/rwasym-bench-audit/same")
    if not (copy / "model.safetensors").exists():
        shutil.copytree(base, copy, dirs_exist_ok=True)
    mib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    b, t = CheckpointWeights(base), CheckpointWeights(tuned)
    names = list(b)
    full = _best(lambda: fingerprint(base, progress=False), args.repeats)
    changed = _best(lambda: unchanged_matrices(b, t, names), args.repeats)
    c = CheckpointWeights(copy)
    same = _best(lambda: unchanged_matrices(b, c, names), args.repeats)
    deltas = WeightDeltas(b, t, names)
    read = _best(lambda: [deltas[n] for n in names], args.repeats)
    print(f"checkpoint {mib:.0f} MiB, {len(names)} studied matrices, torch threads {torch.get_num_threads()}")
    print(f"fingerprint (SHA-256 of every tensor)   {full:7.2f} s  {mib / full:6.0f} MiB/s")
    print(f"pre-check, changed pair                 {changed:7.3f} s")
    print(f"pre-check, identical pair (worst case)  {same:7.2f} s")
    print(f"baseline: every studied ΔW read once    {read:7.2f} s")
    print(
        f"ratios to the baseline: fingerprint {full / read:.2f}, changed {changed / read:.4f}, "
        f"identical {same / read:.2f}"
    )


if __name__ == "__main__":
    main()
