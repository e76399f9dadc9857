"""Where the time of a 10-row sweep goes (issue #28 item 7): the same script under two versions of rwasym.

Run `benchmarks/sweep_history_inputs.py` once (tokenizes the real pair's held-out pairs and a 16 × 128 slice of
its training text into /tmp/slow/inputs.pt), then this file with PYTHONPATH pointing at each checkout:
`PYTHONPATH=<checkout> .venv/bin/python benchmarks/bench_sweep_history.py <label>`. It prints the load, a plain
forward of the capture tokens, the sweep (rank-1 W_Q of layer 15, pca:2 + random:4 + orthogonal:4, α = 1,
norm-matched, 64 pairs) and the cProfile table by cumulative time. One thread. Works with the flat 0.1 layout
(`rwasym.run_sweep`, no ``match``) and the current one (`rwasym.sweep`).
"""

import cProfile
import inspect
import io
import pstats
import sys
import time
import warnings

import torch

import rwasym

FOLDER = "/root/.cache/rwasym/real-63450b599b3f/align/"  # the real pair of seed 0 (`rwasym pair real`)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    label = sys.argv[1]
    t0 = time.time()
    base, tuned = rwasym.load(FOLDER + "step_000000"), rwasym.load(FOLDER + "step_000040")
    t_load = time.time() - t0
    d = torch.load("/tmp/slow/inputs.pt", weights_only=True)
    pairs = {k: d[k] for k in ("prompt", "chosen", "rejected")}
    with torch.no_grad():
        t = time.time()
        base.bridge(d["data"])
        t_fwd = time.time() - t
    fn = rwasym.sweep if callable(rwasym.sweep) else rwasym.run_sweep  # 0.1: rwasym.sweep was the module
    kw = dict(
        matrices="blocks.15.attn.W_Q",
        directions="pca:2,random:4,orthogonal:4",
        alphas=(1.0,),
        max_pairs=64,
        data=d["data"],
        progress=False,
    )
    if "overrides" in str(inspect.signature(fn)):
        kw["match"] = "norm"  # the default became "kl"; the comparison is of the same norm-matched sweep
    profile = cProfile.Profile()
    t = time.time()
    profile.enable()
    rows = fn(base, tuned, pairs, out=f"/tmp/slow/{label}.jsonl", **kw)
    profile.disable()
    t_sweep = time.time() - t
    print(
        f"{label}: {len(rows)} rows, load {t_load:.1f} s, forward (16×128) {t_fwd:.2f} s, "
        f"sweep {t_sweep:.1f} s = {t_sweep / t_fwd:.1f} forwards",
        flush=True,
    )
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumtime").print_stats(25)
    print(out.getvalue()[:6000])


if __name__ == "__main__":
    main()
