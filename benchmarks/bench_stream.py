"""Block-streamed probe versus the resident probe on the real SmolLM2-135M (issue #31).

Each measurement runs in a fresh interpreter (peak RSS = its ``ru_maxrss``; this launcher imports no torch):
- ``resident``: ``rwasym.probe(rwasym.load(base), tuned_folder, tokens)`` — the model loaded whole;
- ``streamed``: ``rwasym.probe(base_folder, tuned_folder, tokens, stream=True)`` — one block at a time;
- ``capture``: ``capture_blocks`` of the same sites and tokens (the block-streamed capture the issue's
  ratio is taken against), and a resident ``capture`` for the same ratio on the resident side.
The tuned side is the de-quantized SmolLM2 with 0.01·N(0, 1) added to every studied matrix (seed 0), saved
once under /tmp and deleted at the end. Tokens: 16 rows × 128 of the standard-library docstring corpus
(`rwasym.studies.collateral.generic_text`). Rows are compared (max relative difference of every float).

Usage: .venv/bin/python benchmarks/bench_stream.py [--rows 16] [--length 128] [--threads 2]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[5]))
import rwasym
from rwasym.hooks.activations import capture, capture_blocks
from rwasym.models.streaming import BlockStream
from safetensors.torch import load_file
what, base, tuned, tokens_file = sys.argv[1:5]
tokens = load_file(tokens_file)["input_ids"]
t0 = time.perf_counter()
rows = None
if what == "resident":
    rows = rwasym.probe(rwasym.load(base), tuned, tokens, progress=False).rows
elif what == "streamed":
    rows = rwasym.probe(base, tuned, tokens, stream=True, progress=False).rows
elif what == "capture":
    stream = BlockStream(base)
    for layer, acts in capture_blocks(stream, tokens, progress=False):
        del acts
elif what == "capture_resident":
    capture(rwasym.load(base), tokens, progress=False)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"what": what, "wall_s": wall, "peak_rss_mib": peak, "rows": rows}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rwasym-bench-stream-"))
    try:
        prep = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch, rwasym
from safetensors.torch import save_file
from rwasym.testing import perturb, real_model_folder
from rwasym.studies.collateral import generic_text
base = real_model_folder()
tuned = rwasym.load(base)
perturb(tuned, 0.01, seed=0)
tuned.save_pretrained(sys.argv[1] + "/tuned")
tokens, info = generic_text(tuned.tokenizer, int(sys.argv[2]), int(sys.argv[3]))
save_file({"input_ids": tokens}, sys.argv[1] + "/tokens.safetensors")
print(base)
"""
        out = subprocess.run(
            [sys.executable, "-c", prep, str(tmp), str(args.rows), str(args.length)],
            check=True,
            capture_output=True,
            text=True,
        )
        base = out.stdout.strip().splitlines()[-1]
        results = {}
        for what in ("capture_resident", "capture", "resident", "streamed"):
            run = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    what,
                    base,
                    str(tmp / "tuned"),
                    str(tmp / "tokens.safetensors"),
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[what] = json.loads(run.stdout.strip().splitlines()[-1])
            print(what, f"{results[what]['wall_s']:.1f} s", f"{results[what]['peak_rss_mib']:.0f} MiB", flush=True)
        a, b = results["resident"]["rows"], results["streamed"]["rows"]
        worst = 0.0
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for key, value in x.items():
                if isinstance(value, float) and value == value and value != 0:
                    worst = max(worst, abs(y[key] - value) / abs(value))
                elif value != y[key] and not (isinstance(value, float) and value != value):
                    raise SystemExit(f"rows differ at {x['matrix']} {key}: {value!r} vs {y[key]!r}")
        summary = {what: {k: v for k, v in r.items() if k != "rows"} for what, r in results.items()} | {
            "rows": len(a),
            "max_relative_difference": worst,
            "streamed_probe_over_streamed_capture": results["streamed"]["wall_s"] / results["capture"]["wall_s"],
            "resident_probe_over_resident_capture": results["resident"]["wall_s"]
            / results["capture_resident"]["wall_s"],
            "tokens": args.rows * args.length,
            "threads": args.threads,
        }
        print(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
