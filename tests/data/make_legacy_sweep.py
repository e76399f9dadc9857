"""Writes tests/data/legacy_sweep.jsonl with the pre-SweepConfig code (rwasym 0.1.0, commit 835168d):
the same native pair and pairs as tests/test_sweep.py's `files` fixture, first 5 rows only."""

import copy
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import rwasym
from rwasym.pairs import PreferencePairs
from rwasym.sweep import sweep

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
cfg = rwasym.native_config(
    d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=64, n_key_value_heads=2, d_mlp=48, seed=1
)
torch.manual_seed(0)
base = rwasym.load(cfg)
tuned = copy.deepcopy(base)
g = torch.Generator().manual_seed(0)
for spec in tuned.matrices():
    tuned.set_weight(
        spec.name, tuned.weight(spec.name) + 0.05 * torch.randn(spec.shape, generator=g, dtype=torch.float64)
    )
rwasym.save_model(base, root / "base")
rwasym.save_model(tuned, root / "tuned")
PreferencePairs(
    prompt=torch.randint(3, 64, (6, 8), generator=g),
    chosen=torch.randint(3, 64, (6, 2), generator=g),
    rejected=torch.randint(3, 64, (6, 2), generator=g),
).save(root / "pairs.safetensors")


def slow(logits, batch):
    return float(logits.double().mean())


out = root / "full.jsonl"
for match in ("norm", "output"):
    o = root / f"full_{match}.jsonl"
    rows = sweep(
        str(root / "base"),
        str(root / "tuned"),
        str(root / "pairs.safetensors"),
        out=o,
        metrics={"slow": slow},
        matrices=["blocks.1.attn.W_Q"],
        directions="pca:2,random:3,orthogonal:3",
        alphas=(1.0, 2.0),
        edits_per_pass=3,
        progress=False,
        match=match,
    )
    lines = o.read_text().splitlines(True)
    Path(sys.argv[2] + f"_{match}.jsonl").write_text("".join(lines[: 1 + 6]))
    print(match, len(rows))
