"""Peak memory and time of a full probe of a 0.5B-parameter pair, Qwen2-shaped, random init.

    .venv/bin/python benchmarks/bench_memory.py --json benchmarks/results/memory_0.5b.json

The pair (made once, cached under ``--cache``): a Qwen2 config shaped like Qwen2.5-0.5B (24 layers,
d_model 896, d_mlp 4864, 14 query / 2 key-value heads, vocab 151,936, tied embeddings), random init
from ``--seed``, saved float32 as safetensors shards; the tuned side is the base plus
0.01 · N(0, 1) / √n_in on every studied matrix (same seed). The SmolLM2 tokenizer is saved beside
both (loading a Llama-like folder needs one; token ids are random below its vocabulary).

Measured in a child process (its own VmHWM; ``ru_maxrss`` would carry the parent's peak across
exec): ``rwasym.probe(base_folder, tuned_folder, tokens)`` with every default (200 null draws per
row, per-head rows, r(k) curves, the default stats budget), i.e. the base loaded and the tuned
side streamed from its files. The limit it is compared with: 1.5 × (the two float32 checkpoints'
file sizes + the RSS of a child that only imports the same packages).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import json, sys, time, torch
import rwasym, transformers
mode, base, tuned, n_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {}
if mode == "probe":
    t0 = time.perf_counter()
    b = rwasym.load(base)
    tokens = torch.randint(0, 49152, (n_tokens // 128, 128), generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    result = rwasym.probe(b, tuned, tokens, batch_size=8, progress=False)
    out.update(load_s=t1 - t0, probe_s=time.perf_counter() - t1, rows=len(result.rows), curves=len(result.curves),
               capture_passes=result.config["capture_passes"], tuned_streamed=result.config["tuned_streamed"])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
out["maxrss_kb"] = hwm
print(json.dumps(out))
"""


def make_pair(cache: Path, seed: int) -> tuple[Path, Path]:
    """(base, tuned) folders of the Qwen2-shaped 0.5B pair, written once into ``cache``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rwasym.testing import real_model_folder

    base, tuned = cache / "base", cache / "tuned"
    if (base / "config.json").exists() and (tuned / "config.json").exists():
        return base, tuned
    config = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from their init, as a trained model's are
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    tokenizer = real_model_folder(None)
    for folder in (base, tuned):
        shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(base, max_shard_size="1GB")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.save_pretrained(tuned, max_shard_size="1GB")
    for folder in (base, tuned):
        for f in tokenizer.glob("*token*"):
            shutil.copy(f, folder / f.name)
    return base, tuned


def child(mode: str, base: Path, tuned: Path, n_tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(base), str(tuned), str(n_tokens)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "rwasym" / "bench-qwen2-0.5b"))
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    import rwasym

    t0 = time.perf_counter()
    base, tuned = make_pair(Path(args.cache), args.seed)
    print(f"pair ready in {time.perf_counter() - t0:.0f} s: {base}, {tuned}")
    size = sum(f.stat().st_size for folder in (base, tuned) for f in folder.glob("*.safetensors"))
    params = (
        sum(int(v) for v in [json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]])
        // 4
    )
    interpreter = child("import", base, tuned, args.tokens)["maxrss_kb"] * 1024
    run = child("probe", base, tuned, args.tokens)
    peak = run["maxrss_kb"] * 1024
    limit = 1.5 * (size + interpreter)
    results = {
        "rwasym": rwasym.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "seed": args.seed,
        "parameters": params,
        "checkpoints_bytes": size,
        "interpreter_rss": interpreter,
        "probe_peak_rss": peak,
        "limit_bytes": limit,
        "ratio": peak / (size + interpreter),
        **{k: v for k, v in run.items() if k != "maxrss_kb"},
    }
    print(
        f"0.5B pair ({params / 1e6:.0f}M parameters): probe peak RSS {peak / 2**30:.2f} GiB = "
        f"{results['ratio']:.2f}x (two float32 checkpoints {size / 2**30:.2f} GiB + interpreter "
        f"{interpreter / 2**30:.2f} GiB); limit 1.5x = {limit / 2**30:.2f} GiB"
    )
    print(
        f"  load {run['load_s']:.0f} s, probe {run['probe_s']:.0f} s ({run['capture_passes']} capture passes, "
        f"{run['rows']} rows, {run['curves']} curves), tuned streamed: {run['tuned_streamed']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
