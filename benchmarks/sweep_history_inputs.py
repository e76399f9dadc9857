"""Inputs of bench_sweep_history.py: the real pair's held-out pairs and 16 rows × 128 tokens of its training text."""

import torch

from rwasym.studies.real_pair import load_real_pairs, real_corpus, real_pair


def main() -> None:
    base, _, info = real_pair(None, seed=0, progress=False)
    _, held = load_real_pairs(info)
    data = real_corpus(info, base.tokenizer, seq_len=128)
    inputs = {k: getattr(held, k) for k in ("prompt", "chosen", "rejected")}
    inputs["data"] = data[:16].contiguous()
    torch.save(inputs, "/tmp/slow/inputs.pt")


if __name__ == "__main__":
    main()
