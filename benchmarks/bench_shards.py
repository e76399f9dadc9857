"""Peak memory of `rwasym.models.checkpoint.weight_delta_norms` on a checkpoint pair bigger than the target.

Writes a random Llama-layout (GQA) sharded safetensors pair to a temporary folder under /tmp —
tensor by tensor with a minimal safetensors writer, never a whole model in memory — then, in a
fresh interpreter, streams every ΔW (‖ΔW‖_F per matrix) and reports the peak RSS against the size
of one checkpoint, next to the interpreter's RSS after its imports. The folder is deleted at the
end. Target: peak < 25% of one checkpoint. Default shapes are TinyLlama-1.1B's (hidden 2048,
MLP 5632, 32 heads, 4 KV heads, 22 layers, vocab 32000): 4.4 GB per checkpoint in float32.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the measuring process and, as a
cross-check, ``VmHWM`` from /proc/self/status. Linux carries ru_maxrss over fork + exec, so the
writer and the measurer are both children of this torch-free launcher (a few tens of MB): the
measurer's ru_maxrss then is its own peak.

Usage:
    .venv/bin/python benchmarks/bench_shards.py [--layers 22] [--dtype float32] [--shard-gb 1.0]
"""

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

_TAGS = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
_NOISE = 1e-2  # W_tuned = W_base + _NOISE · z, z ~ N(0, 1): ‖ΔW‖_F ≈ _NOISE · sqrt(n_out · n_in)


