"""`sweep`: the plan of edits (targets and matched controls, per matrix or per joint set), measured pass by
pass into the store."""

import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from ... import distributed
from ..._progress import quiet
from ...errors import RwasymError
from ...hooks.activations import capture, data_hash
from ...math.calibration import ScaleSearch
from ...math.rank1 import directions as make_directions
from ...math.rank1 import match_output_energy
from ...models import Model, check_same_architecture, embed_head, head_input_block, head_slice, load
from ...models.deltas import WeightDeltas
from ..behaviour import Evaluator, collateral_set, eval_set
from ..joint import iter_values as joint_values
from ..joint import joint_edits, matrix_set, scaled
from ..options import resolve_config
from .config import CONTROLS, TARGETS, SweepConfig, parse_directions, row_id, scale_key, stable_hash
from .store import Store, finished_rows, merge_shards, rank_path, read_sweep


# --------------------------------------------------------------------------------- the plan
def _generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(int(stable_hash([seed, *parts]), 16) % (2**63))


def _unit_edits(
    base: Model,
    spec: Any,
    head: int | None,
    delta: torch.Tensor,
    stat: Any,
    kinds: list[tuple[str, int]],
    seed: int,
    warned: set,
    match: str = "norm",
) -> list[tuple[Any, dict]]:
    """(Direction, row descriptors) for one matrix / head: targets and their matched controls
    (equal ‖u vᵀ‖_F, or with ``match="output"`` equal mean-square output change)."""
    C = head_input_block(spec, stat.covariance(), head)
    M = head_input_block(spec, stat.second_moment(), head)
    counts = dict(kinds)
    out = []
    for target in [t for t in TARGETS if t in counts]:
        if target == "prediction" and spec.side != "write":
            if spec.kind not in warned:
                warnings.warn(
                    f"rwasym: prediction directions live in the residual stream; {spec.kind} is a read "
                    "matrix, so it gets no prediction-side edits (use pca for read matrices)",
                    stacklevel=3,
                )
                warned.add(spec.kind)
            continue
        unemb = base.unembedding() if target == "prediction" else None
        targets = make_directions(target, delta, counts[target], cov=C, unembedding=unemb)
        norms = [d.norm for d in targets]
        group = list(targets)
        for kind in [c for c in CONTROLS if c in counts]:
            g = _generator(seed, spec.name, head, target, kind)
            if kind == "output_random":  # a Haar p on the output side whatever the target's side: p pᵀ ΔW
                drawn = make_directions("random", delta, counts[kind], side="output", target_norms=norms, generator=g)
                controls = [replace(d, kind=kind, target=target) for d in drawn]
                group += match_output_energy(controls, targets, M) if match == "output" else controls
                continue
            controls = make_directions(
                kind,
                delta,
                counts[kind],
                cov=C,
                unembedding=unemb,
                side=targets[0].side,
                k=counts[target],
                target_norms=norms,
                generator=g,
                frames=torch.stack([d.direction for d in targets]),
            )
            group += match_output_energy(controls, targets, M) if match == "output" else controls
        for d in group:
            energy = float(d.v @ C @ d.v)
            out.append(
                (
                    d,
                    dict(
                        side=d.side,
                        direction=d.kind,
                        index=d.index,
                        target=d.target,
                        matched_to=d.matched_to,
                        u_norm=d.norm,
                        input_energy=energy,
                        input_second_moment=float(d.v @ M @ d.v),
                        input_energy_ratio=energy / max(float(C.trace()) / C.shape[0], 1e-300),
                    ),
                )
            )
    return out


