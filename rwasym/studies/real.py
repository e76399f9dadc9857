"""The paper's experiments on the real pair (SmolLM2-135M-Instruct + DPO), over alignment seeds.

``rwasym experiment real --out docs/results/real`` runs every part below on the real pair of each
seed (`rwasym.studies.real_pair`: built on first use, about 4 minutes a seed on 2 cores, then
cached) and writes ``results.json``, ``report.md`` and figures to ``out``. Every unit of work — a
(part, seed, …) — is written to ``out/units/<name>.json`` when it finishes, and the joint sweeps
append their rows to ``out/sweeps/*.jsonl`` as they go, so a killed run resumes where it stopped;
``--parts`` runs some parts, and the report is rebuilt from whatever units exist. Probes read the
base's activations on the task's own text (`real_corpus`); behaviour is measured on the held-out
pairs (words never seen in training).

- ``asymmetry``: the probe table (read / write × activation / prediction, per kind) at each k of
  ``ks`` and at the 90%-variance k, the depth profile (r per layer and kind) and the per-head spread.
- ``graded``: L_λ = λ·DPO + (1 − λ)·CE(chosen) at the DPO run's steps, learning rate and seed for
  each λ (λ = 0 is the CE, "pretraining-like", contrast); λ = 1 is the seed's DPO run itself, which
  the graded objective reproduces bit for bit (tested). Per λ the asymmetry summary, ‖ΔW‖ and the
  held-out accuracy and margin; slopes of each cell against λ.
- ``mechanism``: gradient anisotropy of the base under CE(chosen) and DPO on the same batches —
  spikiness of C_a and C_δ and the relative fraction of G = Σ δ aᵀ against the read (PCA of C_a)
  and the prediction subspaces (`rwasym.analyses.anisotropy`).
- ``trajectory``: every checkpoint of the seed's DPO run probed against the base (r and ‖ΔW‖).
- ``joint``: joint closed-form edits (`rwasym.analyses.joint`) of every layer's W_Q, every read and
  every write matrix, rank 1 and rank ``rank``, transplanted into the base and ablated from the
  tuned model, against per-matrix controls matched in norm and, separately, in output energy; the
  fraction of the base → tuned gap in held-out accuracy and margin moved, per seed and pooled over
  seeds (bootstrap CI, permutation p); and an α scan on the first seed.
- ``companion``: post-training SVD (σ ratios, R_U / R_V consistency, the rebuild experiment with
  its held-out accuracy and CE) and RankMe / α-ReQ of resid_post per layer, base and tuned.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RwasymError
from .experiments import paper_side
from .units import run_unit

__all__ = ["PARTS", "RealConfig", "real_experiment", "real_report"]

PARTS = ("asymmetry", "trajectory", "mechanism", "joint", "companion", "graded", "curves", "baselines")  # run order
CELLS = ("read_activation", "read_prediction", "write_activation", "write_prediction")
PAPER_CELLS = tuple(f"paper_{c}" for c in CELLS)  # read = W_Q, W_K; write = W_O, W_out (experiments.PAPER_GROUPS)
GAP_METRICS = ("gap_accuracy", "gap_margin", "kl_base", "kl_tuned")


@dataclass(frozen=True)
class RealConfig:
    """What `real_experiment` runs (every default is what ``docs/results/real`` was made with)."""

    seeds: Sequence[int] = (0, 1, 2)  # alignment seeds: each its own word split, pairs and DPO run
    ks: Sequence[int] = (8, 16)  # probe subspace dimensions (the 90%-variance k is reported beside)
    null_samples: int = 50  # Haar null draws per probe row
    lams: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)  # graded-objective λ (0 = CE contrast, 1 = DPO)
    grad_batches: int = 4  # mechanism: batches of the training pairs
    grad_batch_size: int = 16  # mechanism: pairs per batch
    joint_sets: Sequence[str] = ("blocks.*.attn.W_Q", "read", "write")  # joint: matrix sets
    joint_ranks: Sequence[int] = (1, 8)  # joint: edit ranks
    joint_directions: str = "pca:1,prediction:1,random:4,orthogonal:4"  # joint: target + controls per cell
    joint_matches: Sequence[str] = ("output", "norm")  # joint: control matching rules (one sweep each)
    joint_modes: Sequence[str] = ("transplant", "ablate")  # joint: into the base / out of the tuned model
    alpha_scan: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)  # joint α scan (first seed, rank-8 transplant)
    max_pairs: int = 64  # held-out pairs per behavioural measurement (of 128)
    quick: bool = False  # the quick pair (2 real blocks, 3 alignment steps): a smoke test, not results

    @classmethod
    def smoke(cls, **overrides: Any) -> "RealConfig":
        """The quick pair with tiny budgets (``rwasym experiment real --quick``)."""
        values = dict(
            seeds=(0,),
            ks=(4,),
            null_samples=4,
            lams=(0.0, 1.0),
            grad_batches=1,
            grad_batch_size=4,
            joint_sets=("blocks.*.attn.W_Q", "write"),
            joint_ranks=(1, 2),
            joint_directions="pca:1,prediction:1,random:2,orthogonal:1",
            joint_matches=("output",),
            alpha_scan=(1.0, 2.0),
            max_pairs=8,
            quick=True,
        )
        return cls(**{**values, **overrides})


# -- units: one resumable piece of work each (`rwasym.studies.units`) ----------------------------
def _unit(out: Path, name: str, fn: Callable[[], dict], log: Any) -> dict:
    return run_unit(out, name, fn, log, tag="real")


class _Seed:
    """The real pair of one seed and what every part shares: pairs, corpus, base activations."""

    def __init__(self, seed: int, quick: bool, cache_dir: Any, progress: bool | None):
        from .real_pair import load_real_pairs, real_corpus, real_pair

        self.seed = seed
        self.base, self.tuned, self.info = real_pair(cache_dir, quick=quick, progress=progress is not False, seed=seed)
        self.train, self.held = load_real_pairs(self.info)
        self.data = real_corpus(self.info, self.base.tokenizer)
        self._acts = None

    @property
    def acts(self):
        if self._acts is None:
            from .experiments import base_activations

            self._acts = base_activations(self.base, self.data)
        return self._acts


def _margin(model: Any, base_logps: tuple, pairs: Any, beta: float) -> float:
    from ..objectives import pair_logprobs

    lc, lr = pair_logprobs(model, pairs)
    return float((beta * ((lc - base_logps[0]) - (lr - base_logps[1]))).mean())


def _whole(rows: list[dict]) -> list[dict]:
    keep = (
        "layer",
        "matrix",
        "kind",
        "matrix_side",
        "subspace",
        "k",
        "n",
        "relative",
        "null_percentile",
        "k_variance",
        "relative_k_variance",
        "delta_norm",
    )
    return [{k: r.get(k) for k in keep} for r in rows if r["head"] is None and r["stream"] == "residual"]


def _asymmetry(s: _Seed, cfg: RealConfig) -> dict:
    from ..analyses.probe import probe

    out: dict = {"by_k": {}}
    for i, k in enumerate(cfg.ks):
        result = probe(
            s.base,
            s.tuned,
            activations=s.acts,
            k=k,
            null_samples=cfg.null_samples,
            heads=i == 0,
            curves=False,
            seed=s.seed,
            progress=False,
        )
        out["by_k"][str(k)] = _whole(result.rows)
        if i == 0:
            heads = [r for r in result.rows if r["head"] is not None and r["stream"] == "residual"]
            spread = {}
            for key in sorted({(r["kind"], r["subspace"]) for r in heads}):
                vals = torch.tensor(
                    [r["relative"] for r in heads if (r["kind"], r["subspace"]) == key], dtype=torch.float64
                )
                spread[f"{key[0]}/{key[1]}"] = dict(
                    n=len(vals),
                    mean=float(vals.mean()),
                    std=float(vals.std()),
                    min=float(vals.min()),
                    max=float(vals.max()),
                    q10=float(vals.quantile(0.1)),
                    q90=float(vals.quantile(0.9)),
                )
            out["head_spread"] = spread
    return out


def _graded(s: _Seed, cfg: RealConfig, lam: float) -> dict:
    from dataclasses import replace

    from ..analyses.probe import probe
    from ..models import weight_deltas
    from ..objectives import pair_logprobs, preference_accuracy
    from ..train.loops import AlignConfig, align
    from .experiments import asymmetry_summary, clone

    spec = s.info["spec"]["align"]
    if lam == 1.0:  # L_1 = DPO exactly: the seed's DPO run is the λ = 1 run (tests/test_train.py)
        tuned, source = s.tuned, "dpo run"
    else:
        tuned, source = clone(s.base), "trained"
        config = replace(
            AlignConfig(**{**spec, "betas": tuple(spec["betas"])}),
            objective="graded",
            lam=float(lam),
            checkpoint_every=0,
        )
        align(tuned, s.base, s.train, config, progress=False)
    result = probe(
        s.base,
        tuned,
        activations=s.acts,
        k=cfg.ks[0],
        null_samples=cfg.null_samples,
        heads=False,
        curves=False,
        seed=s.seed,
        progress=False,
    )
    base_logps = pair_logprobs(s.base, s.held)
    norm = sum(float(d.square().sum()) for d in weight_deltas(s.base, tuned).values()) ** 0.5
    return dict(
        seed=s.seed,
        lam=float(lam),
        source=source,
        **asymmetry_summary(result),
        by_kind=result.table(),
        delta_norm=norm,
        heldout_accuracy=preference_accuracy(tuned, None, s.held),
        heldout_margin=_margin(tuned, base_logps, s.held, spec["beta"]),
    )


def _mechanism(s: _Seed, cfg: RealConfig) -> dict:
    from ..analyses.anisotropy import anisotropy_report
    from ..hooks.gradients import capture_gradients
    from ..objectives import objective_batches

    out = {}
    for objective in ("sft", "dpo"):  # CE on the chosen completions versus DPO, same batches
        loss_fn, batches = objective_batches(
            objective,
            s.train,
            reference=s.base,
            batch_size=cfg.grad_batch_size,
            n_batches=cfg.grad_batches,
            beta=s.info["spec"]["align"]["beta"],
        )
        stats = capture_gradients(s.base, loss_fn, batches, progress=False)
        # center=False: the committed Mechanism table was computed on the uncentred Σ a aᵀ, Σ δ δᵀ (rows carry both)
        out["ce" if objective == "sft" else "dpo"] = anisotropy_report(s.base, stats, k=cfg.ks[0], center=False)
    return out


def _curves(s: _Seed, cfg: RealConfig) -> dict:
    """r(k) of every whole matrix on the residual-stream side at every k of the log grid, with the exact Haar
    null's std of r (the probe's curves; null mean exactly 1)."""
    from ..analyses.probe import probe

    result = probe(
        s.base,
        s.tuned,
        activations=s.acts,
        k=cfg.ks[0],
        null_samples=0,
        heads=False,
        curves=True,
        curve_null_samples=64,
        seed=s.seed,
        progress=False,
    )
    keep = ("matrix", "kind", "layer", "subspace", "n", "ks", "relative", "null_relative_std")
    return {"curves": [{k: c[k] for k in keep} for c in result.curves if c["stream"] == "residual"]}


def _curves_report(out: Path, units: list[dict]) -> tuple[dict, list[str]]:
    """Mean r(k) per kind and subspace over its matrices, then over seeds [95% t-interval]; two figures."""
    from .. import report

    per_seed: dict = {}  # (subspace, kind, k) -> [mean over the kind's matrices, one per seed]
    for u in units:
        cells: dict = {}
        for c in u["curves"]:
            for k, r in zip(c["ks"], c["relative"]):
                cells.setdefault((c["subspace"], c["kind"], k), []).append(r)
        for key, vals in cells.items():
            per_seed.setdefault(key, []).append(sum(vals) / len(vals))
    rows = [dict(subspace=sub, kind=kind, k=k, **_interval(v)) for (sub, kind, k), v in sorted(per_seed.items())]
    for sub in ("activation", "prediction"):
        report.line_plot(
            [r for r in rows if r["subspace"] == sub],
            "k",
            "mean",
            "kind",
            out / f"rk_{sub}.png",
            hline=1.0,
            logx=True,
            title=f"r(k), {sub} subspace ({len(units)} seeds)",
            xlabel="k",
            ylabel="relative fraction r",
        )
    show = [1, 8, 64]
    table = []
    for sub in ("activation", "prediction"):
        for kind in sorted({r["kind"] for r in rows if r["subspace"] == sub}):
            at = {r["k"]: r for r in rows if r["subspace"] == sub and r["kind"] == kind}
            table.append(dict(subspace=sub, kind=kind, **{f"k={k}": _pm(at[k]) for k in show if k in at}))
    return dict(rows=rows, table=table), [
        "## r(k) curves\n",
        "The probe's r(k) = f(k)/(k/n) at every k of its log grid for whole matrices on the residual-stream side "
        "(the Haar null's mean is 1 at every k; its exact std is in the units), mean over a kind's matrices, "
        "then over seeds [95% t-interval]. r is bounded by n/k, so compare kinds at one k.\n",
        report.markdown_table(table),
        "\n![r(k), activation](rk_activation.png)\n![r(k), prediction](rk_prediction.png)\n",
    ]


_BASELINE_FIELDS = ("relative", "random_delta_relative", "rho", "mean_relative")


def _baselines(s: _Seed, cfg: RealConfig) -> dict:
    """The probe's references on this pair (issue #29): per kind and subspace (whole matrices, residual side), the
    mean r, the gradient-shaped null's expected r, ρ_C and the mean-direction share, for ΔW itself, W_base
    (``base_weight``) and one draw of the gradient-shaped null update (``random_delta``)."""
    from ..analyses.probe import probe

    out: dict = {}
    for delta in ("tuned", "base_weight", "random_delta"):
        result = probe(
            s.base,
            s.tuned if delta == "tuned" else None,
            activations=s.acts,
            k=cfg.ks[0],
            null_samples=0,
            heads=False,
            curves=False,
            delta=delta,
            seed=s.seed,
            progress=False,
        )
        cells: dict = {}
        for r in result.rows:
            if r["stream"] == "residual":
                c = cells.setdefault(f"{r['kind']}/{r['subspace']}", {f: [] for f in _BASELINE_FIELDS})
                for f in _BASELINE_FIELDS:
                    if r.get(f) is not None:
                        c[f].append(r[f])
        out[delta] = {key: {f: sum(v) / len(v) for f, v in c.items() if v} for key, c in cells.items()}
    return out


def _baselines_report(units: list[dict]) -> tuple[dict, list[str]]:
    from .. import report

    kinds = ("W_Q", "W_K", "W_V", "W_in", "W_gate", "W_O", "W_out")
    table = []
    for sub in ("activation", "prediction"):
        for kind in kinds:
            key = f"{kind}/{sub}"
            if key not in units[0]["tuned"]:
                continue

            def cell(delta: str, field: str, key: str = key) -> str:
                return _pm(_interval([u[delta].get(key, {}).get(field) for u in units]))

            table.append(
                {
                    "subspace": sub,
                    "kind": kind,
                    "r (ΔW)": cell("tuned", "relative"),
                    "r expected, gradient-shaped null": cell("tuned", "random_delta_relative"),
                    "r (random_delta draw)": cell("random_delta", "relative"),
                    "r (W_base)": cell("base_weight", "relative"),
                    "ρ (ΔW)": cell("tuned", "rho"),
                    "ρ (W_base)": cell("base_weight", "rho"),
                }
            )
    return dict(table=table), [
        "## Compared with what? The probe's references\n",
        f"Mean over a kind's whole matrices (residual side, k = 8), then over {len(units)} seeds [95% t-interval]. "
        "r (ΔW): the tuned delta; r expected, gradient-shaped null: tr(U_kᵀ M U_k)/tr M · n/k with M the input's "
        "uncentred second moment (what any update Σ_t δ_t a_tᵀ with structure-free δ inherits from its inputs; "
        "k/n · n/k = 1 on the output side); r (random_delta draw): one such update drawn; r (W_base): the base "
        "weights themselves; ρ: the k-free score (1 under the Haar null).\n",
        report.markdown_table(table),
    ]


def _trajectory(s: _Seed, cfg: RealConfig) -> dict:
    from .experiments import trajectory

    rows = trajectory(
        s.base, Path(s.info["folder"]) / "align", s.data, k=cfg.ks[0], null_samples=cfg.null_samples, seed=s.seed
    )
    return dict(rows=rows)


def _joint(
    s: _Seed,
    cfg: RealConfig,
    out: Path,
    mode: str,
    match: str,
    alphas: Sequence[float],
    sets: Sequence[str],
    ranks: Sequence[int],
    name: str,
    progress: bool | None,
) -> dict:
    from ..analyses.sweep import summarize, sweep

    path = out / "sweeps" / f"{name}.jsonl"
    rows = sweep(
        s.base,
        s.tuned,
        s.held,
        out=path,
        joint=True,
        matrices=tuple(sets),
        ranks=tuple(ranks),
        directions=cfg.joint_directions,
        alphas=tuple(alphas),
        mode=mode,
        match=match,
        seed=s.seed,
        max_pairs=cfg.max_pairs,
        progress=progress,
    )
    summary = summarize(rows, metrics=list(GAP_METRICS), seed=s.seed)
    return dict(
        seed=s.seed,
        mode=mode,
        match=match,
        sweep=str(path.relative_to(out)),
        summary=summary.rows,
        rows=[
            {
                k: r.get(k)
                for k in (
                    "matrix",
                    "rank",
                    "direction",
                    "index",
                    "alpha",
                    "mode",
                    "u_norm",
                    "output_energy",
                    "n_matrices",
                    *GAP_METRICS,
                    "accuracy",
                    "margin",
                )
            }
            for r in rows
        ],
    )


def _companion(s: _Seed, cfg: RealConfig) -> dict:
    from ..analyses.companion import geometry, post_training_report, reconstruction_experiment
    from ..objectives import heldout_ce, preference_accuracy

    post = post_training_report(s.base, s.info["tuned"])
    held = s.held.subset(torch.arange(min(cfg.max_pairs, len(s.held))))
    text = s.data[:32]
    recon = reconstruction_experiment(
        s.base,
        s.tuned,
        {"heldout_accuracy": lambda m: preference_accuracy(m, None, held), "heldout_ce": lambda m: heldout_ce(m, text)},
        seed=s.seed,
    )
    geo = geometry({"base": s.info["base"], "tuned": s.info["tuned"]}, s.data, progress=False)
    return dict(post_by_kind=post["by_kind"], post_rows=post["rows"], reconstruction=recon, geometry=geo)


def _schedule(cfg: RealConfig, seeds: list, out: Path, progress: bool | None) -> list[tuple]:
    """(unit name, part, seed, fn(pair)) in run order: every seed of the cheap, central units first
    (a run cut short has whole rows of seeds), the rest after — probes, mechanism, output-matched
    joint edits, the CE contrast, the α scan, norm-matched joint edits, λ = 0.5, the companion
    analyses, the remaining λ."""

    def joint(
        name: str, seed: int, mode: str, match: str, alphas: Sequence[float], sets: Sequence[str], ranks: Sequence[int]
    ) -> tuple:
        return (name, "joint", seed, lambda s: _joint(s, cfg, out, mode, match, alphas, sets, ranks, name, progress))

    def graded(lam: float) -> Callable:
        return lambda s: _graded(s, cfg, lam)

    units: list[tuple] = []
    for part, fn in (("asymmetry", _asymmetry), ("trajectory", _trajectory), ("mechanism", _mechanism)):
        units += [(f"{part}_s{seed}", part, seed, lambda s, fn=fn: fn(s, cfg)) for seed in seeds]
    lams = sorted(float(x) for x in cfg.lams)
    first = [x for x in lams if x in (0.0, 1.0)]
    middle = [x for x in lams if x == 0.5]
    rest = [x for x in lams if x not in first + middle]
    scan_sets = [x for x in cfg.joint_sets if x != "blocks.*.attn.W_Q"] or list(cfg.joint_sets)
    for i, match in enumerate(cfg.joint_matches):
        units += [
            joint(f"joint_s{seed}_{mode}_{match}", seed, mode, match, (1.0,), cfg.joint_sets, cfg.joint_ranks)
            for seed in seeds
            for mode in cfg.joint_modes
        ]
        if i == 0:
            units += [(f"graded_s{seed}_l{lam:g}", "graded", seed, graded(lam)) for lam in first for seed in seeds]
            units.append(
                joint(
                    f"alpha_scan_s{seeds[0]}",
                    seeds[0],
                    "transplant",
                    match,
                    cfg.alpha_scan,
                    scan_sets,
                    cfg.joint_ranks[-1:],
                )
            )
    units += [(f"graded_s{seed}_l{lam:g}", "graded", seed, graded(lam)) for lam in middle for seed in seeds]
    units += [(f"companion_s{seed}", "companion", seed, lambda s: _companion(s, cfg)) for seed in seeds]
    units += [(f"graded_s{seed}_l{lam:g}", "graded", seed, graded(lam)) for lam in rest for seed in seeds]
    units += [(f"curves_s{seed}", "curves", seed, lambda s: _curves(s, cfg)) for seed in seeds]  # added last
    units += [(f"baselines_s{seed}", "baselines", seed, lambda s: _baselines(s, cfg)) for seed in seeds]
    return units


def real_experiment(
    out: str | Path = "docs/results/real",
    config: RealConfig | None = None,
    *,
    parts: Sequence[str] = PARTS,
    cache_dir: Any = None,
    progress: bool | None = None,
    log: Any = print,
    report: bool = True,
) -> dict | None:
    """Run (or resume) the parts of the real-model experiments (module docstring) and write the
    report (unless ``report=False``); returns its results (`real_report`)."""
    cfg = config or RealConfig()
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise RwasymError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    seeds = list(cfg.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) for x in seeds):
        raise RwasymError(f"seeds must be distinct integers such as 0,1,2; got {seeds!r}")
    run_cfg = cfg
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(run_cfg), indent=1))
    pairs: dict[int, _Seed] = {}

    def pair(seed: int) -> _Seed:  # each seed's pair is loaded once and kept (about 2 GB with its statistics)
        if seed not in pairs:
            pairs[seed] = _Seed(seed, cfg.quick, cache_dir, progress)
        return pairs[seed]

    for name, part, seed, fn in _schedule(run_cfg, seeds, out, progress):
        if part in parts:
            _unit(out, name, lambda: fn(pair(seed)), log)  # noqa: B023 (called at once, inside this iteration)
    return real_report(out) if report else None


# -- the report: every table from the units, mean and 95% t-interval over seeds ------------------
def _units(out: Path, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "units").glob(f"{prefix}*.json"))]


def _interval(values: Sequence[float | None]) -> dict:
    from ..math.inference import seed_interval

    vals = [v for v in values if v is not None]
    return seed_interval(vals) if vals else dict(n=0, mean=None, std=None, ci_low=None, ci_high=None)


def _pm(r: dict, digits: int = 3) -> str:
    if r.get("mean") is None:
        return ""
    if r.get("ci_low") is None:
        return f"{r['mean']:.{digits}g}"
    return f"{r['mean']:.{digits}g} [{r['ci_low']:.{digits}g}, {r['ci_high']:.{digits}g}]"


def _pivot(rows: list[dict], head: Callable[[dict], dict], cells: Sequence[str] | None = None) -> list[dict]:
    """Long rows (one per x and ``cell``, with an interval) as one row per distinct ``head(r)`` — its
    leading columns — with each cell's mean [95% interval] (``cells``: keep only these)."""
    wide: dict = {}
    for r in rows:
        if cells is None or r["cell"] in cells:
            first = head(r)
            wide.setdefault(tuple(first.values()), dict(first))[r["cell"]] = _pm(r)
    return list(wide.values())


