"""The paper's experiments as functions over the public API: within-run trajectory, graded control.

Each returns plain rows (dicts) that `rwasym.report` turns into tables and figures. The summary
statistic of one probe is `asymmetry_summary`: the mean relative fraction r of whole matrices on
the residual-stream side, per matrix side ("read": W_Q/K/V/W_in/W_gate, "write": W_O/W_out) and
subspace ("activation" PCA, "prediction").
"""

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .activations import ActivationStats, capture
from .companion import checkpoint_folders
from .models import Model, load, weight_deltas
from .probe import ProbeResult, probe, probe_sites


def asymmetry_summary(result: ProbeResult) -> dict[str, float]:
    """{"read_activation": mean r, "read_prediction": ..., "write_activation": ..., "write_prediction": ...}
    over whole matrices on the residual-stream side."""
    cells: dict[str, list[float]] = {}
    for row in result.rows:
        if row["head"] is None and row["stream"] == "residual":
            cells.setdefault(f"{row['matrix_side']}_{row['subspace']}", []).append(row["relative"])
    return {key: sum(v) / len(v) for key, v in sorted(cells.items())}


def base_activations(base: Model, data: Any, *, max_tokens: Optional[int] = None) -> ActivationStats:
    """The base model's statistics for every probe site (computed once, reused by every probe)."""
    return capture(base, data, sites=probe_sites(base, base.matrices()), max_tokens=max_tokens, progress=False)


def trajectory(base: Any, run: Union[str, Path, Mapping[int, Any]], data: Any, *, k: int = 8,
               null_samples: int = 50, max_tokens: Optional[int] = None, seed: int = 0) -> list[dict]:
    """Probe every checkpoint of one alignment run against its base.

    run: a training output folder (``step_*`` checkpoints) or {step: model source}. One row per
    (step, matrix kind) with mean r per subspace, plus ‖ΔW‖_F summed over the kind's matrices.
    """
    base = load(base)
    steps = checkpoint_folders(run) if isinstance(run, (str, Path)) else dict(run)
    acts = base_activations(base, data, max_tokens=max_tokens)
    rows = []
    for step in sorted(steps):
        tuned = load(steps[step])
        norms: dict[str, float] = {}
        for name, d in weight_deltas(base, tuned).items():
            kind = base.matrix(name).kind
            norms[kind] = norms.get(kind, 0.0) + float(d.square().sum())
        if sum(norms.values()) == 0.0:
            continue  # step 0 is the base itself
        result = probe(base, tuned, activations=acts, k=k, null_samples=null_samples, heads=False,
                       curves=False, seed=seed)
        for kind, subs in result.table().items():
            rows.append(dict(step=step, kind=kind, delta_norm=norms[kind] ** 0.5,
                             r_activation=subs.get("activation"), r_prediction=subs.get("prediction")))
        summary = asymmetry_summary(result)
        rows.append(dict(step=step, kind="summary", delta_norm=sum(norms.values()) ** 0.5, **summary))
    return rows


def graded(base: Any, pairs: Any, data: Any, *, lams: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
           align_config: Any = None, seeds: Sequence[int] = (0,), k: int = 8, null_samples: int = 50,
           max_tokens: Optional[int] = None, heldout: Any = None, progress: bool = False) -> list[dict]:
    """Align copies of ``base`` with L_λ = λ·L_DPO + (1 − λ)·L_CE(chosen) for each λ (same data,
    steps and seed) and probe each against the base. One row per (seed, λ): the asymmetry summary,
    ‖ΔW‖_F, and, with ``heldout`` pairs, the held-out preference accuracy."""
    from .train import AlignConfig, align, preference_accuracy

    base = load(base)
    acts = base_activations(base, data, max_tokens=max_tokens)
    config = align_config or AlignConfig()
    rows = []
    for seed in seeds:
        for lam in lams:
            tuned = clone(base)
            cfg = replace(config, objective="graded", lam=float(lam), seed=seed)
            align(tuned, base, pairs, cfg, progress=progress)
            result = probe(base, tuned, activations=acts, k=k, null_samples=null_samples, heads=False,
                           curves=False, seed=seed)
            row = dict(seed=seed, lam=float(lam), **asymmetry_summary(result),
                       delta_norm=sum(float(d.square().sum()) for d in weight_deltas(base, tuned).values()) ** 0.5)
            if heldout is not None:
                row["heldout_accuracy"] = preference_accuracy(tuned, None, heldout)
            rows.append(row)
    return rows


def pretraining_contrast(run: Union[str, Path], data: Any, *, k: int = 8, null_samples: int = 50,
                         max_tokens: Optional[int] = None, pairs_of_steps: Optional[Sequence[tuple[int, int]]] = None,
                         seed: int = 0) -> list[dict]:
    """CE-pretraining deltas (checkpoint → later checkpoint) probed the same way: the contrast row."""
    steps = checkpoint_folders(run)
    ordered = sorted(steps)
    if pairs_of_steps is None:
        pairs_of_steps = [(ordered[-2], ordered[-1])] if len(ordered) >= 2 else []
    rows = []
    for s0, s1 in pairs_of_steps:
        base, tuned = load(steps[s0]), load(steps[s1])
        result = probe(base, tuned, data, k=k, null_samples=null_samples, heads=False, curves=False,
                       max_tokens=max_tokens, seed=seed)
        rows.append(dict(from_step=s0, to_step=s1, **asymmetry_summary(result)))
    return rows


def clone(model: Model) -> Model:
    """An independent copy of a model (same weights, own parameters), e.g. to align from a shared base."""
    import copy

    return Model(copy.deepcopy(model.bridge), source=model.source)
