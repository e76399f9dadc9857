"""The block-streamed probe of a Llama-3.1-8B-shaped pair on this machine (issue #31).

Writes a random-init pair with Llama-3.1-8B's shapes (hidden 4096, MLP 14,336, 32 / 8 heads, vocab 128,256,
untied) as bf16 sharded safetensors under /tmp with `bench_shards.write_pair` (tensor by tensor, never a model
in memory; tuned = base + 0.01·N(0, 1) on every tensor), then in fresh interpreters:
- ``capture``: `capture_blocks` of the probe's default sites on the tokens (the limit the probe is compared with);
- ``probe``: the CLI, ``rwasym probe --stream --base B --tuned T --data tokens.safetensors`` with its defaults.
Each reports wall time and peak RSS (``ru_maxrss``); the probe also its phases (cProfile's cumulative time of
capture_blocks' forwards, the eigendecompositions, ΔW reads and the row arithmetic). Tokens: ``--rows`` ×
``--length`` uniform random ids (seed 0). ``--layers`` below 32 measures that many blocks of the same width
(the per-block figures extrapolate linearly in the number of blocks). The pair is deleted at the end unless
``--keep``.

``--shape 70b`` takes Llama-3.1-70B's widths instead (hidden 8192, MLP 28,672, 64 / 8 heads, same vocab).

Usage: .venv/bin/python benchmarks/bench_stream_8b.py [--shape 70b] [--layers 32] [--rows 16] [--length 128]
       [--pair DIR]
(``--pair DIR``: write the pair there once and reuse it in later runs of the same shape.)
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import cProfile, io, json, pstats, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[4]))
what, base, tuned, tokens_file, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5], sys.argv[6]
t0 = time.perf_counter()
profile = cProfile.Profile()
if what == "capture":
    from safetensors.torch import load_file
    from rwasym.analyses.probe import probe_sites
    from rwasym.hooks.activations import capture_blocks
    from rwasym.models.streaming import BlockStream
    stream = BlockStream(base)
    sites = probe_sites(stream.model, stream.model.matrices())
    profile.enable()
    for layer, acts in capture_blocks(stream, load_file(tokens_file)["input_ids"], sites=sites, progress=False):
        del acts  # as the probe does: one block's statistics at a time
    profile.disable()
else:
    from rwasym.app.cli import main
    profile.enable()
    code = main(["probe", "--stream", "--base", base, "--tuned", tuned, "--data", tokens_file, "--quiet", "--out", out])
    profile.disable()
    assert code == 0
wall = time.perf_counter() - t0
stats = pstats.Stats(profile, stream=io.StringIO())
phases = {}
for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
    key = {"run": "block forwards", "_materialise": "block reads", "_basis_of": "eigendecompositions",
           "__getitem__": "delta reads", "_spectrum": "delta spectra", "column_energies": "projections",
           "random_null": "null draws", "add": "covariance updates"}.get(name)
    if key and ("rwasym" in file):
        phases[key] = phases.get(key, 0.0) + ct
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"what": what, "wall_s": wall, "peak_rss_mib": peak, "phases_s": phases}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", choices=("capture", "probe"), help="measure one of the two runs")
    ap.add_argument("--shape", choices=("8b", "70b"), default="8b", help="Llama-3.1-8B's widths or Llama-3.1-70B's")
    ap.add_argument("--pair", help="a folder to write the pair into once and reuse (kept); default: a fresh one")
    a = ap.parse_args()
    widths = {"8b": (4096, 14336, 32, 8), "70b": (8192, 28672, 64, 8)}[a.shape]
    shape = argparse.Namespace(
        hidden=widths[0],
        intermediate=widths[1],
        heads=widths[2],
        kv_heads=widths[3],
        layers=a.layers,
        vocab=128256,
        dtype="bfloat16",
        shard_gb=2.0,
    )
    root = Path(a.pair) if a.pair else Path(tempfile.mkdtemp(prefix=f"rwasym-{a.shape}-", dir="/tmp"))
    a.keep = a.keep or bool(a.pair)
    try:
        t0 = time.perf_counter()
        # written by a child: Linux carries ru_maxrss over fork + exec, so this launcher must stay small
        done = root / "pair.json"  # a reused pair: its shape must be this run's
        if done.exists() and {k: v for k, v in json.loads(done.read_text()).items() if k != "size"} == vars(shape):
            size = json.loads(done.read_text())["size"]
            print(f"reusing the pair in {root}: {size / 2**30:.2f} GiB per checkpoint", flush=True)
        else:
            writer = "import argparse, json, sys; from pathlib import Path; from bench_shards import write_pair; "
            writer += "print(write_pair(Path(sys.argv[1]), argparse.Namespace(**json.loads(sys.argv[2]))))"
            write = subprocess.run(
                [sys.executable, "-c", writer, str(root), json.dumps(vars(shape))],
                check=True,
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            )
            size = int(write.stdout.strip().splitlines()[-1])
            done.write_text(json.dumps(dict(vars(shape), size=size)))
            print(f"wrote the pair: {size / 2**30:.2f} GiB per checkpoint in {time.perf_counter() - t0:.0f} s")
        tokens = "import sys, torch; from safetensors.torch import save_file; g = torch.Generator().manual_seed(0); "
        tokens += "shape = (int(sys.argv[2]), int(sys.argv[3])); "
        tokens += "save_file({'input_ids': torch.randint(0, 128256, shape, generator=g)}, sys.argv[1])"
        subprocess.run(
            [sys.executable, "-c", tokens, str(root / "tokens.safetensors"), str(a.rows), str(a.length)], check=True
        )
        results = {}
        for what in [a.only] if a.only else ["capture", "probe"]:
            run = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    what,
                    str(root / "base"),
                    str(root / "tuned"),
                    str(a.threads),
                    str(root / "tokens.safetensors"),
                    str(root / "probe.json"),
                ],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                sys.exit(f"{what} failed:\n{run.stderr[-4000:]}")
            results[what] = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps(results[what]), flush=True)
        if a.only:
            return
        rows = json.loads((root / "probe.json").read_text())["rows"]
        summary = {
            "layers": a.layers,
            "tokens": a.rows * a.length,
            "checkpoint_gib": size / 2**30,
            "rows": len(rows),
            "probe_over_capture": results["probe"]["wall_s"] / results["capture"]["wall_s"],
            "probe_peak_rss_gib": results["probe"]["peak_rss_mib"] / 1024,
            "capture_peak_rss_gib": results["capture"]["peak_rss_mib"] / 1024,
            "per_block_probe_s": results["probe"]["wall_s"] / a.layers,
            "per_block_capture_s": results["capture"]["wall_s"] / a.layers,
        }
        print(json.dumps(summary, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