def _cells(rows: list[dict], key: str = "relative") -> dict[str, float]:
    """Mean of ``key`` over whole matrices per (matrix side, subspace) and per (kind, subspace)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is None:
            continue
        groups.setdefault(f"{r['matrix_side']}_{r['subspace']}", []).append(r[key])
        groups.setdefault(f"{r['kind']}/{r['subspace']}", []).append(r[key])
        if (side := paper_side(r["kind"])) is not None:  # the paper's grouping, beside the pooled one
            groups.setdefault(f"paper_{side}_{r['subspace']}", []).append(r[key])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _asymmetry_report(out: Path, units: list[dict], seeds: list) -> tuple[dict, list[str]]:
    from .. import report

    ks = list(units[0]["by_k"])
    table, per_seed = [], {k: [_cells(u["by_k"][k]) for u in units] for k in ks}
    k90 = [_cells(u["by_k"][ks[0]], "relative_k_variance") for u in units]
    cells = sorted({c for k in ks for d in per_seed[k] for c in d}, key=lambda c: ("/" in c, c))
    for cell in cells:
        row = {"cell": cell}
        for k in ks:
            row[f"k={k}"] = _pm(_interval([d.get(cell) for d in per_seed[k]]))
        if cell.endswith("activation"):
            row["k at 90% variance"] = _pm(_interval([d.get(cell) for d in k90]))
        table.append(row)
    depth = []
    for sub in ("activation", "prediction"):
        keys = sorted({(r["layer"], r["kind"]) for r in units[0]["by_k"][ks[0]] if r["subspace"] == sub})
        for layer, kind in keys:
            vals = [
                next(
                    (
                        r["relative"]
                        for r in u["by_k"][ks[0]]
                        if (r["layer"], r["kind"], r["subspace"]) == (layer, kind, sub)
                    ),
                    None,
                )
                for u in units
            ]
            depth.append(dict(subspace=sub, layer=layer, kind=kind, **_interval(vals)))
        report.line_plot(
            [d for d in depth if d["subspace"] == sub],
            "layer",
            "mean",
            "kind",
            out / f"depth_{sub}.png",
            hline=1.0,
            title=f"r per layer against the {sub} subspace (k={ks[0]}, mean of {len(units)} seeds)",
            xlabel="layer",
            ylabel="relative fraction r",
        )
    spread_keys = sorted(units[0].get("head_spread", {}))
    spread = [
        dict(
            cell=key,
            **{
                stat: sum(u["head_spread"][key][stat] for u in units) / len(units)
                for stat in ("n", "mean", "std", "min", "q10", "q90", "max")
            },
        )
        for key in spread_keys
    ]
    results = dict(table=table, depth=depth, head_spread=spread, seeds=seeds)
    sections = [
        f"## Asymmetry: the probe table ({len(units)} seeds)\n",
        "Mean relative fraction r over whole matrices (1 = isotropic), mean over seeds [95% t-interval]; "
        "`read_`/`write_` cells pool the matrix kinds of a side (read: W_Q/K/V/W_in/W_gate), `paper_` cells use the "
        "paper's grouping (read: W_Q, W_K; write: W_O, W_out); the last column uses each matrix's own "
        "k at 90% explained variance.\n",
        report.markdown_table(table),
        f"\n### Per-head spread at k={ks[0]} (per kind and subspace; seed-averaged statistics over heads)\n",
        report.markdown_table(spread),
        "\n![depth, activation](depth_activation.png)\n![depth, prediction](depth_prediction.png)\n",
    ]
    return results, sections


def _graded_report(out: Path, units: list[dict]) -> tuple[dict, list[str]]:
    from .. import report
    from ..math.inference import slope

    keys = CELLS + ("heldout_accuracy", "heldout_margin", "delta_norm")
    lams = sorted({u["lam"] for u in units})
    seeds = sorted({u["seed"] for u in units})
    by_lam = [
        dict(lam=lam, cell=key, **_interval([u.get(key) for u in units if u["lam"] == lam]))
        for lam in lams
        for key in keys
    ]
    slopes = []
    for key in keys:
        per_seed = []
        for seed in seeds:
            pts = [(u["lam"], u[key]) for u in units if u["seed"] == seed and u.get(key) is not None]
            if len({x for x, _ in pts}) >= 2:
                per_seed.append(slope([x for x, _ in pts], [y for _, y in pts]))
        if per_seed:
            slopes.append(dict(cell=key, per_seed=per_seed, **_interval(per_seed)))
    report.line_plot(
        [r for r in by_lam if r["cell"] in CELLS],
        "lam",
        "mean",
        "cell",
        out / "graded.png",
        hline=1.0,
        yerr=("ci_low", "ci_high") if len(seeds) > 1 else None,
        title=f"graded λ·DPO + (1−λ)·CE on the real pair, {len(seeds)} seeds",
        xlabel="λ (contrastive share)",
        ylabel="mean relative fraction r",
    )
    sections = [
        "## Contrast and graded control\n",
        "Each seed's base aligned with L_λ at the DPO run's steps, learning rate and seed (λ = 0: CE on the "
        "chosen completions, the pretraining-like contrast; λ = 1: the DPO run). Mean over seeds [95% "
        "t-interval].\n",
        report.markdown_table(_pivot(by_lam, lambda r: {"λ": r["lam"], "seeds": r["n"]})),
        "\n### Slope of each cell against λ (per seed, then mean [95% t-interval])\n",
        report.markdown_table(
            [dict(cell=s["cell"], per_seed=", ".join(f"{v:.3g}" for v in s["per_seed"]), slope=_pm(s)) for s in slopes]
        ),
        "\n![graded](graded.png)\n",
    ]
    return dict(
        by_lam=by_lam, slopes=slopes, rows=[{k: v for k, v in u.items() if k != "by_kind"} for u in units]
    ), sections


MECH_KEYS = (
    "a_top1_share",
    "delta_top1_share",
    "a_participation_ratio",
    "delta_participation_ratio",
    "a_effective_rank",
    "delta_effective_rank",
    "G_input_pca_relative",
    "G_prediction_relative",
)


def _mechanism_report(units: list[dict]) -> tuple[dict, list[str]]:
    from .. import report

    rows = []
    for objective in ("ce", "dpo"):
        for side in ("read", "write"):
            row: dict[str, Any] = dict(objective=objective, side=side)
            for key in MECH_KEYS:
                vals = []
                for u in units:
                    sel = [r[key] for r in u[objective] if r["side"] == side and r.get(key) is not None]
                    vals.append(sum(sel) / len(sel) if sel else None)
                row[key] = _interval(vals)
            rows.append(row)
    flat = [dict(objective=r["objective"], side=r["side"], **{k: _pm(r[k]) for k in MECH_KEYS}) for r in rows]
    sections = [
        "## Mechanism: gradient anisotropy of the base, CE versus DPO on the same batches\n",
        "Per matrix: spikiness of C_a = Σ a aᵀ (input) and C_δ = Σ δ δᵀ (output gradient) — top-1 share, "
        "participation ratio, effective rank — and the relative fraction of G = Σ δ aᵀ against the PCA "
        "basis of C_a (input side) and the prediction subspace (the residual-stream side), averaged over "
        "the side's matrices; mean over seeds [95% t-interval].\n",
        report.markdown_table(
            flat, ["objective", "side", "a_top1_share", "delta_top1_share", "a_effective_rank", "delta_effective_rank"]
        ),
        "\n",
        report.markdown_table(
            flat,
            [
                "objective",
                "side",
                "a_participation_ratio",
                "delta_participation_ratio",
                "G_input_pca_relative",
                "G_prediction_relative",
            ],
        ),
    ]
    return dict(rows=rows), sections


def _trajectory_report(out: Path, units: list[dict]) -> tuple[dict, list[str]]:
    from .. import report

    rows = [dict(seed=i, **r) for i, u in enumerate(units) for r in u["rows"] if r["kind"] == "summary"]
    steps = sorted({r["step"] for r in rows})
    by_step = [
        dict(step=step, cell=key, **_interval([r.get(key) for r in rows if r["step"] == step]))
        for step in steps
        for key in CELLS + ("delta_norm",)
    ]
    report.line_plot(
        [r for r in by_step if r["cell"] in CELLS],
        "step",
        "mean",
        "cell",
        out / "trajectory.png",
        hline=1.0,
        yerr=("ci_low", "ci_high") if len(units) > 1 else None,
        title=f"within one DPO run, {len(units)} seeds",
        xlabel="alignment step",
        ylabel="mean relative fraction r",
    )
    return dict(by_step=by_step), [
        "## Trajectory within the DPO run\n",
        "Every saved checkpoint probed against the base; mean over seeds [95% t-interval].\n",
        report.markdown_table(_pivot(by_step, lambda r: {"step": r["step"]})),
        "\n![trajectory](trajectory.png)\n",
    ]


def _joint_report(out: Path, units: list[dict], scan: list[dict]) -> tuple[dict, list[str]]:
    from .. import report
    from ..math.inference import holm, seed_differences, stratified_rank_test

    table = []
    keys = sorted(
        {(r["matrix"], r["rank"], u["mode"], u["match"]) for u in units for r in u["rows"]},
        key=lambda k: (k[2], k[3], k[0], k[1]),
    )
    for matrix, rank, mode, match in keys:
        sel = [u for u in units if u["mode"] == mode and u["match"] == match]
        for metric in ("gap_accuracy", "gap_margin"):
            t, c, strata = [], [], []  # stratum = one seed: its target (the mean of its targets), its controls
            for u in sel:
                rows = [
                    r for r in u["rows"] if r["matrix"] == matrix and r["rank"] == rank and r.get(metric) is not None
                ]
                tt = [r[metric] for r in rows if r["direction"] not in ("random", "orthogonal")]
                cc = [r[metric] for r in rows if r["direction"] in ("random", "orthogonal")]
                if tt and cc:
                    t += tt
                    c += cc
                    strata.append((sum(tt) / len(tt), cc))
            if not t or not c:
                continue
            test = stratified_rank_test(strata)
            diffs = seed_differences(strata)
            kl = "kl_base" if mode == "transplant" else "kl_tuned"
            kls = [
                (r[kl], r["direction"] not in ("random", "orthogonal"))
                for u in sel
                for r in u["rows"]
                if r["matrix"] == matrix and r["rank"] == rank
            ]
            table.append(
                dict(
                    set=matrix,
                    rank=rank,
                    mode=mode,
                    match=match,
                    metric=metric,
                    seeds=len(diffs),
                    target=sum(t) / len(t),
                    control=sum(c) / len(c),
                    per_seed_diff=_pm(_interval(diffs)),
                    p=test["p"],
                    p_floor=test["floor"],
                    at_floor=test["at_floor"],
                    target_kl=sum(v for v, is_t in kls if is_t) / max(1, sum(is_t for _, is_t in kls)),
                    control_kl=sum(v for v, is_t in kls if not is_t) / max(1, sum(not is_t for _, is_t in kls)),
                )
            )
    for match in {r["match"] for r in table}:  # Holm over each table the report prints (one per matching mode)
        fam = [r for r in table if r["match"] == match]
        for r, adjusted in zip(fam, holm([r["p"] for r in fam])):
            r["p_holm"] = adjusted
    scan_rows = []
    for u in scan:
        for r in u["rows"]:
            scan_rows.append(
                dict(
                    set=r["matrix"],
                    alpha=r["alpha"],
                    direction="target" if r["direction"] not in ("random", "orthogonal") else "control",
                    gap_accuracy=r["gap_accuracy"],
                    gap_margin=r["gap_margin"],
                    kl_base=r["kl_base"],
                )
            )
    scan_table = []
    for key in sorted({(r["set"], r["alpha"], r["direction"]) for r in scan_rows}):
        sel = [r for r in scan_rows if (r["set"], r["alpha"], r["direction"]) == key]
        scan_table.append(
            dict(
                set=key[0],
                alpha=key[1],
                edit=key[2],
                n=len(sel),
                **{
                    m: sum(r[m] for r in sel if r[m] is not None) / max(1, sum(r[m] is not None for r in sel))
                    for m in ("gap_accuracy", "gap_margin", "kl_base")
                },
            )
        )
    if scan_table:
        report.line_plot(
            [dict(r, line=f"{r['set']} {r['edit']}") for r in scan_table],
            "alpha",
            "gap_margin",
            "line",
            out / "alpha_scan.png",
            title="joint rank-r transplant: margin gap fraction against α",
            xlabel="α",
            ylabel="fraction of the margin gap",
            logx=True,
        )
    cols = [
        "set",
        "rank",
        "mode",
        "match",
        "metric",
        "seeds",
        "target",
        "control",
        "per_seed_diff",
        "p",
        "p_floor",
        "p_holm",
        "target_kl",
        "control_kl",
    ]
    sections = [
        "## Causal test: joint edits of matrix sets\n",
        "The closed-form edit of every matrix of a set at once (rwasym.analyses.joint), transplanted into the "
        "base (fraction of the base → tuned gap recovered) or ablated from the tuned model (fraction removed), "
        "at α = 1, on the held-out pairs. target: the top-r input PCA (read matrices) or prediction (write "
        "matrices) directions of every matrix; control: per matrix, random / orthogonal r-frames matched to "
        "that matrix's target in output energy (``output``) or Frobenius norm (``norm``) — edits of unequal "
        "effect (compare *_kl), so these rows do not separate where from how much (docs/results/real_causal "
        "has the effect-matched re-run). target / control: means over seeds (descriptive); per_seed_diff: "
        "target − mean(controls) per seed, mean [95% t-interval over seeds]; p: the exact stratified rank test "
        "(stratum = seed, one-sided), p_floor its smallest attainable value, p_holm Holm over the rows of one "
        "matching mode; *_kl: mean KL to the unedited host on held-out text.\n",
        report.markdown_table(table, cols),
    ]
    if scan_table:
        sections += [
            "\n### α scan (first seed, rank-r transplant)\n",
            report.markdown_table(scan_table),
            "\n![alpha scan](alpha_scan.png)\n",
        ]
    return dict(table=table, alpha_scan=scan_table), sections


def _companion_report(out: Path, units: list[dict]) -> tuple[dict, list[str]]:
    from .. import report

    kinds = sorted(units[0]["post_by_kind"])
    post = [
        dict(
            kind=kind,
            **{
                key: _pm(_interval([u["post_by_kind"][kind].get(key) for u in units]))
                for key in units[0]["post_by_kind"][kind]
            },
        )
        for kind in kinds
    ]
    modes = [r["mode"] for r in units[0]["reconstruction"]]
    recon = [
        dict(
            mode=mode,
            **{
                m: _pm(_interval([next(r[m] for r in u["reconstruction"] if r["mode"] == mode) for u in units]))
                for m in ("heldout_accuracy", "heldout_ce")
            },
        )
        for mode in modes
    ]
    geo = []
    for label in ("base", "tuned"):
        for layer in sorted({r["layer"] for r in units[0]["geometry"]}):
            pick = [next(r for r in u["geometry"] if r["checkpoint"] == label and r["layer"] == layer) for u in units]
            geo.append(
                dict(
                    model=label,
                    layer=layer,
                    rankme=_interval([p["rankme"] for p in pick]),
                    alpha_req=_interval([p["alpha_req"] for p in pick]),
                )
            )
    report.line_plot(
        [dict(model=g["model"], layer=g["layer"], value=g["rankme"]["mean"]) for g in geo],
        "layer",
        "value",
        "model",
        out / "rankme.png",
        title="RankMe of resid_post per layer",
        xlabel="layer",
        ylabel="RankMe",
    )
    report.line_plot(
        [dict(model=g["model"], layer=g["layer"], value=g["alpha_req"]["mean"]) for g in geo],
        "layer",
        "value",
        "model",
        out / "alpha_req.png",
        title="α-ReQ of resid_post per layer",
        xlabel="layer",
        ylabel="α-ReQ exponent",
    )
    diffs = []
    for layer in sorted({g["layer"] for g in geo}):
        b = next(g for g in geo if g["model"] == "base" and g["layer"] == layer)
        t = next(g for g in geo if g["model"] == "tuned" and g["layer"] == layer)
        diffs.append(
            dict(
                layer=layer,
                rankme_base=b["rankme"]["mean"],
                rankme_tuned=t["rankme"]["mean"],
                alpha_req_base=b["alpha_req"]["mean"],
                alpha_req_tuned=t["alpha_req"]["mean"],
            )
        )
    sections = [
        "## Companion analyses on the same pair\n",
        "### Post-training SVD (arXiv 2509.17866), per kind\n",
        "σ ratios σ_tuned/σ_base (mean, std, fitted slope) and the consistency of the rotations R_U, R_V "
        "(mean over seeds [95% t-interval]).\n",
        report.markdown_table(post),
        "\n### Rebuilt models: held-out behaviour\n",
        report.markdown_table(recon),
        "\n### RankMe / α-ReQ of resid_post (arXiv 2509.23024), seed means\n",
        report.markdown_table(diffs),
        "\n![RankMe](rankme.png)\n![alpha-ReQ](alpha_req.png)\n",
    ]
    return dict(post_by_kind=post, reconstruction=recon, geometry=geo), sections


def real_report(out: str | Path) -> dict:
    """Rebuild ``results.json``, ``report.md`` and the figures of ``out`` from its units."""
    from .. import report
    from .._version import __version__

    out = Path(out)
    results: dict = {"experiment": "real", "units": {}, "seconds": {}}
    sections = [
        f"# The paper's experiments on the real pair (rwasym {__version__})\n",
        "SmolLM2-135M-Instruct and its DPO fine-tune on the procedural preference task of "
        "`rwasym.studies.real_pair`, one pair per alignment seed. Reproduce: `rwasym experiment real "
        f"--out {out}` (resumable). Times are wall-clock on the machine that ran it.\n",
    ]
    for part in PARTS:
        prefixes = {"joint": "joint_", "graded": "graded_"}.get(part, f"{part}_")
        units = _units(out, prefixes)
        if not units:
            continue
        results["seconds"][part] = sum(u.get("seconds", 0.0) for u in units)
        results["units"][part] = len(units)
        if part == "asymmetry":
            res, sec = _asymmetry_report(out, units, [])
        elif part == "graded":
            res, sec = _graded_report(out, units)
        elif part == "mechanism":
            res, sec = _mechanism_report(units)
        elif part == "trajectory":
            res, sec = _trajectory_report(out, units)
        elif part == "curves":
            res, sec = _curves_report(out, units)
        elif part == "baselines":
            res, sec = _baselines_report(units)
        elif part == "joint":
            scan = _units(out, "alpha_scan_")
            results["seconds"][part] += sum(u.get("seconds", 0.0) for u in scan)
            res, sec = _joint_report(out, units, scan)
        else:
            res, sec = _companion_report(out, units)
        results[part] = res
        sections += sec + [f"\n_{len(units)} units, {results['seconds'][part] / 60:.1f} min._\n"]
    report.write_outputs(out, results, sections)
    return results


def readme_tables(results: dict) -> str:
    """The real-pair tables of docs/results/real_pair.md, generated from ``docs/results/real/results.json``
    (tests/test_readme_results.py checks the page holds exactly this text, so the two cannot drift)."""
    from .. import report

    parts = []
    if "asymmetry" in results:
        rows = {r["cell"]: r for r in results["asymmetry"]["table"]}
        cols = [c for c in rows["read_activation"] if c != "cell"]
        parts += [
            "**Asymmetry** (mean relative fraction r of whole matrices, residual-stream side; mean over seeds "
            "[95% t-interval]):\n",
            report.markdown_table(
                [{"cell": c, **{k: rows[c].get(k, "") for k in cols}} for c in CELLS + PAPER_CELLS if c in rows],
                ["cell", *cols],
            ),
        ]
    if "trajectory" in results:
        parts += [
            "**Trajectory within the DPO run** (k = 8):\n",
            report.markdown_table(_pivot(results["trajectory"]["by_step"], lambda r: {"step": r["step"]})),
        ]
    if "mechanism" in results:
        parts += [
            "**Mechanism** (gradient anisotropy of the base on the same pair batches; spikiness of C_a and C_δ, "
            "relative fraction of G = Σ δ aᵀ, k = 8):\n",
            report.markdown_table(
                [
                    dict(
                        objective=r["objective"],
                        side=r["side"],
                        **{
                            k: _pm(r[k])
                            for k in (
                                "a_top1_share",
                                "delta_top1_share",
                                "delta_effective_rank",
                                "G_input_pca_relative",
                                "G_prediction_relative",
                            )
                        },
                    )
                    for r in results["mechanism"]["rows"]
                ]
            ),
        ]
    if "joint" in results:
        for match in ("output", "norm"):
            rows = [r for r in results["joint"]["table"] if r["match"] == match]
            if not rows:
                continue
            parts += [
                f"**Joint edits, controls matched in {'output energy' if match == 'output' else 'Frobenius norm'}** "
                "(withdrawn: edits of unequal effect, see the KL columns; fraction of the base → tuned gap moved, "
                "α = 1; target and control means over seeds; per-seed difference, mean [95% t-interval over "
                "seeds]; exact stratified rank p (stratum = seed; ≤ marks the test's floor), Holm-adjusted over "
                "the table):\n",
                report.markdown_table(
                    [
                        dict(
                            set=r["set"],
                            rank=r["rank"],
                            mode=r["mode"],
                            metric=r["metric"],
                            seeds=r["seeds"],
                            target=r["target"],
                            control=r["control"],
                            per_seed_diff=r["per_seed_diff"],
                            p=f"≤ {r['p']:.3g}" if r["at_floor"] else f"{r['p']:.3g}",
                            p_holm=r["p_holm"],
                            target_kl=r["target_kl"],
                            control_kl=r["control_kl"],
                        )
                        for r in rows
                    ]
                ),
            ]
        scan = results["joint"].get("alpha_scan") or []
        if scan:
            parts += [
                "**α scan** (first seed, rank-8 transplant, output-matched controls):\n",
                report.markdown_table(scan),
            ]
    if "graded" in results:
        cells = ("read_activation", "write_prediction", "heldout_accuracy", "heldout_margin")
        wide = _pivot(results["graded"]["by_lam"], lambda r: {"λ": f"{r['lam']:g}", "seeds": r["n"]}, cells)
        slopes = {s["cell"]: _pm(s) for s in results["graded"]["slopes"]}
        parts += [
            "**Graded objective** L_λ = λ·DPO + (1 − λ)·CE(chosen) (λ = 0: the CE contrast), k = 8:\n",
            report.markdown_table(wide + ([{"λ": "slope", **{c: slopes.get(c, "") for c in cells}}] if slopes else [])),
        ]
    if "companion" in results:
        parts += [
            "**Post-training SVD** (per kind) **and rebuilt models**:\n",
            report.markdown_table(results["companion"]["post_by_kind"]),
            report.markdown_table(results["companion"]["reconstruction"]),
        ]
    minutes = ", ".join(f"{k} {v / 60:.0f} min" for k, v in results.get("seconds", {}).items())
    parts.append(f"Wall-clock per part (2 cores, shared with test runs, so upper bounds): {minutes}.\n")
    return "\n".join(parts)
