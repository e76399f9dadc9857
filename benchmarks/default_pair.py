"""Build the default model pair from scratch and record its numbers.

    python benchmarks/default_pair.py [--cache DIR] [--out benchmarks/results/default_pair.json]

Records: generator entropy per token vs unigram entropy vs the base's pretraining / held-out loss;
base vs aligned held-out preference accuracy per rule; KL(aligned ‖ base); wall times; and the
top-1 eigenvalue share of the attention-input covariance (``blocks.{L}.attn.q.hook_in``, covariance
over tokens of a held-out corpus) per layer for the trained base, the aligned model and a
random-init model of the same architecture.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import rwasym
from rwasym.math.covariance import RunningCovariance
from rwasym.math.spectra import spikiness
from rwasym.studies.default_pair import default_pair, default_spec
from rwasym.studies.language import corpus


@torch.no_grad()
def attention_input_spikiness(model: rwasym.Model, tokens: torch.Tensor) -> list[dict]:
    """Per layer: spikiness of the covariance over tokens of the input of W_Q (after ln1)."""
    accs, handles = [], []
    for layer in range(model.n_layers):
        acc = RunningCovariance(model.d_model, name=f"blocks.{layer}.attn.q.hook_in")
        hook = model.bridge.get_submodule(acc.name)
        handles.append(
            hook.register_forward_hook(lambda mod, inp, out, acc=acc: acc.add(out.reshape(-1, out.shape[-1])))
        )
        accs.append(acc)
    try:
        for i in range(0, len(tokens), 64):
            model.bridge(tokens[i : i + 64])
    finally:
        for h in handles:
            h.remove()
    return [{"layer": i, **spikiness(acc.covariance()).to_dict(), "n_tokens": acc.count} for i, acc in enumerate(accs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache root (default: a fresh temporary folder)")
    parser.add_argument("--out", default="benchmarks/results/default_pair.json")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="rwasym-default-")
    t0 = time.perf_counter()
    base, tuned, info = default_pair(cache_dir=cache, progress=False)
    wall = time.perf_counter() - t0
    spec = default_spec()
    tokens = corpus(256, spec.seq_len, seed=424242, config=spec.language)
    random_init = rwasym.load(rwasym.native_config(**spec.model, d_vocab=spec.language.d_vocab))
    record = {
        "wall_seconds_default_pair": wall,
        "cached": info["cached"],
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "entropy": info["entropy"],
        "pretrain": info["pretrain"],
        "align": info["align"],
        "preference_accuracy": info["preference_accuracy"],
        "seconds": info["seconds"],
        "attention_input_top1_share": {
            "isotropic": 1 / base.d_model,
            "base": attention_input_spikiness(base, tokens),
            "aligned": attention_input_spikiness(tuned, tokens),
            "random_init": attention_input_spikiness(random_init, tokens),
        },
        "hash": info["hash"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
