"""The chunked evaluator on Gemma 3's 262,144-token vocabulary (google/gemma-3-270m, 18 blocks).

Each configuration runs in a child process: an `Evaluator` on held-out preference
pairs of the study (`rwasym.studies.corpora`) and collateral rows, then one batch of joint rank-8 edits of
the read set (W_Q and W_K of every block) scored on the collateral text (`iter_collateral`, what effect
matching calls) and on the pairs (and text) (`iter_joint`, a sweep row). ``whole`` is the evaluator before
chunking (one chunk per stream, references kept whole: `logit_bytes` and `reference_bytes` unbounded), the
baseline, at a size it fits (at 16 pairs and 8 collateral rows it was killed for memory here); ``chunked`` is
the default at the same size, then with ``text_metrics=False`` (the pairs' responses only, no text CE / KL) at
that size and at the pre-registered E4 size (all 274 held-out pairs, 64 collateral rows).
peak_gib: the child's peak resident memory from after the two models are loaded (VmHWM, reset through
/proc/self/clear_refs) to the end; load_peak_gib: the peak of the loading itself.

    .venv/bin/python benchmarks/bench_eval_vocab.py --threads 1 --json benchmarks/results/eval_vocab.json
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads({threads})
import rwasym
from rwasym.analyses.behaviour import Evaluator
from rwasym.studies.study import StudyConfig, _Family
from rwasym.testing import perturb
fam = _Family("gemma", StudyConfig(collateral_rows={rows}), Path("/tmp"))
pairs, _ = fam.pairs("heldout", 0)
pairs = pairs.subset(torch.arange(min({pairs}, len(pairs))))
base = fam.base()
tuned = perturb(fam.base(), 0.01, 0)
budget = dict(logit_bytes=1 << 62, reference_bytes=1 << 62) if "{mode}" == "whole" else dict()
budget["text_metrics"] = {text}
def hwm():  # this process's peak resident memory since the last reset (VmHWM), GiB
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 2**20
loaded = hwm()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: what follows is the evaluator's own
t0 = time.perf_counter()
ev = Evaluator(base, tuned, pairs, collateral=fam.rows["collateral"][0], **budget)
t_build = time.perf_counter() - t0
names = [s.name for s in base.matrices() if s.kind in ("W_Q", "W_K")]
g = torch.Generator().manual_seed(0)
edits = [{{n: (1e-3 * torch.randn(8, base.matrix(n).n_out, generator=g, dtype=torch.float64),
              torch.randn(8, base.matrix(n).n_in, generator=g, dtype=torch.float64)) for n in names}} for _ in range(4)]
t0 = time.perf_counter(); col = list(ev.iter_collateral(base, edits)); t_col = time.perf_counter() - t0
t0 = time.perf_counter(); rows = list(ev.iter_joint(base, edits)); t_joint = time.perf_counter() - t0
print(json.dumps(dict(mode="{mode}", text_metrics={text}, pairs=len(pairs), collateral_rows={rows},
    build_s=t_build, collateral_s=t_col, joint_s=t_joint, load_peak_gib=loaded, peak_gib=hwm(),
    kl=[c["collateral_kl"] for c in col], margin=[r["margin"] for r in rows],
    kl_base=[r.get("kl_base") for r in rows])))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runs = [("whole", True, 4, 4), ("chunked", True, 4, 4), ("chunked", False, 4, 4), ("chunked", False, 274, 64)]
    out = []
    for mode, text, pairs, rows in runs:
        code = CHILD.format(threads=args.threads, mode=mode, text=text, pairs=pairs, rows=rows)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:])
            out.append(dict(mode=mode, text_metrics=text, pairs=pairs, collateral_rows=rows, failed=res.returncode))
            continue
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    if len(out) >= 2 and "kl" in out[0] and "kl" in out[1]:
        w, c = out[0], out[1]
        diff = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(w["kl"] + w["margin"], c["kl"] + c["margin"]))
        ratio = (c["collateral_s"] + c["joint_s"]) / (w["collateral_s"] + w["joint_s"])
        print(
            f"chunked/whole at {w['pairs']} pairs: time {ratio:.2f}x, peak {c['peak_gib'] / w['peak_gib']:.2f}x; "
            f"largest relative difference {diff:.1e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, runs=out), f, indent=1)


if __name__ == "__main__":
    main()
