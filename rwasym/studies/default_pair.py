"""The embedded default model pair: a native base pretrained on the procedural language and its
DPO-aligned copy, built once and cached on disk.

Cache folder: ``<root>/default-<hash>`` where root is ``cache_dir``, else ``$RWASYM_CACHE``, else
``~/.cache/rwasym``, and the hash covers every config below (and a format tag), so changing any
default builds a new pair. The folder holds ``pretrain/step_*`` (log-spaced pretraining
checkpoints, the last one is the base), ``align/step_*`` (the DPO trajectory, the last one is the
aligned model), both ``log.jsonl`` files, ``pairs_train.safetensors`` /
``pairs_heldout.safetensors`` and ``info.json`` (configs, entropies, accuracies, KL, timings). It is
written to a temporary sibling and renamed into place, so a killed build leaves no half cache.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data.pairs import PreferencePairs
from ..errors import RwasymError
from ..models import Model, load, native_config
from ..models.cache import cache_root
from ..objectives import heldout_ce, mean_kl, preference_accuracy
from ..train.loops import AlignConfig, TrainConfig, align, hash_record, pretrain
from .language import LanguageConfig, PairConfig, corpus, entropy_per_token, make_pairs

__all__ = ["DefaultPairSpec", "default_pair", "default_spec", "load_default_pairs", "spec_hash"]

FORMAT = "rwasym-default-pair/1"
PathLike = str | os.PathLike


@dataclass(frozen=True)
class DefaultPairSpec:
    """Everything that defines the default pair (hashed into the cache key)."""

    language: LanguageConfig = LanguageConfig()  # 512 tokens, Zipfian rank-16 Markov, half the rows copy (p = 0.6)
    model: dict = field(
        default_factory=lambda: dict(  # native_config overrides (d_vocab from language)
            d_model=128, d_head=32, n_heads=4, n_layers=2, n_ctx=64, d_mlp=512, seed=0
        )
    )
    n_train_seqs: int = 16000  # pretraining corpus rows (≈ 2 epochs at the default budget)
    n_heldout_seqs: int = 256  # held-out corpus rows for CE and KL
    seq_len: int = 64  # corpus row length (= n_ctx)
    pretrain: TrainConfig = TrainConfig()  # 1500 steps × 32 × 64 tokens, lr 2e-3
    pairs: PairConfig = PairConfig(n_per_rule=15000, prompt_len=12, cont_len=1)  # ≈ 1 epoch of DPO: fresh pairs
    heldout_frac: float = 0.1  # share of the pairs held out (stratified by rule)
    align: AlignConfig = AlignConfig(objective="dpo", beta=1.0, steps=400, batch_size=64, lr=5e-4)


def default_spec(quick: bool = False, seed: int = 0) -> DefaultPairSpec:
    """The default spec; ``quick`` shrinks every budget (a smoke-test pair, not an aligned one).

    ``seed`` reseeds the model initialisation, the pretraining data and order, the preference pairs
    and the alignment run, but not the language itself (every seed learns the same task). Seed 0 is
    the default pair.
    """
    spec = DefaultPairSpec()
    if seed != 0:
        spec = replace(
            spec,
            model={**spec.model, "seed": int(seed)},
            pretrain=replace(spec.pretrain, seed=int(seed)),
            pairs=replace(spec.pairs, seed=int(seed)),
            align=replace(spec.align, seed=int(seed)),
        )
    if not quick:
        return spec
    return replace(
        spec,
        n_train_seqs=256,
        n_heldout_seqs=32,
        pretrain=replace(spec.pretrain, steps=20, warmup_steps=5, n_checkpoints=3),
        pairs=replace(spec.pairs, n_per_rule=100),
        heldout_frac=0.2,
        align=replace(spec.align, steps=6, batch_size=16, warmup_steps=2, checkpoint_every=3),
    )


def spec_hash(spec: DefaultPairSpec) -> str:
    """12 hex digits of sha256 over the spec's JSON (sorted keys) and the format tag."""
    record = asdict(spec)
    if record["align"].get("grad_accum") == 1:  # added after 0.1: counted only when set, so caches stay valid
        del record["align"]["grad_accum"]
    for stage in ("pretrain", "align"):  # so are the optimizer fields (`hash_record`)
        record[stage] = hash_record(record[stage])
    text = json.dumps({"format": FORMAT, "spec": record}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _final(folder: Path) -> Path:
    steps = sorted(folder.glob("step_*"))
    if not steps:
        raise RwasymError(f"{str(folder)!r} holds no step_* checkpoints; delete the cache folder to rebuild it.")
    return steps[-1]


def _accuracies(base: Model, tuned: Model, pairs: PreferencePairs) -> dict:
    out = {}
    for rule, sub in pairs.by_rule().items():
        out[rule] = {
            "base": preference_accuracy(base, None, sub),
            "tuned": preference_accuracy(tuned, None, sub),
            "tuned_implicit_reward": preference_accuracy(tuned, base, sub),
            "n": len(sub),
        }
    return out


def _build(spec: DefaultPairSpec, folder: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    lang = spec.language
    train_tokens = corpus(spec.n_train_seqs, spec.seq_len, seed=spec.pretrain.seed, config=lang)
    held_tokens = corpus(spec.n_heldout_seqs, spec.seq_len, seed=spec.pretrain.seed + 10_007, config=lang)
    model = load(native_config(**spec.model, d_vocab=lang.d_vocab))
    pre = pretrain(model, train_tokens, spec.pretrain, out=folder / "pretrain", progress=progress)
    base_dir = _final(folder / "pretrain")
    base, tuned = load(base_dir), load(base_dir)
    train_pairs, held_pairs = make_pairs(spec.pairs, lang).split(spec.heldout_frac, seed=spec.pairs.seed)
    train_pairs.save(folder / "pairs_train.safetensors")
    held_pairs.save(folder / "pairs_heldout.safetensors")
    t1 = time.perf_counter()
    ali = align(tuned, base, train_pairs, spec.align, out=folder / "align", progress=progress)
    t2 = time.perf_counter()
    ent = entropy_per_token(seq_len=spec.seq_len, n_seqs=1000, config=lang)
    return {
        "format": FORMAT,
        "hash": spec_hash(spec),
        "spec": asdict(spec),
        "entropy": ent.to_dict(),
        "pretrain": {
            "final_train_loss": pre.final_loss,
            "heldout_ce": heldout_ce(base, held_tokens),
            "seconds": pre.seconds,
        },
        "align": {
            "final_loss": ali.final_loss,
            "seconds": ali.seconds,
            "heldout_ce": heldout_ce(tuned, held_tokens),
            "kl_to_base": mean_kl(tuned, base, held_tokens),
        },
        "preference_accuracy": _accuracies(base, tuned, held_pairs),
        "seconds": {"pretrain_stage": t1 - t0, "align": t2 - t1, "total": time.perf_counter() - t0},
    }


def default_pair(
    cache_dir: PathLike | None = None,
    quick: bool = False,
    progress: bool = True,
    spec: DefaultPairSpec | None = None,
    seed: int = 0,
) -> tuple[Model, Model, dict]:
    """(base, aligned, info) of the default pair, built on first use and loaded from cache after.

    ``info`` holds the numbers of ``info.json`` plus ``folder``, ``base`` / ``tuned`` checkpoint
    paths and ``cached`` (whether this call reused the cache). ``spec`` overrides the defaults;
    ``seed`` picks a replicate (`default_spec`), each cached in its own folder.
    """
    spec = spec or default_spec(quick, seed)
    folder = cache_root(cache_dir) / f"default-{spec_hash(spec)}"
    cached = (folder / "info.json").exists()
    if not cached:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            info = _build(spec, tmp, progress)
            (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished first: keep its copy
                if not (folder / "info.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((folder / "info.json").read_text())
    base_dir, tuned_dir = _final(folder / "pretrain"), _final(folder / "align")
    info.update(folder=str(folder), base=str(base_dir), tuned=str(tuned_dir), cached=cached)
    return load(base_dir), load(tuned_dir), info


def load_default_pairs(info: dict) -> tuple[PreferencePairs, PreferencePairs]:
    """(train, heldout) preference pairs stored with a default pair (``info`` from `default_pair`)."""
    folder = Path(info["folder"])
    return (
        PreferencePairs.load(folder / "pairs_train.safetensors"),
        PreferencePairs.load(folder / "pairs_heldout.safetensors"),
    )
