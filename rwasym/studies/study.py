"""The pretraining-contrast study of issue #30 (pre-registered in ``docs/design/study.md``).

``rwasym experiment study --out docs/results/study`` runs, per family (gemma-3-270m, the pretrained-only
base; SmolLM2-135M-Instruct, the replication), resumable units into ``out/units/<name>.json``:

- ``corpora_<family>``: the rows of every shard (`rwasym.studies.corpora`) with their hashes;
- ``heal_<family>``: H = base + CE on the heal shard (embeddings, tied unembedding and norms frozen);
- ``train_<family>_<C>_s<seed>``: one condition from H — C1 CE on the train shard, C2 the same inputs with
  shuffled targets, C3 SFT and C4 DPO on the signature → first-sentence preference set;
- ``probe_<family>_<C>_s<seed>``: the probe of ΔW = W_C − W_H on the two held-out corpora (A docstrings,
  B man pages) with the pre-registered options.

Trained matrices (every registry matrix; nothing else moves) are kept as safetensors under
``model_dir/<family>/`` (default ``$RWASYM_CACHE/study``): a model is H's folder with them written in. A unit's
JSON is written when it finishes (atomically); a killed run resumes at the unit in flight. `study_report`
computes the endpoints from whatever units exist and labels what is missing.
"""

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import RwasymError
from .units import json_default, run_unit

__all__ = [
    "CONDITIONS",
    "FAMILIES",
    "StudyConfig",
    "baseline_summaries",
    "causal_rows",
    "e4",
    "endpoints",
    "seed_summaries",
    "study_experiment",
    "study_report",
]

FAMILIES = ("gemma", "smollm2")
CONDITIONS = ("C1", "C2", "C3", "C4")
SGD_CONDITIONS = {"C5ce": "C1", "C5dpo": "C4"}  # C5: the plain-SGD version of each
SUBSPACES = "activation,prediction,prediction_centered,prediction_fisher,activation_normalized"


@dataclass(frozen=True)
class StudyConfig:
    """What `study_experiment` runs; every default is the pre-registered design (docs/design/study.md)."""

    families: Sequence[str] = FAMILIES  # gemma (primary), smollm2 (replication)
    conditions: Sequence[str] = ("C1", "C2", "C4", "C3")  # run order within a seed
    seeds: Sequence[int] = (0, 1, 2, 3, 4)  # seeds of C1, C2, C4 (the endpoints' units)
    seeds_sft: Sequence[int] = (0, 1, 2)  # seeds of C3
    seq_len: int = 64  # tokens per row (BOS + one document window)
    batch_size: int = 8  # rows (CE) or pairs (SFT, DPO) per step
    steps: int = 120  # optimizer steps of every condition
    heal_steps: int = 150  # optimizer steps of the heal
    lr: float = 2e-5  # AdamW peak learning rate (every condition and the heal)
    warmup_steps: int = 10  # linear warmup, then cosine to 0.1 × lr
    beta: float = 0.1  # DPO β
    k: int = 16  # probe subspace dimension
    probe_rows: int = 256  # rows of each probe corpus (A: docstrings, B: man pages; held-out shards)
    eval_rows: int = 64  # rows of each corpus for the generic CE / KL of a condition
    collateral_rows: int = 64  # E4's collateral text: held-out man rows disjoint from probe corpus B
    eval_pairs: int | None = None  # held-out pairs scored per condition (None: all)
    null_samples: int = 20  # Haar draws per probe row (its percentile; the null's mean and std are exact)
    seeds_causal: Sequence[int] = (0, 1, 2)  # seeds of C4 whose E4 sweeps run
    causal_budget: float = 0.01  # E4: collateral KL of every edit (nats/token; tolerance 5%)
    causal_rank: int = 8  # E4: rank of every joint edit
    causal_controls: int = 19  # E4: random and orthogonal controls per target and seed (each family)
    seeds_sgd: Sequence[int] = (0,)  # seeds of C5 (C1 and C4 with plain SGD)
    sgd_lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # C5's learning-rate grid (the pilot picks one)
    sgd_pilot_steps: int = 10  # C5's pilot: ‖ΔW‖ after this many steps, SGD against AdamW
    n_layers: int | None = None  # a slice of the first blocks (smoke runs and tests): not the study
    model_dir: str | None = None  # where trained matrices go (default $RWASYM_CACHE/study)
    keep_matrices: bool = False  # keep every run's matrices (else those no later unit reads go after their probe)

    @classmethod
    def smoke(cls, **overrides: Any) -> "StudyConfig":
        """Two real blocks of SmolLM2, two seeds, a few steps: checks the pipeline, not results."""
        values = dict(
            families=("smollm2",),
            seeds=(0, 1),
            seeds_sft=(0,),
            steps=3,
            heal_steps=2,
            warmup_steps=1,
            lr=1e-4,
            k=4,
            probe_rows=24,
            eval_rows=8,
            collateral_rows=8,
            eval_pairs=16,
            null_samples=4,
            seeds_causal=(0,),
            causal_rank=2,
            causal_controls=2,
            sgd_lrs=(1e-3, 1e-2),
            sgd_pilot_steps=1,
            n_layers=2,
        )
        return cls(**{**values, **overrides})


# -- units ------------------------------------------------------------------------------------------
def _unit(out: Path, name: str, fn: Callable[[], dict], log: Any) -> dict:
    return run_unit(out, name, fn, log, tag="study", indent=1)


