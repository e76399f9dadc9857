"""Covariance capture versus a plain forward over the same tokens (same run, same model).

Prints ratios; record them in benchmarks/RESULTS.md. Usage:
    .venv/bin/python benchmarks/bench_capture.py [--d-model 256] [--tokens 32768]
"""

import argparse
import time

import torch

import rwasym
from rwasym.hooks.activations import capture, default_sites


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = rwasym.load(
        rwasym.native_config(
            d_model=args.d_model,
            d_head=64,
            n_heads=args.d_model // 64,
            n_layers=args.layers,
            n_ctx=args.pos,
            d_vocab=2048,
        )
    )
    tokens = torch.randint(0, 2048, (args.tokens // args.pos, args.pos))

    def plain():
        with torch.no_grad():
            for start in range(0, tokens.shape[0], args.batch):
                model.bridge(tokens[start : start + args.batch])

    attn_sites = {model.input_hook(s.name): s.n_in for s in model.matrices("blocks.*.attn.W_Q")}
    resid = {h: model.d_model for h in model.residual_hooks().values()}
    runs = {
        "plain forward": plain,
        "capture: attention inputs": lambda: capture(
            model, tokens, sites=attn_sites, batch_size=args.batch, progress=False
        ),
        "capture: residual stream (pre/mid/post)": lambda: capture(
            model, tokens, sites=resid, batch_size=args.batch, progress=False
        ),
        "capture: all default sites": lambda: capture(
            model, tokens, sites=default_sites(model), batch_size=args.batch, progress=False
        ),
    }
    plain()  # warm-up
    base = _best(plain, args.repeats)
    print(f"d_model={args.d_model} layers={args.layers} tokens={tokens.numel()} threads={torch.get_num_threads()}")
    for name, fn in runs.items():
        t = base if name == "plain forward" else _best(fn, args.repeats)
        print(f"{name:42s} {t:8.3f} s   ratio to plain forward {t / base:5.2f}x")


if __name__ == "__main__":
    main()
