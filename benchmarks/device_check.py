"""The accelerator check of issue #31: the same probe on the CPU and on a device, every row compared, both timed.

Builds a random-init Llama pair wide enough that the 8B-width paths run (hidden 1024: each ΔW's Gram, the rows
on every thread; MLP 4096 > 2048: the top-k solver), with a word-level tokenizer, under ``--work`` (seeded:
the same pair on every machine); tuned = base + 0.05·N(0, 1) on every parameter (`save_perturbed_copy`). Then,
each in this process:
- ``probe``: `probe(load(base, device=D), tuned)` for D = cpu and ``--device`` (heads, curves, nulls: the
  defaults), on ``--rows`` × ``--length`` random tokens;
- ``capture``: the resident capture of the probe's sites on each device (the forward and the covariance
  updates alone).
Prints one JSON object: wall times per device, row counts, and for every float field of the rows the largest
relative difference between the devices (``max_rel``), with the worst row named. A device run that fails is
recorded with its error (the check's purpose is to find such failures), not hidden.

No accelerator was lent to the sessions that wrote this (see benchmarks/RESULTS.md); ``--device cpu`` runs the
same script end to end as a dry run (it must report max_rel = 0). On a GPU machine: ``bash
benchmarks/device_check.sh`` (it installs what the machine's image lacks from ``.whl/`` first).

Usage: python benchmarks/device_check.py [--device cuda] [--work DIR] [--rows 16] [--length 128]
"""

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def build_pair(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """base/ and tuned/ under ``root`` (written once; reused when present)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rwasym.testing import perturb_and_save, save_perturbed_copy

    base, tuned = root / "base", root / "tuned"
    if not (tuned / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 256,
            num_hidden_layers=layers,
            vocab_size=vocab,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            attn_implementation="eager",
        )
        hf = perturb_and_save(LlamaForCausalLM(config), base, vocab)
        save_perturbed_copy(hf, tuned, 1, tokenizer_from=base)
    return base, tuned


def compare(cpu_rows: list[dict], dev_rows: list[dict]) -> dict:
    """Largest relative difference of every float field over matched rows (same order), and where it is."""
    if len(cpu_rows) != len(dev_rows):
        return {"error": f"row counts differ: cpu {len(cpu_rows)}, device {len(dev_rows)}"}
    worst: dict = {}
    for a, b in zip(cpu_rows, dev_rows):
        for key, x in a.items():
            y = b.get(key)
            if isinstance(x, float) and isinstance(y, float) and math.isfinite(x):
                rel = abs(x - y) / max(abs(x), 1e-12)
                if rel > worst.get(key, (-1.0, None))[0]:
                    worst[key] = (rel, f"{a['matrix']} {a['side']} {a['subspace']} head={a['head']}")
            elif x != y and not (isinstance(x, float) and isinstance(y, float)):
                worst.setdefault("mismatch", (1.0, f"{a['matrix']} {key}: {x!r} vs {y!r}"))
    return {key: {"max_rel": rel, "where": where} for key, (rel, where) in sorted(worst.items())}


def timed(what: str, fn, results: dict) -> object:
    t0 = time.perf_counter()
    try:
        out = fn()
        results[what] = {"wall_s": time.perf_counter() - t0}
        return out
    except Exception as error:  # the check records a device failure instead of stopping at it
        results[what] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-2000:]}
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", help="folder for the pair (default: a temporary one)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    a = ap.parse_args()
    import rwasym
    from rwasym.analyses.probe import probe, probe_sites
    from rwasym.hooks.activations import capture

    root = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="rwasym-device-"))
    base, tuned = build_pair(root, a.hidden, a.layers, a.vocab)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, a.vocab, (a.rows, a.length), generator=g)
    report: dict = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name()
        if a.device.startswith("cuda") and torch.cuda.is_available()
        else "cpu",
        "torch": torch.__version__,
        "shape": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "tokens": a.rows * a.length},
    }
    rows: dict = {}
    for label, device in (("cpu", "cpu"), ("device", a.device)):  # --device cpu: the dry run compares two CPU runs
        timings: dict = {}
        model = timed("load", lambda: rwasym.load(base, device=device), timings)
        if model is not None:
            sites = probe_sites(model, model.matrices())
            timed("capture", lambda: capture(model, tokens, sites=sites, progress=False), timings)
            result = timed("probe", lambda: probe(model, tuned, tokens, progress=False), timings)
            rows[label] = None if result is None else result.rows
        report[f"{label}_runs"] = timings
    if rows.get("cpu") is not None and rows.get("device") is not None:
        report["rows"] = len(rows["cpu"])
        report["max_rel"] = compare(rows["cpu"], rows["device"])
    print(json.dumps(report, indent=1))
    failed = any("error" in run for key in report if key.endswith("_runs") for run in report[key].values())
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