def study_units(config: StudyConfig) -> list[tuple[str, str, str | None, int | None]]:
    """The run order: (unit kind, family, condition, seed). Per family: corpora, heal, then seed by seed the
    conditions (C1, C2, C4, and C3 for its seeds) each followed by its probe; the baselines at H after the heal,
    the noise floors (seed 1 − seed 0) once the second seed's conditions exist; last, E4's causal sweeps of C4
    (``seeds_causal``)."""
    units: list[tuple[str, str, str | None, int | None]] = []
    for family in config.families:
        if family not in FAMILIES:
            raise RwasymError(f"family must be one of {FAMILIES}; got {family!r}")
        units += [("corpora", family, None, None), ("heal", family, None, None), ("baseline", family, None, None)]
        for seed in config.seeds:
            for cond in config.conditions:
                if cond not in CONDITIONS:
                    raise RwasymError(f"conditions must be among {CONDITIONS}; got {cond!r}")
                if cond == "C3" and seed not in config.seeds_sft:
                    continue
                units += [("train", family, cond, seed), ("probe", family, cond, seed)]
            if len(config.seeds) > 1 and seed == config.seeds[1]:  # the noise floor once two seeds exist
                for cond in config.conditions:
                    if cond != "C3" or set(config.seeds[:2]) <= set(config.seeds_sft):
                        units.append(("noise", family, cond, None))
        if "C4" in config.conditions:
            units += [("causal", family, "C4", seed) for seed in config.seeds_causal if seed in config.seeds]
        for seed in config.seeds_sgd:  # C5 (secondary): the learning-rate pilot, then SGD versions of C1 and C4
            units.append(("pilot", family, "C5", seed))
            for cond in SGD_CONDITIONS:
                units += [("train", family, cond, seed), ("probe", family, cond, seed)]
    return units


def _name(kind: str, family: str, cond: str | None, seed: int | None) -> str:
    return "_".join([kind, family] + ([cond] if cond is not None else []) + ([f"s{seed}"] if seed is not None else []))