def _llama_tensors(a) -> list:
    """(key, shape) of every LlamaForCausalLM tensor, in file order."""
    h, m, v, kv = a.hidden, a.intermediate, a.vocab, a.kv_heads * (a.hidden // a.heads)
    items = [("model.embed_tokens.weight", (v, h))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        items += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]
    return items + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_shard(base_path: Path, tuned_path: Path, items, dtype: str) -> None:
    """Write one shard of both checkpoints in lock-step, one tensor at a time.

    safetensors layout: 8-byte little-endian header length, JSON header (key → dtype, shape,
    data_offsets), then the raw little-endian data, 8-byte aligned. Base values are N(0, 0.02²)
    (norm scales N(0, 1)), seeded by the key; tuned = base + _NOISE · N(0, 1).
    """
    import torch

    tag, width = _TAGS[dtype]
    header, offset = {}, 0
    for key, shape in items:
        nbytes = width * _numel(shape)
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(base_path, "wb") as fb, open(tuned_path, "wb") as ft:
        for f in (fb, ft):
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
        for key, shape in items:
            seed = zlib.crc32(key.encode())
            base = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            base = (base * (0.02 if len(shape) == 2 else 1.0)).to(getattr(torch, dtype))
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
            tuned = (base.float() + _NOISE * noise).to(base.dtype)
            del noise
            for f, t in ((fb, base), (ft, tuned)):
                raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
                f.write(raw.contiguous().numpy().tobytes())
            del base, tuned


def write_pair(root: Path, a) -> int:
    """Random base/ and tuned/ checkpoints under ``root``: config.json, shards of about
    ``--shard-gb``, model.safetensors.index.json. Returns one checkpoint's data size in bytes."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        num_hidden_layers=a.layers,
        vocab_size=a.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype=a.dtype,
    )
    items, width = _llama_tensors(a), _TAGS[a.dtype][1]
    shards, current, size = [], [], 0
    for key, shape in items:
        nbytes = width * _numel(shape)
        if current and size + nbytes > a.shard_gb * 1e9:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    total = sum(width * _numel(s) for _, s in items)
    weight_map = {}
    for folder in ("base", "tuned"):
        (root / folder).mkdir(parents=True)
        config.save_pretrained(root / folder)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update({key: name for key, _ in shard})
        _write_shard(root / "base" / name, root / "tuned" / name, shard, a.dtype)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    for folder in ("base", "tuned"):
        (root / folder / "model.safetensors.index.json").write_text(index)
    return total


def measure(base: str, tuned: str) -> dict:
    """Run in a fresh interpreter: imports, then `weight_delta_norms` over every matrix."""
    import resource

    def hwm_mb() -> float:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

    import torch

    torch.set_num_threads(1)
    import transformer_lens.model_bridge.sources  # noqa: F401
    import transformers  # noqa: F401

    from rwasym.models import checkpoint as shards
    from rwasym.models.loading import bridge_classes

    bridge_classes()
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    entries = shards.checkpoint_matrices(base)
    t_skeleton = time.perf_counter() - t0
    norms = shards.weight_delta_norms(base, tuned)
    elapsed = time.perf_counter() - t0
    sizes = {e.name: e.spec.n_out * e.spec.n_in for e in entries}
    ratios = [norms[k] / (_NOISE * sizes[k] ** 0.5) for k in norms]
    return dict(
        after_imports_mb=after_imports,
        peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_hwm_mb=hwm_mb(),
        seconds=elapsed,
        skeleton_seconds=t_skeleton,
        n_matrices=len(norms),
        largest_matrix=max(sizes.values()),
        norm_ratio_min=min(ratios),
        norm_ratio_max=max(ratios),
    )


def _child(*argv: str) -> str:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=sorted(_TAGS), default="float32")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkpoints")
    ap.add_argument("--_write", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._write:  # child 1: the checkpoint pair
        print(write_pair(Path(a._write), a))
        return
    if a._measure:  # child 2: the fresh interpreter that streams
        print(json.dumps(measure(*a._measure)))
        return
    shape_args = [
        f"--{k}={v}"
        for k, v in (
            ("hidden", a.hidden),
            ("intermediate", a.intermediate),
            ("heads", a.heads),
            ("kv-heads", a.kv_heads),
            ("layers", a.layers),
            ("vocab", a.vocab),
            ("dtype", a.dtype),
            ("shard-gb", a.shard_gb),
        )
    ]
    root = Path(tempfile.mkdtemp(prefix="rwasym-bench-shards-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        total = int(_child(*shape_args, f"--_write={root}"))
        t_write = time.perf_counter() - t0
        n_files = len(list((root / "base").glob("*.safetensors")))
        r = json.loads(_child("--_measure", str(root / "base"), str(root / "tuned")))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    ckpt = total / 2**20

    def row(name, mb):
        return f"| {name:44s} | {mb:9.0f} MiB | {100 * mb / ckpt:12.1f}% |"

    print(
        f"Llama GQA, {a.layers} layers, hidden {a.hidden}, MLP {a.intermediate}, {a.heads} heads / "
        f"{a.kv_heads} KV heads, vocab {a.vocab}, {a.dtype}, {n_files} shards per checkpoint "
        f"(pair written in {t_write:.0f} s)"
    )
    print(f"| {'quantity':44s} | {'value':>13s} | of checkpoint |")
    print(f"|{'-' * 46}|{'-' * 15}|{'-' * 15}|")
    print(row("one checkpoint (safetensors data)", ckpt))
    print(row("RSS after imports (torch, transformers, TL)", r["after_imports_mb"]))
    print(row("peak RSS, ru_maxrss", r["peak_mb"]))
    print(row("peak RSS, VmHWM", r["peak_hwm_mb"]))
    print(row("peak − after imports", r["peak_mb"] - r["after_imports_mb"]))
    print(row("largest ΔW (float64)", 8 * r["largest_matrix"] / 2**20))
    print(
        f"{r['n_matrices']} matrices streamed in {r['seconds']:.1f} s (skeleton {r['skeleton_seconds']:.1f} s); "
        f"‖ΔW‖_F / ({_NOISE}·sqrt(n_out·n_in)) in [{r['norm_ratio_min']:.4f}, {r['norm_ratio_max']:.4f}]"
    )
    verdict = "meets" if r["peak_mb"] < 0.25 * ckpt else "misses"
    print(f"peak RSS / checkpoint = {r['peak_mb'] / ckpt:.3f}: {verdict} the < 25% target")


if __name__ == "__main__":
    main()