def sweep(
    base: Any,
    tuned: Any,
    pairs: Any,
    config: SweepConfig | None = None,
    *,
    out: str | os.PathLike = "sweep.jsonl",
    text: Any = None,
    data: Any = None,
    collateral: Any = None,
    metrics: Any = None,
    progress: bool | None = None,
    **overrides: Any,
) -> list[dict]:
    """Run (or resume) a sweep of rank-1 edits and return its rows in plan order.

    base, tuned: models (anything `rwasym.load` accepts); pairs: held-out preference pairs
    (`rwasym.analyses.behaviour.as_eval_set`); config: a `SweepConfig` (matrices, directions,
    alphas, mode, match, seed, beta, heads, edits_per_pass, max_pairs, max_tokens, reuse_prefix —
    each documented there), with keyword ``overrides`` of its fields (``sweep(..., matrices=
    "blocks.*.attn.W_Q", alphas=(1, 2))``); text: held-out text for ce / kl (default prompt +
    chosen); data: corpus for the base's input covariance (default: the text); metrics: user
    metrics ``{name: callable(logits, batch) -> float}``. Under ``torchrun`` the passes are sharded
    over ranks and merged into ``out`` (module docstring).
    """
    cfg: SweepConfig = resolve_config(SweepConfig, config, overrides, "sweep")
    base, tuned = load(base), load(tuned)
    check_same_architecture(base, tuned)  # before any capture: a mismatch costs nothing
    donor = None if cfg.control_delta is None else load(cfg.control_delta)
    if donor is not None:
        check_same_architecture(base, donor)
    data_set = eval_set(base, pairs, text, cfg.max_pairs)  # pairs resolved once; the Evaluator takes the EvalSet
    kinds = parse_directions(cfg.directions)
    # CPUs are compute-bound (small passes stay in cache); GPUs want wide batches
    edits_per_pass = cfg.edits_per_pass or (4 if base.device.type == "cpu" else 64)
    if cfg.joint:
        sets = {entry: matrix_set(base, entry) for entry in cfg.matrices}
        chosen = {s.name for group in sets.values() for s in group}
    else:
        chosen = {s.name for p in cfg.matrices for s in base.matrices(p)}
    specs = [s for s in base.matrices() if s.name in chosen]
    if not specs:
        raise base.unmatched(list(cfg.matrices))
    col = collateral_set(base, collateral, data_set) if cfg.match == "kl" else None  # resolved once
    ev = Evaluator(
        base,
        tuned,
        data_set,
        beta=cfg.beta,
        metrics=metrics,
        reuse_prefix=cfg.reuse_prefix,
        collateral=col,
        text_metrics=cfg.text_metrics,
    )
    collateral_hash = None
    if col is not None:
        collateral_hash = stable_hash([col.source, data_hash(col.tokens), data_hash(col.counted.long())])
        if data is None and col.source == "text":  # the frames come from text disjoint from the pairs
            mask = {} if col.attention_mask is None else {"attention_mask": col.attention_mask}
            data = {"input_ids": col.tokens, **mask}
    cov_data = data if data is not None else {"input_ids": ev.data.text, "attention_mask": ev.data.text_mask}
    tokens_for_hash = cov_data["input_ids"] if isinstance(cov_data, Mapping) else cov_data
    header = cfg.header(
        base=base.weights_hash(),
        tuned=tuned.weights_hash(),
        pairs=stable_hash(
            [
                None if getattr(ev.data, k) is None else data_hash(getattr(ev.data, k).long())
                for k in ("chosen", "chosen_scored", "rejected", "rejected_scored", "text", "text_mask")
            ]
        ),
        cov_data=data_hash(tokens_for_hash) if isinstance(tokens_for_hash, torch.Tensor) else str(tokens_for_hash),
        matrices=[s.name for s in specs],
        metrics=ev.metrics,
        edits_per_pass=edits_per_pass,
        dtype=str(base.dtype),
        post_norm=any(base.post_norm_scale(s.name) is not None for s in specs),
        collateral=collateral_hash,
        donor=None if donor is None else donor.weights_hash(),
    )
    alphas, mode, seed, heads, match, max_tokens = cfg.alphas, cfg.mode, cfg.seed, cfg.heads, cfg.match, cfg.max_tokens
    rank, size = distributed.world()
    if size == 1:
        store = Store(out, header, ev.reference)
    else:  # this rank's own file; rows finished in <out> or any rank file count as done
        done = finished_rows(out, header)
        distributed.barrier()  # every rank has read the files before any rank repairs / appends
        store = Store(rank_path(out, rank), header, ev.reference)
        store.rows = {**done, **store.rows}
    try:
        # float64 products: a sweep file's rows (PCA directions, their norms) stay reproducible across versions
        acts = capture(
            base,
            cov_data,
            sites={base.input_hook(s.name): s.n_in for s in specs},
            max_tokens=max_tokens,
            progress=progress,
            gram_dtype=torch.float64,
            exclude_positions=cfg.exclude_positions,
            exclude_tokens=cfg.exclude_tokens,
        )
        deltas = WeightDeltas(base, tuned, [s.name for s in specs])  # each ΔW formed when read, float64
        host, sign = (base, 1.0) if mode == "transplant" else (tuned, -1.0)
        plan, warned = [], set()
        if cfg.joint:
            plan = _joint_plan(ev, base, tuned, sets, acts, kinds, cfg, sign, edits_per_pass, donor=donor)
        for spec in specs if not cfg.joint else []:
            full = deltas[spec.name]  # ΔW (float64), one matrix at a time
            raw_norm = float(full.norm())  # ‖ΔW‖_F of the raw weights: the ceiling row's
            gamma = _post_scale(base, spec.name, cfg.post_norm)
            if gamma is not None:  # directions and norms as the residual stream sees the change
                full = gamma[:, None] * full
            for head in [None] + (list(range(spec.n_heads)) if heads and spec.n_heads else []):
                delta = full if head is None else head_slice(spec, full, head)
                if float(delta.abs().max()) == 0.0:
                    continue  # nothing to transplant or ablate (e.g. a frozen matrix)
                edits = _unit_edits(
                    base,
                    spec,
                    head,
                    delta,
                    acts.for_matrix(spec.name),
                    kinds,
                    seed,
                    warned,
                    "norm" if match == "kl" else match,
                )
                if not edits:
                    continue  # no target applies (prediction asked of a read matrix): no row, no ceiling
                if match == "kl":  # rows keyed by budget; α calibrated when the unit runs
                    if cfg.ceiling and head is None:
                        donor = tuned if mode == "transplant" else base
                        desc = _ceiling_row(spec.name, spec.layer, spec.kind, raw_norm, cfg)
                        plan.append(([desc], _ceiling_pass(ev, host, donor, [spec.name]), len(plan)))
                    units = []
                    for d, desc in edits:
                        u, v, lost = _raw_edit(spec, d, sign, head, gamma)
                        units.append((_with_unreachable(desc, lost), d, {spec.name: (u[None], v[None])}))
                    metas = [
                        _meta(
                            row_id(spec.name, head, d.kind, d.index, d.target, 1.0, mode, seed, budget=b),
                            spec.name,
                            spec.layer,
                            spec.kind,
                            head,
                            desc,
                            cfg,
                            budget=b,
                        )
                        for b in cfg.kl_budgets
                        for desc, d, _ in units
                    ]
                    plan += _kl_plan(
                        ev, host, metas, [(desc, e) for desc, _, e in units], cfg, edits_per_pass, len(plan)
                    )
                    continue
                items = []
                for alpha in alphas:
                    for d, desc in edits:
                        u, v, lost = _raw_edit(spec, d, sign * alpha, head, gamma)
                        meta = _meta(
                            row_id(spec.name, head, d.kind, d.index, d.target, alpha, mode, seed),
                            spec.name,
                            spec.layer,
                            spec.kind,
                            head,
                            _with_unreachable(desc, lost),
                            cfg,
                            alpha=alpha,
                            edit_norm=abs(alpha) * d.norm,
                        )
                        items.append((meta, u, v))
                plan += [
                    ([m for m, _, _ in c], _matrix_pass(ev, host, spec.name, c), len(plan) + j)
                    for j, c in enumerate(items[i : i + edits_per_pass] for i in range(0, len(items), edits_per_pass))
                ]
        if not plan:
            raise RwasymError(
                f"nothing to sweep for {[s.name for s in specs]} with directions {cfg.directions!r}: every "
                "ΔW is zero, or no target applies (prediction needs write matrices W_O / W_out)"
            )
        # a pass runs on rank unit % size: the passes of one effect-matched unit share its calibration
        mine = [metas for metas, _, unit in plan if unit % size == rank]  # every pass when size == 1
        bar = tqdm(
            total=sum(len(m) for m in mine),
            initial=sum(1 for ms in mine for m in ms if m["id"] in store.rows),
            desc="sweep",
            unit="edit",
            disable=quiet(progress) or rank != 0,
        )
        for metas, run, unit in plan:
            if unit % size != rank or all(meta["id"] in store.rows for meta in metas):
                continue  # another rank's pass, or finished
            for meta, values in zip(metas, run()):
                if meta["id"] not in store.rows:
                    store.append({**meta, **values, **ev.gap_fractions(values, mode)})
                    bar.update(1)
        bar.close()
        if size == 1:
            return [store.rows[meta["id"]] for metas, _, _ in plan for meta in metas]
    finally:
        store.close()
    ids = [meta["id"] for metas, _, _ in plan for meta in metas]
    distributed.barrier()  # every rank file is complete
    if rank == 0:
        merge_shards(out, header, ev.reference, ids)
    distributed.barrier()  # <out> is merged
    return read_sweep(out)[1]