# -- a family: its base folder, rows and pairs ------------------------------------------------------
class _Family:
    def __init__(self, name: str, cfg: StudyConfig, out: Path):
        from ..models.cache import cache_root
        from ..testing import gemma_model_folder, real_model_folder
        from . import corpora

        self.name, self.cfg, self.out = name, cfg, out
        self.folder = (gemma_model_folder if name == "gemma" else real_model_folder)(cfg.n_layers)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.pad = int(self.tokenizer.pad_token_id)
        self.model_dir = Path(cfg.model_dir) if cfg.model_dir else cache_root() / "study"
        self.model_dir = self.model_dir / f"{name}-{_cfg_tag(cfg)}"
        rows: dict[str, tuple[torch.Tensor, dict]] = {}
        for shard in ("heal", "train"):
            parts = [corpora.document_rows(self.tokenizer, corpora.documents(r, shard), cfg.seq_len) for r in REGS]
            rows[shard] = (torch.cat([p[0] for p in parts]), {r: p[1] for r, p in zip(REGS, parts)})
        for corpus, register in (("A", "docstring"), ("B", "man")):
            held, info = corpora.document_rows(self.tokenizer, corpora.documents(register, "heldout"), cfg.seq_len)
            pick = torch.linspace(0, len(held) - 1, cfg.probe_rows).round().long()
            rows[f"probe_{corpus}"] = (held[pick], {**info, "picked": cfg.probe_rows})
            rows[f"eval_{corpus}"] = (held[pick[:: max(1, cfg.probe_rows // cfg.eval_rows)][: cfg.eval_rows]], info)
            if corpus == "B":  # E4's collateral text: held-out man rows the probe never reads
                rest = torch.ones(len(held), dtype=torch.bool)
                rest[pick] = False
                others = held[rest]
                if len(others) < cfg.collateral_rows:
                    raise RwasymError(
                        f"{len(others)} held-out man rows outside the probe; {cfg.collateral_rows} needed"
                    )
                take = torch.linspace(0, len(others) - 1, cfg.collateral_rows).round().long()
                rows["collateral"] = (others[take], {**info, "picked": cfg.collateral_rows})
        self.rows = rows
        self._pairs: dict = {}

    def pairs(self, shard: str, seed: int):
        from ..data.pairs import load_pairs_jsonl
        from .corpora import preference_jsonl

        key = (shard, seed)
        if key not in self._pairs:
            path = self.model_dir / "pairs" / f"{shard}_s{seed}.jsonl"
            record = preference_jsonl(shard, seed, path)
            pairs = load_pairs_jsonl(path, self.tokenizer, max_length=self.cfg.seq_len)
            self._pairs[key] = (pairs, record)
        return self._pairs[key]

    def base(self):
        from ..models import load

        return load(self.folder, dtype=torch.float32)

    def matrices_path(self, tag: str) -> Path:
        return self.model_dir / f"{tag}.safetensors"

    def load_with(self, tag: str):
        """The base with the matrices saved under ``tag`` written in (H is ``heal``), regenerated first
        when the unit that trained them finished on another machine (`ensure`)."""
        from safetensors.torch import load_file

        model = self.base()
        for name, value in load_file(str(self.ensure(tag))).items():
            model.set_weight(name, value)
        return model

    def ensure(self, tag: str) -> Path:
        """The path of ``tag``'s matrices. Units keep only JSON; the matrices live outside the results folder
        (a cache, or a machine that is gone). When they are missing but their unit finished, the run is
        repeated from its recorded recipe (`_retrain`) and must reproduce the unit's recorded loss history
        (`REPRODUCE_RTOL`); each regeneration is logged in ``out/regenerated.jsonl``."""
        path = self.matrices_path(tag)
        if path.exists():
            return path
        unit = self.out / "units" / f"{_tag_unit(self.name, tag)}.json"
        if not unit.exists():
            raise RwasymError(f"{path} is missing and unit {unit.stem} has not run: run the study in order")
        _retrain(self, tag, json.loads(unit.read_text()))
        return path

    def save_matrices(self, model: Any, tag: str) -> dict:
        from safetensors.torch import save_file

        path = self.matrices_path(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {s.name: model.weight(s.name).float().contiguous() for s in model.matrices()}
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return {"path": str(path), "matrices": len(tensors)}


REGS = ("docstring", "man")


def _cfg_tag(cfg: StudyConfig) -> str:
    """Models of different training recipes never share a folder."""
    import hashlib

    keep = {k: v for k, v in asdict(cfg).items() if k not in ("families", "seeds", "seeds_sft", "model_dir", "k")}
    measured = ("probe_rows", "eval_rows", "eval_pairs", "null_samples", "collateral_rows")
    measured += ("seeds_causal", "causal_budget", "causal_rank", "causal_controls", "seeds_sgd", "sgd_lrs")
    measured += ("sgd_pilot_steps", "keep_matrices")  # C5's own recipe is recorded in its units
    keep = {k: v for k, v in keep.items() if k not in measured}
    keep.pop("conditions", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


# -- measurements shared by the units ---------------------------------------------------------------
@torch.no_grad()
def _generic(model: Any, reference: Any, tokens: torch.Tensor, pad: int, batch_size: int = 4) -> dict:
    """Pad-masked mean next-token CE of ``model`` and of ``reference``, and mean KL(model ‖ reference), over
    the real target positions of ``tokens`` (nats/token)."""
    ce = ce_ref = kl = 0.0
    count = 0
    for i in range(0, len(tokens), batch_size):
        x = tokens[i : i + batch_size]
        valid = x[:, 1:] != pad
        lp = torch.log_softmax(model.bridge(x)[:, :-1].float(), -1)[valid]
        lq = torch.log_softmax(reference.bridge(x)[:, :-1].float(), -1)[valid]
        y = x[:, 1:][valid]
        ce += float(F.nll_loss(lp, y, reduction="sum"))
        ce_ref += float(F.nll_loss(lq, y, reduction="sum"))
        kl += float((lp.exp() * (lp - lq)).sum())
        count += int(valid.sum())
    return {"ce": ce / count, "ce_reference": ce_ref / count, "kl": kl / count, "tokens": count}


def _pairs_eval(model: Any, reference: Any, pairs: Any, beta: float) -> dict:
    from ..objectives import pair_logprobs

    pc, pr = pair_logprobs(model, pairs, batch_size=8)
    rc, rr = pair_logprobs(reference, pairs, batch_size=8)
    margin = beta * ((pc - rc) - (pr - rr))
    return {
        "pairs": len(pairs),
        "accuracy": float((pc > pr).float().mean()),  # the model's own preference
        "accuracy_reference": float((rc > rr).float().mean()),
        "dpo_accuracy": float((margin > 0).float().mean()),  # the implicit reward margin against H
        "dpo_margin": float(margin.mean()),
    }


def _delta_norms(model: Any, reference: Any) -> dict:
    out: dict[str, float] = {}
    for spec in model.matrices():
        d = float((model.weight(spec.name) - reference.weight(spec.name)).square().sum())
        out[spec.kind] = out.get(spec.kind, 0.0) + d
    return {kind: v**0.5 for kind, v in out.items()}


# -- the units ----------------------------------------------------------------------------------------
def _corpora_unit(fam: _Family) -> dict:
    return {name: {**info, "shape": list(tokens.shape)} for name, (tokens, info) in fam.rows.items()}


def _recipe(cfg: StudyConfig, steps: int, seed: int) -> dict:
    """The one optimisation recipe of the heal and every condition (pre-registered): AdamW (0.9, 0.95), no decay,
    warmup then cosine to 0.1 × lr, clip 1.0, the registry's matrices only."""
    return dict(
        steps=steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        log_every=10,
        seed=seed,
        train="matrices",
    )


def _train_config(cfg: StudyConfig, steps: int, seed: int, **extra: Any):
    """The recipe as a CE `TrainConfig` (no checkpoints); ``extra`` adds fields or overrides the recipe's."""
    from ..train import TrainConfig

    return TrainConfig(**{**_recipe(cfg, steps, seed), "n_checkpoints": 0, **extra})


def _heal(fam: _Family, progress: bool) -> tuple[Any, Any, Any, list]:
    """H: the base after the heal (CE on the heal shard), saved; (H, base, config, history)."""
    from ..train import pretrain

    cfg = fam.cfg
    model, base = fam.base(), fam.base()
    tc = _train_config(cfg, cfg.heal_steps, 0, pad_id=fam.pad)
    result = pretrain(model, fam.rows["heal"][0], tc, progress=progress)
    return model, base, tc, result.history


def _heal_unit(fam: _Family, progress: bool) -> dict:
    model, base, tc, history = _heal(fam, progress)
    saved = fam.save_matrices(model, "heal")
    generic = {c: _generic(model, base, fam.rows[f"eval_{c}"][0], fam.pad) for c in ("A", "B")}
    return dict(config=asdict(tc), history=history, saved=saved, generic=generic, delta_norm=_delta_norms(model, base))


REPRODUCE_RTOL = 1e-4  # a regenerated run's losses against its unit's record (thread counts change rounding only)


def _tag_unit(family: str, tag: str) -> str:
    """The unit that trains the matrices saved under ``tag`` (``heal`` or ``<cond>_s<seed>``)."""
    if tag == "heal":
        return _name("heal", family, None, None)
    cond, seed = tag.rsplit("_s", 1)
    return _name("train", family, cond, int(seed))


def _retrain(fam: _Family, tag: str, unit: dict) -> None:
    """Repeat the run that saved ``tag`` (its unit ``unit`` finished earlier, its matrices are gone), save its
    matrices, and check its losses against the unit's recorded history; a run that does not reproduce raises
    (the later units would read a different model) and saves nothing."""
    if tag == "heal":
        model, _, _, history = _heal(fam, False)
    else:
        cond, seed = tag.rsplit("_s", 1)
        model, _, _, history, _ = _condition(fam, cond, int(seed), False)
    recorded = unit["history"]
    pairs = [(a["loss"], b["loss"]) for a, b in zip(recorded, history)]
    worst = max((abs(a - b) / max(abs(a), 1e-12) for a, b in pairs), default=math.inf)
    same = len(recorded) == len(history) and [a["step"] for a in recorded] == [b["step"] for b in history]
    record = dict(
        tag=tag, logged_steps=len(history), max_loss_rel_diff=worst, reproduced=same and worst <= REPRODUCE_RTOL
    )
    with open(fam.out / "regenerated.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not record["reproduced"]:
        raise RwasymError(
            f"regenerating {tag!r} did not reproduce its unit's loss history (max relative difference {worst:.3g}, "
            f"tolerance {REPRODUCE_RTOL}); delete units/{_tag_unit(fam.name, tag)}.json and the units after it "
            "to rerun them on this machine"
        )
    fam.save_matrices(model, tag)


def _run_condition(fam: _Family, cond: str, seed: int, steps: int, progress: bool, **optim: Any):
    """Train a copy of H under condition ``cond`` (C1–C4) for ``steps`` steps of the recipe, with ``optim``
    (optimizer, lr) overriding it: (model, H, config, history, record)."""
    from ..train import AlignConfig, align, pretrain

    cfg = fam.cfg
    model, healed = fam.load_with("heal"), fam.load_with("heal")
    record: dict[str, Any] = {}
    if cond in ("C1", "C2"):
        tc = _train_config(cfg, steps, seed, pad_id=fam.pad, shuffle_targets=cond == "C2", **optim)
        result = pretrain(model, fam.rows["train"][0], tc, progress=progress)
    else:
        pairs, record["pairs"] = fam.pairs("train", seed)
        objective = "sft" if cond == "C3" else "dpo"
        tc = AlignConfig(
            **{**_recipe(cfg, steps, seed), **optim}, objective=objective, beta=cfg.beta, checkpoint_every=0
        )
        result = align(model, None if cond == "C3" else healed, pairs, tc, progress=progress)
    return model, healed, tc, result.history, record


def _pilot_unit(fam: _Family, seed: int, progress: bool) -> dict:
    """C5's learning rate, fixed before its runs (docs/design/study.md): per objective (C1, C4), ‖ΔW‖_F over the
    trained matrices after ``sgd_pilot_steps`` steps of AdamW (the recipe) and of plain SGD at each rate of
    ``sgd_lrs``; the rate whose norm is closest in log to AdamW's is C5's."""
    cfg = fam.cfg
    out: dict[str, Any] = {}
    for sgd_cond, cond in SGD_CONDITIONS.items():
        norms: dict[str, float] = {}
        for label, optim in [("adamw", {})] + [(repr(lr), dict(optimizer="sgd", lr=lr)) for lr in cfg.sgd_lrs]:
            model, healed, *_ = _run_condition(fam, cond, seed, cfg.sgd_pilot_steps, False, **optim)
            norms[label] = math.sqrt(sum(v**2 for v in _delta_norms(model, healed).values()))
        sgd = {lr: norms[repr(lr)] for lr in cfg.sgd_lrs}
        chosen = min(sgd, key=lambda lr: (abs(math.log(sgd[lr]) - math.log(norms["adamw"])), lr))
        out[sgd_cond] = dict(condition=cond, adamw_norm=norms["adamw"], sgd_norms=sgd, lr=chosen)
    return dict(steps=cfg.sgd_pilot_steps, **out)


def _condition(fam: _Family, cond: str, seed: int, progress: bool):
    """Run ``cond`` (C1–C5) at ``seed`` for the recipe's steps: `_run_condition`'s tuple. C5 is the recipe with
    plain SGD at the rate its pilot unit chose."""
    optim: dict[str, Any] = {}
    if cond in SGD_CONDITIONS:
        pilot = json.loads((fam.out / "units" / f"{_name('pilot', fam.name, 'C5', seed)}.json").read_text())
        optim = dict(optimizer="sgd", lr=pilot[cond]["lr"])
    return _run_condition(fam, SGD_CONDITIONS.get(cond, cond), seed, fam.cfg.steps, progress, **optim)


def _train_unit(fam: _Family, cond: str, seed: int, progress: bool) -> dict:
    cfg = fam.cfg
    model, healed, tc, history, record = _condition(fam, cond, seed, progress)
    saved = fam.save_matrices(model, f"{cond}_s{seed}")
    held, held_record = fam.pairs("heldout", seed)
    if cfg.eval_pairs is not None:
        held = held.subset(torch.arange(min(cfg.eval_pairs, len(held))))
    return dict(
        config=asdict(tc),
        history=history,
        saved=saved,
        delta_norm=_delta_norms(model, healed),
        generic={c: _generic(model, healed, fam.rows[f"eval_{c}"][0], fam.pad) for c in ("A", "B")},
        heldout_pairs={**_pairs_eval(model, healed, held, cfg.beta), "record": held_record},
        **record,
    )


ROW_KEYS = (
    "matrix", "kind", "layer", "side", "subspace", "site", "n", "k", "fraction", "relative", "rho", "rho_null_std",
    "null_std", "k_variance", "relative_k_variance", "mean_fraction", "random_delta_relative", "delta_norm",
    "post_norm_scaled",
)  # fmt: skip


def _probe_rows(fam: _Family, healed: Any, tuned: Any, progress: bool, **kw: Any) -> dict:
    """The pre-registered probe of one delta on corpora A and B (compact rows, curves, token counts)."""
    from ..analyses.probe import probe

    out: dict[str, Any] = {}
    for corpus in ("A", "B"):
        result = probe(
            healed,
            tuned,
            fam.rows[f"probe_{corpus}"][0],
            k=fam.cfg.k,
            heads=False,
            null_samples=fam.cfg.null_samples,
            subspaces=SUBSPACES,
            exclude_positions=[0],
            exclude_tokens=[fam.pad],
            progress=progress,
            **kw,
        )
        out[corpus] = dict(
            rows=[{k: r.get(k) for k in ROW_KEYS} for r in result.rows],
            curves=result.curves,
            n_tokens=result.config.get("n_tokens"),
            delta=result.config.get("delta"),
        )
    return out


def _needed_later(cfg: StudyConfig, cond: str, seed: int) -> bool:
    """Whether a later unit reads the matrices of (cond, seed): the noise floors (the first two seeds) and E4 (C4)."""
    return cfg.keep_matrices or seed in list(cfg.seeds)[:2] or (cond == "C4" and seed in cfg.seeds_causal)


def _probe_unit(fam: _Family, cond: str, seed: int, progress: bool) -> dict:
    import hashlib

    from safetensors.torch import load_file

    healed = fam.load_with("heal")
    path = fam.ensure(f"{cond}_s{seed}")
    tuned = load_file(str(path))
    deltas = {name: tuned[name].double() - healed.weight(name) for name in tuned}
    out = _probe_rows(fam, healed, None, progress, delta="given", deltas=deltas)
    out["matrices_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if not _needed_later(fam.cfg, cond, seed):  # disk: a regenerable intermediate (rerun its train unit)
        path.unlink()
        out["matrices_deleted"] = True
    return out


def _baseline_unit(fam: _Family, progress: bool) -> dict:
    """The probe's reference rows at H: W_H itself (how pretraining and the heal left each matrix) and one draw
    of the gradient-shaped random update Σ_t ξ_t a_tᵀ (what the inputs alone impose)."""
    healed = fam.load_with("heal")
    return {delta: _probe_rows(fam, healed, None, progress, delta=delta) for delta in ("base_weight", "random_delta")}


def _noise_unit(fam: _Family, cond: str, progress: bool) -> dict:
    """The seed-to-seed noise floor of one condition: W(seed 1) − W(seed 0), probed like a ΔW."""
    healed = fam.load_with("heal")
    first, second = fam.load_with(f"{cond}_s0"), fam.load_with(f"{cond}_s1")
    return _probe_rows(fam, healed, first, progress, delta="noise_floor", replicate=second)


E4_SETS = {  # set: (matrices, target) — docs/design/study.md, E4
    "read": ("blocks.*.attn.W_Q+blocks.*.attn.W_K", "pca"),
    "write": ("blocks.*.attn.W_O+blocks.*.mlp.W_out", "prediction"),
}
CAUSAL_KEYS = (
    "id", "matrix", "head", "mode", "seed", "direction", "index", "target", "matched_to", "rank", "kl_budget",
    "alpha", "edit_norm", "collateral_kl", "collateral_dce", "calibration_evals", "budget_reached", "saturated",
    "margin", "accuracy", "reward_accuracy", "gap_margin", "gap_accuracy", "gap_reward_accuracy",
)  # fmt: skip


def _causal_unit(fam: _Family, seed: int, progress: bool) -> dict:
    """E4 for one seed of C4: per set, the effect-matched joint transplant sweep (`rwasym.sweep`, rank
    ``causal_rank`` at collateral KL ``causal_budget``, target plus ``causal_controls`` random and orthogonal
    controls, the set's ceiling), frames from the train-shard docstring rows (BOS and padding left out, as in
    the probe), cost on the collateral text, behaviour from the pairs' responses only (no text metrics); the
    sweep file is resumable row by row."""
    from ..analyses.sweep import read_sweep, sweep
    from . import corpora

    cfg = fam.cfg
    healed, tuned = fam.load_with("heal"), fam.load_with(f"C4_s{seed}")
    held, record = fam.pairs("heldout", seed)
    if cfg.eval_pairs is not None:
        held = held.subset(torch.arange(min(cfg.eval_pairs, len(held))))
    frames, frames_info = corpora.document_rows(fam.tokenizer, corpora.documents("docstring", "train"), cfg.seq_len)
    collateral = fam.rows["collateral"][0]
    n = cfg.causal_controls
    out: dict[str, Any] = dict(pairs=record, frames=frames_info, sets={})
    for set_name, (matrices, target) in E4_SETS.items():
        path = fam.out / "sweeps" / f"causal_{fam.name}_C4_s{seed}_{set_name}.jsonl"
        rows = sweep(
            healed,
            tuned,
            held,
            out=path,
            joint=True,
            matrices=(matrices,),
            ranks=(cfg.causal_rank,),
            directions=f"{target}:1,random:{n},orthogonal:{n}",
            match="kl",
            kl_budgets=(cfg.causal_budget,),
            kl_rtol=0.05,
            mode="transplant",
            seed=seed,
            beta=cfg.beta,
            edits_per_pass=4,
            text_metrics=False,  # the endpoint reads the margin; the text's ce / kl would cost most of each pass
            data={"input_ids": frames, "attention_mask": frames != fam.pad},
            exclude_positions=(0,),
            collateral={"input_ids": collateral, "attention_mask": collateral != fam.pad},
            progress=progress,
        )
        header, _ = read_sweep(path)
        out["sets"][set_name] = dict(
            file=path.name,
            reference=None if header is None else header["reference"],
            rows=[{k: r.get(k) for k in CAUSAL_KEYS} for r in rows],
        )
    return out


# -- the experiment ---------------------------------------------------------------------------------
def study_experiment(
    out: str | os.PathLike,
    config: StudyConfig = StudyConfig(),
    *,
    only: Sequence[str] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run the study's units in order (`study_units`), skipping those already written; ``only`` restricts to
    unit names starting with one of its prefixes. Returns the names of the units that exist afterwards."""
    out = Path(out)
    (out / "units").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
    show = progress is not False
    families: dict[str, _Family] = {}
    done = []
    for kind, family, cond, seed in study_units(config):
        name = _name(kind, family, cond, seed)
        if only is not None and not any(name.startswith(p) for p in only):
            continue
        if family not in families:
            families[family] = _Family(family, config, out)
        fam = families[family]
        work = {
            "corpora": lambda fam=fam: _corpora_unit(fam),
            "heal": lambda fam=fam: _heal_unit(fam, show),
            "train": lambda fam=fam, cond=cond, seed=seed: _train_unit(fam, str(cond), int(seed or 0), show),
            "probe": lambda fam=fam, cond=cond, seed=seed: _probe_unit(fam, str(cond), int(seed or 0), show),
            "baseline": lambda fam=fam: _baseline_unit(fam, show),
            "noise": lambda fam=fam, cond=cond: _noise_unit(fam, str(cond), show),
            "causal": lambda fam=fam, seed=seed: _causal_unit(fam, int(seed or 0), show),
            "pilot": lambda fam=fam, seed=seed: _pilot_unit(fam, int(seed or 0), show),
        }[kind]
        _unit(out, name, work, log)
        done.append(name)
    return done


# -- the endpoints (docs/design/study.md) -------------------------------------------------------------
READ_KINDS, WRITE_KINDS = ("W_Q", "W_K"), ("W_O", "W_out")
MARGIN = math.log(1.5)  # the pre-registered equivalence margin on log R
PRIMARY = ("E1", "E2", "E3", "E4")


def _log_r(rows: Sequence[dict], kinds: Sequence[str], side: str, subspace: str) -> float | None:
    """Mean over layers and ``kinds`` of log r (the log of the geometric mean R), or None without rows."""
    logs = [
        math.log(r["relative"]) for r in rows if r["kind"] in kinds and r["side"] == side and r["subspace"] == subspace
    ]
    return sum(logs) / len(logs) if logs else None


def seed_summaries(out: str | os.PathLike) -> list[dict]:
    """Per finished probe unit (family, condition, seed): log R_read on corpora A and B (W_Q, W_K input side
    against the activation subspace), log R_write (W_O, W_out output side against the prediction subspace;
    its centred and Fisher variants), and the asymmetry A = log R_read(A) − log R_write."""
    out = Path(out)
    rows = []
    for path in sorted((out / "units").glob("probe_*.json")):
        _, family, cond, seed = path.stem.split("_")
        unit = json.loads(path.read_text())
        a, b = unit["A"]["rows"], unit["B"]["rows"]
        rec: dict[str, Any] = dict(family=family, condition=cond, seed=int(seed[1:]))
        rec["read_A"] = _log_r(a, READ_KINDS, "input", "activation")
        rec["read_B"] = _log_r(b, READ_KINDS, "input", "activation")
        rec["write"] = _log_r(a, WRITE_KINDS, "output", "prediction")
        rec["write_centered"] = _log_r(a, WRITE_KINDS, "output", "prediction_centered")
        rec["write_fisher_A"] = _log_r(a, WRITE_KINDS, "output", "prediction_fisher")
        rec["write_fisher_B"] = _log_r(b, WRITE_KINDS, "output", "prediction_fisher")
        rec["write_activation_A"] = _log_r(a, WRITE_KINDS, "output", "activation")
        rec["read_prediction"] = _log_r(a, READ_KINDS, "input", "prediction")
        rec["asymmetry"] = None if rec["read_A"] is None or rec["write"] is None else rec["read_A"] - rec["write"]
        rows.append(rec)
    return rows


def _cells(a: Sequence[dict], b: Sequence[dict]) -> dict[str, float | None]:
    return dict(
        read_A=_log_r(a, READ_KINDS, "input", "activation"),
        read_B=_log_r(b, READ_KINDS, "input", "activation"),
        write=_log_r(a, WRITE_KINDS, "output", "prediction"),
    )


def baseline_summaries(out: str | os.PathLike) -> list[dict]:
    """log R_read (A, B) and log R_write of the reference rows: W_H itself, the gradient-shaped random update
    and each condition's seed-to-seed noise floor (seed 1 − seed 0)."""
    out = Path(out)
    rows = []
    for path in sorted((out / "units").glob("baseline_*.json")):
        unit = json.loads(path.read_text())
        for delta in ("base_weight", "random_delta"):
            rows.append(
                dict(
                    family=path.stem.split("_")[1],
                    reference=delta,
                    **_cells(unit[delta]["A"]["rows"], unit[delta]["B"]["rows"]),
                )
            )
    for path in sorted((out / "units").glob("noise_*.json")):
        _, family, cond = path.stem.split("_")
        unit = json.loads(path.read_text())
        rows.append(
            dict(family=family, reference=f"noise floor {cond}", **_cells(unit["A"]["rows"], unit["B"]["rows"]))
        )
    return rows


def _paired(summ: Sequence[dict], family: str, key: str, c1: str, c2: str) -> list[float]:
    """Per seed with both conditions: value(c1) − value(c2)."""
    by = {(r["condition"], r["seed"]): r[key] for r in summ if r["family"] == family and r[key] is not None}
    return [by[(c1, s)] - by[(c2, s)] for (c, s) in sorted(by) if c == c1 and (c2, s) in by]


def _values(summ: Sequence[dict], family: str, key: str, cond: str) -> list[float]:
    return [r[key] for r in summ if r["family"] == family and r["condition"] == cond and r[key] is not None]


def _test(kind: str, values: Sequence[float], label: str) -> dict:
    """One component test, or a record of why it could not run (fewer than two seeds, no spread)."""
    from ..math.inference import one_sample_t, tost

    try:
        res = one_sample_t(values) if kind == "greater" else tost(values, MARGIN)
    except RwasymError as err:
        return dict(test=label, kind=kind, n=len(values), p=None, note=str(err))
    return dict(test=label, kind=kind, **res)


def _combine(parts: list[dict]) -> float | None:
    """Intersection–union: every component must hold, so the endpoint's p is the largest component p."""
    ps = [t["p"] for t in parts]
    return None if not ps or any(p is None for p in ps) else max(ps)


def endpoints(summ: Sequence[dict], family: str, causal: Sequence[dict] | None = None) -> dict[str, dict]:
    """E1–E3 of one family from per-seed summaries, E4 from the causal sweeps' rows (`e4`). Each endpoint: its
    component tests, its p (the largest component p: all must hold) and the statistics its falsification
    rule reads."""
    e: dict[str, dict] = {}
    d14 = _paired(summ, family, "write", "C1", "C4")
    d42 = _paired(summ, family, "write", "C4", "C2")
    parts = [_test("greater", d14, "log R_write(C1) − log R_write(C4) > 0"), _test("tost", d42, "C4 ≈ C2 (write)")]
    e["E1"] = dict(parts=parts, p=_combine(parts), mean_difference=_mean(d14))
    parts = []
    for corpus in ("A", "B"):
        for cond in ("C1", "C2", "C4"):
            parts.append(
                _test("greater", _values(summ, family, f"read_{corpus}", cond), f"log R_read({cond}, {corpus}) > 0")
            )
        for other in ("C1", "C2"):
            d = _paired(summ, family, f"read_{corpus}", "C4", other)
            parts.append(_test("tost", d, f"C4 ≈ {other} (read, {corpus})"))
    e["E2"] = dict(parts=parts, p=_combine(parts))
    d_asym = _paired(summ, family, "asymmetry", "C4", "C1")
    parts = [_test("greater", d_asym, "A(C4) − A(C1) > 0")]
    e["E3"] = dict(parts=parts, p=_combine(parts), mean_difference=_mean(d_asym))
    e["E4"] = e4(causal or [], family)
    return e


def causal_rows(out: str | os.PathLike) -> list[dict]:
    """Every row of the finished E4 units, with its family and set."""
    rows = []
    for path in sorted((Path(out) / "units").glob("causal_*.json")):
        family = path.stem.split("_")[1]
        for set_name, part in json.loads(path.read_text())["sets"].items():
            rows += [dict(r, family=family, set=set_name) for r in part["rows"]]
    return rows


def e4(rows: Sequence[dict], family: str) -> dict:
    """E4 of one family: per set (read, write) and control family (random, orthogonal), the stratified exact
    rank test of the target's gap_margin above its matched controls over the seeds (`summarize`; strata =
    seeds); E4's p is the largest of the four. ``mean_rank_p``: the mean within-seed rank p of the target
    (0.5 or more = at or below the controls' median, what the falsification rule reads)."""
    from ..analyses.sweep import summarize

    edits = [r for r in rows if r["family"] == family and r["direction"] != "ceiling"]
    if not edits:
        return dict(parts=[], p=None, note="the causal sweeps on C4 have not run")
    parts, rank_ps = [], []
    for set_name in E4_SETS:
        members = [r for r in edits if r["set"] == set_name]
        summary = summarize(members, metrics=["gap_margin"]).rows if members else []
        for control in ("random", "orthogonal"):
            row = next((r for r in summary if r["control"] == control), None)
            label = f"{set_name}: target above its {control} controls"
            if row is None or row["p_value"] is None:
                parts.append(dict(test=label, kind="rank", n=0, p=None))
                continue
            ranks = [s["rank_p"] for s in row["strata"]]
            rank_ps += ranks
            parts.append(
                dict(test=label, kind="rank", n=row["n_strata"], p=row["p_value"], p_floor=row["p_floor"], rank_p=ranks)
            )
    # the part of each edit a zero post-norm scale made unreachable (docs/design/study.md, Changes), per set
    unreachable = {}
    for set_name in E4_SETS:
        lost = [r for r in edits if r["set"] == set_name and r.get("post_norm_unreachable") is not None]
        if lost:
            targets = [r["post_norm_unreachable"] for r in lost if r["direction"] == r["target"]]
            controls = [r["post_norm_unreachable"] for r in lost if r["direction"] != r["target"]]
            unreachable[set_name] = dict(
                target_mean=_mean(targets),
                control_mean=_mean(controls),
                max=max(r["post_norm_unreachable"] for r in lost),
            )
    return dict(parts=parts, p=_combine(parts), mean_rank_p=_mean(rank_ps), post_norm_unreachable=unreachable)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def study_report(out: str | os.PathLike) -> dict:
    """Endpoints of every family with finished units, Holm over the pre-registered family of 8 primary tests
    (E1–E4 × 2 families; while tests are missing the adjustment is labelled provisional and counts the missing
    ones at p = 1, which can only make it more conservative), verdicts, and the per-seed table. Writes
    ``results.json`` and ``report.md`` into ``out``."""
    from ..math.inference import holm, seed_interval

    out = Path(out)
    summ = seed_summaries(out)
    causal = causal_rows(out)
    families = [f for f in FAMILIES if any(r["family"] == f for r in summ)]
    results: dict[str, Any] = dict(
        seed_summaries=summ, endpoints={}, units=sorted(p.stem for p in (out / "units").glob("*.json"))
    )
    keys, ps = [], []
    for family in FAMILIES:
        e = (
            endpoints(summ, family, causal)
            if family in families
            else {name: dict(parts=[], p=None) for name in PRIMARY}
        )
        results["endpoints"][family] = e
        for name in PRIMARY:
            keys.append((family, name))
            ps.append(e[name]["p"])
    missing = sum(p is None for p in ps)
    adjusted = holm([1.0 if p is None else p for p in ps])
    for (family, name), p, adj in zip(keys, ps, adjusted):
        rec = results["endpoints"][family][name]
        rec["p_holm"] = None if p is None else adj
        rec["verdict"] = "pending" if p is None else ("supported" if adj < 0.05 else "not supported")
    results["holm"] = dict(tests=len(ps), missing=missing, provisional=missing > 0)
    table = {}
    for family in families:
        for cond in (*CONDITIONS, *SGD_CONDITIONS):
            for key in ("read_A", "read_B", "write", "asymmetry"):
                vals = _values(summ, family, key, cond)
                if vals:
                    table[f"{family}/{cond}/{key}"] = seed_interval(vals)
    results["intervals"] = table
    results["baselines"] = baseline_summaries(out)
    results["heal"] = {
        path.stem.removeprefix("heal_"): {k: v for k, v in json.loads(path.read_text()).items() if k != "history"}
        for path in sorted((out / "units").glob("heal_*.json"))
    }
    results["sgd_pilot"] = {
        path.stem.removeprefix("pilot_"): json.loads(path.read_text())
        for path in sorted((out / "units").glob("pilot_*.json"))
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=json_default))
    (out / "report.md").write_text(_markdown(results))
    return results


def _fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _markdown(results: dict) -> str:
    lines = [
        "# The pretraining-contrast study (issue #30): results so far",
        "",
        "Pre-registered in `docs/design/study.md` before any run. Seeds are the unit; log R is the mean over layers",
        "and kinds of log r (r = f·n/k, k = 16). Read: W_Q, W_K against the activation PCA of corpus A",
        "(held-out docstrings) or B (held-out man pages); write: W_O, W_out against the prediction subspace.",
        "",
        f"Holm over {results['holm']['tests']} primary tests"
        + (
            f" — **provisional**: {results['holm']['missing']} not yet run, counted at p = 1."
            if results["holm"]["provisional"]
            else "."
        ),
        "",
        "| family | endpoint | p | Holm p | verdict | components (p) |",
        "|---|---|---|---|---|---|",
    ]
    for family, eps in results["endpoints"].items():
        for name, rec in eps.items():
            comps = "; ".join(f"{t['test']}: {_fmt(t['p'])} (n {t['n']})" for t in rec.get("parts", []))
            cells = [family, name, _fmt(rec["p"]), _fmt(rec["p_holm"]), rec["verdict"], comps or rec.get("note", "")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per condition: mean over seeds [95% t-interval] of log R",
        "",
        "| family / condition / value | n | mean | interval |",
        "|---|---|---|---|",
    ]
    for key, iv in results["intervals"].items():
        lines.append(f"| {key} | {iv['n']} | {_fmt(iv['mean'])} | [{_fmt(iv['ci_low'])}, {_fmt(iv['ci_high'])}] |")
    lines += ["", "## The heal (H = base + CE on the heal shard; held-out text, nats/token)", ""]
    lines += ["| family | corpus | CE base | CE H | KL(H ‖ base) | steps | seconds |", "|---|---|---|---|---|---|---|"]
    for family, heal in results.get("heal", {}).items():
        for corpus, g in heal["generic"].items():
            cells = [
                family,
                corpus,
                _fmt(g["ce_reference"]),
                _fmt(g["ce"]),
                _fmt(g["kl"]),
                str(heal["config"]["steps"]),
            ]
            lines.append("| " + " | ".join([*cells, f"{heal['seconds']:.0f}"]) + " |")
    lines += [
        "",
        "## References at H (log R; one draw or one seed pair each)",
        "",
        "| family | reference | read A | read B | write |",
        "|---|---|---|---|---|",
    ]
    for r in results.get("baselines", []):
        lines.append(
            f"| {r['family']} | {r['reference']} | {_fmt(r['read_A'])} | {_fmt(r['read_B'])} | {_fmt(r['write'])} |"
        )
    if results.get("sgd_pilot"):
        lines += ["", "## C5's learning rate (pilot: ‖ΔW‖_F after the first steps, SGD against AdamW)", ""]
        lines += ["| family / seed | condition | steps | AdamW ‖ΔW‖ | SGD ‖ΔW‖ per rate | chosen rate |"]
        lines += ["|---|---|---|---|---|---|"]
        for key, pilot in results["sgd_pilot"].items():
            for cond in SGD_CONDITIONS:
                if cond in pilot:
                    p = pilot[cond]
                    grid = ", ".join(f"{lr}: {_fmt(v)}" for lr, v in p["sgd_norms"].items())
                    cells = [key, cond, str(pilot["steps"]), _fmt(p["adamw_norm"]), grid, _fmt(p["lr"])]
                    lines.append("| " + " | ".join(cells) + " |")
    lost = {f: eps["E4"].get("post_norm_unreachable") or {} for f, eps in results["endpoints"].items()}
    if any(lost.values()):
        lines += ["", "## E4: the part of each edit zero post-norm scales made unreachable (fraction of ‖E‖²)", ""]
        lines += ["| family | set | targets (mean) | controls (mean) | max |", "|---|---|---|---|---|"]
        for family, sets in lost.items():
            for set_name, u in sets.items():
                cells = [family, set_name, _fmt(u["target_mean"]), _fmt(u["control_mean"]), _fmt(u["max"])]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Units finished: {len(results['units'])}.", ""]
    return "\n".join(lines)
