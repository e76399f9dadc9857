"""Costs on the real model: SmolLM2-135M-Instruct (30 layers) and its cached DPO fine-tune.

Prints ratios against baselines measured in the same run; record them in benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_real.py                       # capture, probe and memory
    .venv/bin/python benchmarks/bench_real.py --parts capture --tokens 4096
    .venv/bin/python benchmarks/bench_real.py --parts sweep --json benchmarks/results/real_sweep.json

capture: a plain forward, `capture` of all default sites and of the attention inputs alone, and a
  TransformerLens user's ``run_with_cache(names_filter=...)`` plus float64 second moments of the
  same sites. The *limit* of a capture is the plain forward plus the covariance updates'
  multiply-adds (Σ over distinct sites of d² per token) run at the forward's own measured
  throughput (its multiply-adds: every studied linear, the unembedding and the causal attention
  products, T/2 keys per query on average).
probe: the default `rwasym.probe` (null percentiles from 200 draws, per-head rows, r(k) curves) of
  the whole real pair on the same tokens, against the capture of the sites it needs.
memory: peak RSS of a child process that runs the full probe as a user would (the base loaded, the tuned
  checkpoint folder streamed, the default stats budget), and of one that loads both models, against
  the two float32 checkpoints' file sizes plus the RSS of a child that only imports the same packages.
sweep (not in the default parts): per-edit cost of rank-1 edits of W_Q at three depths against the
  limit (the forward of blocks L..end on the evaluation tokens), beside the naive deep-copy loop.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_capture import _best  # the script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def _tokens(model, n_tokens, pos=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.d_vocab, (n_tokens // pos, pos), generator=g)


def forward_macs_per_token(model, pos: int) -> float:
    """Multiply-adds per token of a plain forward: studied linears + unembedding + causal attention."""
    linears = sum(s.n_out * s.n_in for s in model.matrices())
    attn = sum(2 * s.n_out * (pos + 1) / 2 for s in model.matrices("blocks.*.attn.W_Q"))  # QKᵀ and AV
    return float(linears + model.d_model * model.d_vocab + attn)


def bench_capture(model, tokens, batch, repeats):
    from rwasym.hooks.activations import capture, default_sites

    def plain():
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch):
                model.bridge(tokens[i : i + batch])

    sites = default_sites(model)
    attn = {model.input_hook(s.name): s.n_in for s in model.matrices("blocks.*.attn.W_Q")}

    def tl_user():  # what a TransformerLens user writes: cache the sites, then float64 Σ a aᵀ
        sums = {h: torch.zeros(d, d, dtype=torch.float64) for h, d in sites.items()}
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch):
                _, cache = model.bridge.run_with_cache(tokens[i : i + batch], names_filter=list(sites))
                for h, d in sites.items():
                    x = cache[h].reshape(-1, d).double()
                    sums[h] += x.T @ x

    plain()  # warm-up
    t_plain = _best(plain, repeats)
    acts = capture(model, tokens[:batch], batch_size=batch, progress=False)
    distinct = {id(a): a.dim for a in acts.stats.values()}  # resid_post(L) / resid_pre(L+1) shared
    cov_macs = sum(d * d for d in distinct.values())
    attn_macs = sum(d * d for d in attn.values())
    fwd_macs = forward_macs_per_token(model, tokens.shape[1])
    rows = {
        "plain forward": t_plain,
        "capture: attention inputs": _best(
            lambda: capture(model, tokens, sites=attn, batch_size=batch, progress=False), repeats
        ),
        "capture: all default sites": _best(lambda: capture(model, tokens, batch_size=batch, progress=False), repeats),
        "TL run_with_cache + float64 moments (all sites)": _best(tl_user, 1),
    }
    out = {
        "tokens": int(tokens.numel()),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "forward_macs_per_token": fwd_macs,
        "cov_macs_per_token": cov_macs,
        "distinct_sites": len(distinct),
        "sites": len(sites),
        "seconds": rows,
    }
    out["limit_all"] = 1 + cov_macs / fwd_macs
    out["limit_attn"] = 1 + attn_macs / fwd_macs
    print(
        f"capture: {out['tokens']} tokens, batch {batch}, {out['threads']} threads; {len(sites)} default sites, "
        f"{len(distinct)} distinct statistics"
    )
    for name, t in rows.items():
        print(f"  {name:48s} {t:7.2f} s  {t / t_plain:5.2f}x a plain forward")
    print(
        f"  limit (forward + Σd² multiply-adds at forward throughput): all sites {out['limit_all']:.2f}x, "
        f"attention inputs {out['limit_attn']:.2f}x"
    )
    print(
        f"  capture / limit: all sites {rows['capture: all default sites'] / t_plain / out['limit_all']:.2f}, "
        f"attention inputs {rows['capture: attention inputs'] / t_plain / out['limit_attn']:.2f}"
    )
    return out


def bench_probe(base, tuned, tokens, batch):
    import rwasym
    from rwasym.analyses.probe import probe_sites
    from rwasym.hooks.activations import capture

    specs = base.matrices()
    t0 = time.perf_counter()
    acts = capture(base, tokens, sites=probe_sites(base, specs), batch_size=batch, progress=False)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = rwasym.probe(base, tuned, activations=acts, progress=False)
    t_probe = time.perf_counter() - t0
    # the opt-in prediction subspaces (issue #29): the centred basis is one more d × d Gram; the Fisher metric a
    # second forward pass over the same tokens, with p_t projected on W̃_U. Timed end to end (its own capture)
    t0 = time.perf_counter()
    everything = rwasym.probe(
        base,
        tuned,
        tokens,
        batch_size=batch,
        subspaces="activation,prediction,prediction_centered,prediction_fisher",
        progress=False,
    )
    t_all = time.perf_counter() - t0
    out = {
        "capture_s": t_capture,
        "probe_s": t_probe,
        "rows": len(result.rows),
        "curves": len(result.curves),
        "ratio": t_probe / t_capture,
        "all_subspaces_s": t_all,
        "all_subspaces_rows": len(everything.rows),
        "all_subspaces_ratio": t_all / (t_capture + t_probe),
    }
    print(
        f"probe: {len(result.rows)} rows, {len(result.curves)} curves in {t_probe:.1f} s; capture of its sites "
        f"{t_capture:.1f} s; probe / capture = {out['ratio']:.2f}; with all four subspaces (own capture + Fisher "
        f"pass) {t_all:.1f} s, {len(everything.rows)} rows = {out['all_subspaces_ratio']:.2f}x capture + default probe"
    )
    return out


_CHILD = """
import json, sys, torch
import rwasym, transformers
mode, base, tuned, n_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode in ("probe", "probe-loaded"):
    b = rwasym.load(base)
    t = rwasym.load(tuned) if mode == "probe-loaded" else tuned  # a folder: streamed
    tokens = torch.randint(0, b.d_vocab, (n_tokens // 128, 128), generator=torch.Generator().manual_seed(0))
    rwasym.probe(b, t, tokens, batch_size=8, progress=False)
# VmHWM: this process's own peak (ru_maxrss would include the parent's peak carried across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_kb": hwm}))
"""


def bench_memory(base_folder, tuned_folder, n_tokens):
    def child(mode):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, str(base_folder), str(tuned_folder), str(n_tokens)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024

    size = sum(f.stat().st_size for folder in (base_folder, tuned_folder) for f in Path(folder).glob("*.safetensors"))
    interpreter, peak, loaded = child("import"), child("probe"), child("probe-loaded")
    out = {
        "checkpoints_bytes": size,
        "interpreter_rss": interpreter,
        "probe_peak_rss": peak,
        "ratio": peak / (size + interpreter),
        "probe_loaded_peak_rss": loaded,
        "ratio_loaded": loaded / (size + interpreter),
    }
    print(
        f"memory: probe peak RSS {peak / 2**30:.2f} GiB (tuned streamed), {loaded / 2**30:.2f} GiB (both loaded); "
        f"two float32 checkpoints {size / 2**30:.2f} GiB + interpreter {interpreter / 2**30:.2f} GiB; ratios "
        f"{out['ratio']:.2f} / {out['ratio_loaded']:.2f} (limit 1.5)"
    )
    return out


def bench_sweep(base, tuned, info, layers, n_edits, n_naive, max_pairs, edits_per_pass):
    """Per-edit cost of the sweep's fast path against its limit, and the naive deep-copy loop.

    limit: one forward of blocks L..end and the unembedding on the evaluation streams, from the
    cached clean output of block L−1 (the `_Runner` with no edit: exactly the work an edit of a
    layer-L matrix cannot skip). fast: `Evaluator.measure_edits` in passes of ``edits_per_pass``,
    including the metrics, the prefix recording and the self-check. naive: deep-copy the base,
    write W + u vᵀ, `Evaluator.measure` (full forwards of chosen, rejected, text)."""
    import copy

    from rwasym.analyses.behaviour import Evaluator, _Runner
    from rwasym.math.rank1 import directions
    from rwasym.studies.real_pair import load_real_pairs

    _, held = load_real_pairs(info)
    ev = Evaluator(base, tuned, held, max_pairs=max_pairs)
    n_tok = sum(int(t.numel()) for t in (ev.data.chosen, ev.data.rejected, ev.data.text))
    print(
        f"sweep: {ev.data.chosen.shape[0]} held-out pairs, {n_tok} tokens per full evaluation, {n_edits} edits "
        f"({edits_per_pass} per pass), naive loop timed on {n_naive}"
    )
    out = {
        "pairs": int(ev.data.chosen.shape[0]),
        "tokens_per_evaluation": n_tok,
        "edits": n_edits,
        "edits_per_pass": edits_per_pass,
        "layers": {},
    }
    for layer in layers:
        name = f"blocks.{layer}.attn.W_Q"
        delta = tuned.weight(name) - base.weight(name)
        dirs = directions("random", delta, n_edits, side="input", generator=torch.Generator().manual_seed(1))
        U, V = torch.stack([d.u for d in dirs]) * 50.0, torch.stack([d.v for d in dirs])
        runner = _Runner(base, ev.streams, layer, True)

        def suffix():
            for i in range(len(ev.streams)):
                runner.logits(i, 1)

        suffix()
        t_limit = _best(suffix, 2)
        t0 = time.perf_counter()
        ev._runners.clear()  # the prefix recording and self-check count
        fast = []
        for s in range(0, n_edits, edits_per_pass):
            fast += ev.measure_edits(base, name, U[s : s + edits_per_pass], V[s : s + edits_per_pass])
        t_fast = (time.perf_counter() - t0) / n_edits
        t0 = time.perf_counter()
        slow = []
        for e in range(n_naive):
            m = copy.deepcopy(base)
            m.set_weight(name, m.weight(name) + torch.outer(U[e], V[e]))
            slow.append(ev.measure(m))
            del m
        t_naive = (time.perf_counter() - t0) / n_naive
        diff = max(abs(a[k] - b[k]) for a, b in zip(slow, fast) for k in a if "accuracy" not in k)
        row = {
            "matrix": name,
            "limit_s": t_limit,
            "fast_per_edit_s": t_fast,
            "naive_per_edit_s": t_naive,
            "fast_over_limit": t_fast / t_limit,
            "naive_over_limit": t_naive / t_limit,
            "speedup_vs_naive": t_naive / t_fast,
            "max_metric_diff": diff,
            "prefix_reuse": ev._runners[next(iter(ev._runners))].reuse,
        }
        out["layers"][layer] = row
        print(
            f"  {name}: limit {t_limit:.2f} s; fast {t_fast:.2f} s per edit = {row['fast_over_limit']:.2f}x the limit; "
            f"naive {t_naive:.2f} s = {row['naive_over_limit']:.2f}x; speedup {row['speedup_vs_naive']:.1f}x; "
            f"max |metric diff| {diff:.1e}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="capture,probe,memory")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--sweep-layers", default="0,15,29", help="depths of the edited W_Q (sweep part)")
    ap.add_argument("--sweep-edits", type=int, default=16)
    ap.add_argument("--sweep-naive", type=int, default=2)
    ap.add_argument("--sweep-pairs", type=int, default=16)
    ap.add_argument("--edits-per-pass", type=int, default=4, help="the sweep's CPU default")
    args = ap.parse_args()
    import rwasym
    from rwasym.studies.real_pair import real_pair
    from rwasym.testing import real_model_folder

    parts = args.parts.split(",")
    base_folder = real_model_folder(None)
    results = {"torch": torch.__version__, "rwasym": rwasym.__version__}
    base = rwasym.load(base_folder)
    tokens = _tokens(base, args.tokens)
    if "capture" in parts:
        results["capture"] = bench_capture(base, tokens, args.batch, args.repeats)
    if "probe" in parts or "memory" in parts or "sweep" in parts:
        _, tuned, info = real_pair(progress=True)
        if "probe" in parts:
            results["probe"] = bench_probe(base, tuned, tokens, args.batch)
        if "sweep" in parts:
            results["sweep"] = bench_sweep(
                base,
                tuned,
                info,
                [int(x) for x in args.sweep_layers.split(",")],
                args.sweep_edits,
                args.sweep_naive,
                args.sweep_pairs,
                args.edits_per_pass,
            )
        if "memory" in parts:
            del tuned
            results["memory"] = bench_memory(base_folder, info["tuned"], args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