def _post_scale(base: Model, name: str, post_norm: str) -> torch.Tensor | None:
    """γ_post_eff of a write matrix behind a post-sublayer norm under the residual convention
    (`Model.post_norm_scale`), else None. An edit E_res chosen on diag(γ)·ΔW is written as the raw
    E = diag(γ)⁺ E_res (`_to_raw`), so that the residual stream sees E_res (per-token RMS aside)."""
    if post_norm != "residual":
        return None
    return base.post_norm_scale(name)


def _to_raw(U: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output factor U (…, n_out) of a residual-convention edit as the raw weight's, U ⊘ γ, with the
    pseudo-inverse where γ_i = 0: a dimension the post-norm scales to zero is unreachable from this weight
    (gemma-3-270m has such dimensions), so the edit's component there is dropped, not divided by zero.
    Also returns U's dropped part (the rows of Uᵀ at γ = 0, zeros elsewhere) for `_unreachable`."""
    zero = gamma == 0
    raw = U / torch.where(zero, torch.ones_like(gamma), gamma)
    dropped = U * zero
    return raw.masked_fill(zero, 0.0), dropped


def _unreachable(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """‖Σ (dropped part of E_res)‖²_F / ‖E_res‖²_F of a (joint) edit E_res = {Uᵀ V} over its matrices, from
    [(U, dropped U, V)]: the fraction of the residual-convention edit no weight change can deliver (`_to_raw`).
    ‖Uᵀ V‖²_F = tr((U Uᵀ)(V Vᵀ)), so no n_out × n_in product is formed."""

    def energy(U: torch.Tensor, V: torch.Tensor) -> float:
        U, V = U.double().reshape(-1, U.shape[-1]), V.double().reshape(-1, V.shape[-1])
        return float(((U @ U.T) * (V @ V.T)).sum())

    total = sum(energy(U, V) for U, _, V in parts)
    return sum(energy(D, V) for _, D, V in parts) / total if total > 0 else 0.0


def _raw_edit(
    spec: Any, d: Any, scale: float, head: int | None, gamma: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Direction ``d`` times ``scale`` as an edit of the host's raw weight: embedded at its head's block and,
    where the residual stream sees the weight through a post-sublayer norm, with γ divided back out
    (`_to_raw`). Returns (u, v, the unreachable fraction where γ has zeros, else None)."""
    u, v = embed_head(spec, scale * d.u, d.v, head)
    if gamma is None:
        return u, v, None
    raw, dropped = _to_raw(u, gamma)
    return raw, v, (_unreachable([(u, dropped, v)]) if bool((gamma == 0).any()) else None)


def _with_unreachable(desc: dict, fraction: float | None) -> dict:
    """``desc`` with ``post_norm_unreachable`` where a zero post-norm scale made part of the edit unreachable."""
    return desc if fraction is None else {**desc, "post_norm_unreachable": fraction}


def _matrix_pass(ev: Evaluator, host: Model, name: str, chunk: list) -> Callable[[], Iterator[dict]]:
    """The pass of per-matrix rank-1 edits ``chunk`` = [(meta, u, v)] of matrix ``name``."""
    return lambda: ev.iter_edits(
        host, name, torch.stack([u for _, u, _ in chunk]), torch.stack([v for _, _, v in chunk])
    )


def _joint_plan(
    ev: Evaluator,
    base: Model,
    tuned: Model,
    sets: dict,
    acts: Any,
    kinds: list,
    cfg: SweepConfig,
    sign: float,
    edits_per_pass: int,
    unit_base: int = 0,
    donor: Model | None = None,
) -> list:
    """The passes (metas, run, unit) of a joint sweep (`rwasym.analyses.joint`): per set and rank, every
    α (or KL budget) of every target / control edit, ``edits_per_pass`` edits per batched forward."""
    host = base if sign > 0 else tuned
    deltas: dict[str, torch.Tensor] = {}
    formed = WeightDeltas(base, tuned, sorted({s.name for group in sets.values() for s in group}))

    def delta_of(name: str) -> torch.Tensor:  # ΔW once per matrix (sets may share matrices)
        if name not in deltas:
            deltas[name] = formed[name]
            scale = scales.get(name)
            if scale is not None:  # residual convention: diag(γ_post)·ΔW
                deltas[name] = scale[:, None] * deltas[name]
        return deltas[name]

    scales = {s.name: _post_scale(base, s.name, cfg.post_norm) for group in sets.values() for s in group}
    donor_deltas = None if donor is None else WeightDeltas(base, donor, sorted(scales))

    def donor_of(name: str) -> torch.Tensor:  # the donor run's ΔW, in the same (post-norm) convention as ΔW
        assert donor_deltas is not None  # only called for the donor family, which needs a donor
        d = donor_deltas[name]
        scale = scales.get(name)
        return d if scale is None else scale[:, None] * d

    plan = []
    for label, specs in sets.items():
        if cfg.match == "kl" and cfg.ceiling:
            norms = {s.name: float(formed[s.name].norm()) for s in specs}  # ‖ΔW‖_F, raw weights
            names = [n for n, v in norms.items() if v > 0.0]  # a frozen matrix stays out, as in the edits
            if names:
                norm = sum(norms[n] ** 2 for n in names) ** 0.5
                donor = tuned if sign > 0 else base
                meta = _ceiling_row(label, None, "joint", norm, cfg)
                plan.append(([meta], _ceiling_pass(ev, host, donor, names), unit_base + len(plan)))
        for r in cfg.ranks:
            match = "norm" if cfg.match == "kl" else cfg.match  # effect-matched: norm-matched, then calibrated
            edits = joint_edits(
                base,
                specs,
                delta_of,
                acts,
                kinds,
                r,
                lambda *parts: _generator(cfg.seed, "joint", *parts),
                match,
                donor_of=None if donor is None else donor_of,
            )
            edits = [_joint_raw(desc, edit, scales) for desc, edit in edits]  # the raw-weight edits
            if cfg.match == "kl":
                metas = [
                    _meta(_joint_id(label, r, desc, cfg, budget=b), label, None, "joint", None, desc, cfg, budget=b)
                    for b in cfg.kl_budgets
                    for desc, _ in edits
                ]
                signed = [(desc, scaled(edit, sign)) for desc, edit in edits]
                plan += _kl_plan(ev, host, metas, signed, cfg, edits_per_pass, unit_base + len(plan))
                continue
            items = []
            for alpha in cfg.alphas:
                for desc, edit in edits:
                    meta = _meta(
                        _joint_id(label, r, desc, cfg, alpha=alpha),
                        label,
                        None,
                        "joint",
                        None,
                        desc,
                        cfg,
                        alpha=alpha,
                        edit_norm=abs(alpha) * desc["u_norm"],
                    )
                    items.append((meta, edit, sign * alpha))
            for i in range(0, len(items), edits_per_pass):
                chunk = items[i : i + edits_per_pass]
                plan.append(
                    ([m for m, _, _ in chunk], lambda chunk=chunk: joint_values(ev, host, chunk), unit_base + len(plan))
                )
    return plan


def _joint_raw(desc: dict, edit: dict, scales: dict) -> tuple[dict, dict]:
    """A joint residual-convention edit {name: (U, V)} as raw-weight edits (`_to_raw` where a post-norm
    scale applies), its description carrying ``post_norm_unreachable`` where some scale has zeros."""
    raw, parts, zeros = {}, [], False
    for name, (U, V) in edit.items():
        scale = scales[name]
        if scale is None:
            U_raw, dropped = U, torch.zeros_like(U)
        else:
            U_raw, dropped = _to_raw(U, scale)
            zeros |= bool((scale == 0).any())
        raw[name] = (U_raw, V)
        parts.append((U, dropped, V))
    return _with_unreachable(desc, _unreachable(parts) if zeros else None), raw


def _meta(
    id: str,
    matrix: str,
    layer: int | None,
    kind: str,
    head: int | None,
    desc: dict,
    cfg: SweepConfig,
    *,
    alpha: float | None = None,
    edit_norm: float | None = None,
    budget: float | None = None,
) -> dict:
    """The descriptors of one planned row: a fixed-α row records α and its edit norm, an effect-matched
    row its KL budget (its α and edit norm arrive with its values)."""
    row = dict(id=id, matrix=matrix, layer=layer, matrix_kind=kind, head=head, **desc)
    if budget is not None:
        return dict(row, mode=cfg.mode, seed=int(cfg.seed), kl_budget=budget)
    return dict(row, alpha=alpha, mode=cfg.mode, seed=int(cfg.seed), edit_norm=edit_norm)


def _joint_id(
    label: str, rank: int, desc: dict, cfg: SweepConfig, *, alpha: float = 1.0, budget: float | None = None
) -> str:
    """The deterministic key of one joint row (the per-matrix rows' `row_id`, keyed by set and rank)."""
    parts = ["joint", label, rank, desc["direction"], desc["index"], desc["target"]]
    return stable_hash([*parts, *scale_key(alpha, budget), cfg.mode, int(cfg.seed)])


# --------------------------------------------------------------------------------- effect matching
def _kl_plan(
    ev: Evaluator,
    host: Model,
    metas: list[dict],
    units: list[tuple[dict, dict]],
    cfg: SweepConfig,
    width: int,
    unit: int,
) -> list:
    """The passes (metas, run, unit) of one effect-matched unit (a matrix / head, or a joint set at one
    rank): rows budget-major, ``width`` per pass. ``units`` = [(descriptors, edit at α = 1)], the edit
    {matrix: (U, V)} with the mode's sign folded in. The first pass to run calibrates every edit of
    the unit (`_calibrate`, each edit's α at each budget) and the others reuse it; since the whole
    unit is always calibrated, a resumed sweep reproduces the uninterrupted α bit for bit."""
    found: dict[tuple[int, float], dict] = {}
    items = [(e, b) for b in cfg.kl_budgets for e in range(len(units))]

    def run(chunk: list[tuple[int, float]]) -> Iterator[dict]:
        if not found:
            found.update(_calibrate(ev, host, units, cfg, width))
        edits = [scaled(units[e][1], found[(e, b)]["alpha"]) for e, b in chunk]
        for (e, b), values in zip(chunk, ev.iter_joint(host, edits)):
            r = found[(e, b)]
            yield dict(
                alpha=r["alpha"],
                edit_norm=r["alpha"] * units[e][0]["u_norm"],
                collateral_kl=r["achieved"],
                collateral_dce=r["dce"],
                calibration_evals=r["evaluations"],
                budget_reached=r["reached"],
                saturated=r["saturated"],
                **values,
            )

    return [
        (metas[i : i + width], lambda chunk=items[i : i + width]: run(chunk), unit) for i in range(0, len(items), width)
    ]


def _calibrate(
    ev: Evaluator, host: Model, units: list[tuple[dict, dict]], cfg: SweepConfig, width: int
) -> dict[tuple[int, float], dict]:
    """α of every edit of a unit at every budget: collateral KL (`Evaluator.iter_collateral`) within
    ``kl_rtol`` of the budget (`rwasym.math.calibration.ScaleSearch`), searched in lockstep rounds of
    ``width`` edits per batched forward. Targets first, from α₀ = 1 (the ΔW component itself); each
    control starts at its matched target's α at the smallest budget; each later budget starts from
    every point the edit's earlier searches measured (``prior``). A zero edit (ΔW has nothing along
    the direction) cannot reach any budget: saturated, measured at α = 1 (it is the host)."""
    budgets = list(cfg.kl_budgets)
    out: dict[tuple[int, float], dict] = {}
    is_target = [desc["direction"] == desc["target"] for desc, _ in units]
    target_of = {desc["index"]: e for e, (desc, _) in enumerate(units) if is_target[e]}
    seen: dict[int, dict[float, tuple[float, float]]] = {}  # edit → {α: (collateral KL, collateral ΔCE)}

    def start(e: int, j: int) -> ScaleSearch | None:
        """The search of edit e at budget j; None once it has finished (recorded in ``out``)."""
        if j == 0 and all(float(U.abs().max()) == 0.0 for U, _ in units[e][1].values()):
            for b in budgets:
                out[(e, b)] = dict(alpha=1.0, achieved=0.0, dce=0.0, evaluations=0, reached=False, saturated=True)
            return None
        alpha0 = 1.0
        if j == 0 and not is_target[e]:
            matched = out.get((target_of.get(units[e][0]["matched_to"], -1), budgets[0]))
            alpha0 = 1.0 if matched is None or matched["evaluations"] == 0 else matched["alpha"]
        prior = [(a, kl) for a, (kl, _) in seen.get(e, {}).items()]
        search = ScaleSearch(budgets[j], rtol=cfg.kl_rtol, alpha0=min(alpha0, 1e6), prior=prior)
        return None if _finished(search, e, j) else search

    def _finished(search: ScaleSearch, e: int, j: int) -> bool:
        if not search.done:
            return False
        r = search.result()
        out[(e, budgets[j])] = dict(
            alpha=r["alpha"],
            achieved=r["achieved"],
            dce=seen[e][r["alpha"]][1],
            evaluations=r["evaluations"],
            reached=r["reached"],
            saturated=r["saturated"],
        )
        return True

    def advance(e: int, j: int) -> None:
        """Open the searches of edit e from budget j on (one may finish on its priors alone)."""
        for jj in range(j, len(budgets)):
            search = start(e, jj)
            if search is not None:
                open_[e] = (jj, search)
                return
            if (e, budgets[-1]) in out:
                return

    targets = [e for e in range(len(units)) if is_target[e]]
    for members in (targets, [e for e in range(len(units)) if not is_target[e]]):
        open_: dict[int, tuple[int, ScaleSearch]] = {}
        for e in members:
            advance(e, 0)
        while open_:
            order = sorted(open_)
            for i in range(0, len(order), width):
                chunk = order[i : i + width]
                edits = [scaled(units[e][1], open_[e][1].alpha) for e in chunk]
                for e, values in zip(chunk, ev.iter_collateral(host, edits)):
                    j, search = open_[e]
                    seen.setdefault(e, {})[search.alpha] = (values["collateral_kl"], values["collateral_dce"])
                    try:
                        search.observe(values["collateral_kl"])
                    except RwasymError as err:
                        desc = units[e][0]
                        raise RwasymError(
                            f"calibrating the {desc['direction']} edit {desc['index']} to a collateral KL of "
                            f"{budgets[j]}: {err}"
                        ) from None
                    if _finished(search, e, j):
                        del open_[e]
                        advance(e, j + 1)
    return out


def _ceiling_row(matrix: str, layer: int | None, kind: str, norm: float, cfg: SweepConfig) -> dict:
    """The descriptors of a ceiling row: the full ΔW of a matrix (or set) at α = 1, ``norm`` = ‖ΔW‖_F."""
    return dict(
        id=stable_hash(["ceiling", matrix, cfg.mode, int(cfg.seed)]),
        matrix=matrix,
        layer=layer,
        matrix_kind=kind,
        head=None,
        side="full",
        direction="ceiling",
        index=0,
        target="ceiling",
        matched_to=None,
        u_norm=norm,
        mode=cfg.mode,
        seed=int(cfg.seed),
        alpha=1.0,
        edit_norm=norm,
        kl_budget=None,
    )


def _ceiling_pass(ev: Evaluator, host: Model, donor: Model, names: list[str]) -> Callable[[], Iterator[dict]]:
    """The pass of one ceiling row: ``host`` with the matrices ``names`` taken from ``donor``
    (`Evaluator.measure_weights`: written, measured by plain forwards, restored bit-exactly)."""

    def run() -> Iterator[dict]:
        values = ev.measure_weights(host, donor, names)
        yield dict(**values, calibration_evals=0, budget_reached=None, saturated=False)

    return run
