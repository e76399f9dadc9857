"""Resumable sweeps of closed-form rank-1 interventions, and target-versus-control summaries.

`sweep` edits every matrix (optionally every head) along target directions (pca / prediction)
and norm-matched controls (random / orthogonal), at every α, in one mode (see `rwasym.math.rank1`),
and measures each edited model (`rwasym.analyses.behaviour`). With ``joint=True`` each
``matrices`` entry is a set edited all at once, at every rank of ``ranks`` (`rwasym.analyses.joint`:
rank-r transplants / ablations into e.g. every layer's W_Q, with per-matrix matched controls); its
rows resume, shard and summarise like the per-matrix ones. The output is a JSON-lines file:

- line 1, the header: ``{"rwasym_sweep": 1, "config_hash": ..., "config": {...}, "reference": {...}}``
  — the configuration (model weight hashes, data hashes, matrices, directions, alphas, mode,
  seed, β, metrics, batching) and the base / tuned reference metrics;
- one line per edit, keyed by ``id`` = hash(matrix, head, direction, index, target, α, mode, seed).

Each row is flushed and fsynced as soon as it is measured. A re-run with the same configuration
skips finished rows; a half-written last line (a killed run) is dropped with a warning; a file
written by another configuration raises `RwasymError` naming the differing entries. Edits are
measured ``edits_per_pass`` at a time in a fixed plan (the batch an edit is measured in never
depends on what was already done), so a resumed file equals an uninterrupted run's, and a kill
loses at most the edits of the pass in flight (``edits_per_pass=1``: at most the row in flight).

Data parallel (under ``torchrun``, see `rwasym.distributed`): with world_size W > 1 the covariance
capture is sharded by batch, and pass j of the plan runs on rank j mod W, which appends its rows
to ``<out>.rank<r>.jsonl`` (resumable like ``<out>``; rows already in ``<out>`` or in any rank
file, e.g. from a run with another W, are skipped). After a barrier rank 0 writes ``<out>``
atomically — the header and every row in plan order, as one uninterrupted process would — and
deletes the rank files; every rank returns the merged rows.

`summarize` compares, per matrix × head × mode × α × target family, the target rows with the
control rows (random, orthogonal, and both pooled): difference of means, percentile-bootstrap
95% CI and a two-sided permutation p-value, all seeded.
"""

import glob
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..errors import RwasymError
from ..hooks.activations import capture, data_hash, quiet
from ..hooks.edits import MODES
from ..math.inference import bootstrap_ci, permutation_pvalue
from ..math.rank1 import directions as make_directions
from ..math.rank1 import match_output_energy
from ..models import Model, check_same_architecture, embed_head, head_input_block, head_slice, load
from ..models.deltas import WeightDeltas
from .behaviour import Evaluator, eval_set
from .joint import iter_values as joint_values
from .joint import joint_edits, matrix_set
from .options import option as _opt
from .options import resolve_config

__all__ = ["SweepConfig", "SweepSummary", "parse_directions", "read_sweep", "summarize", "sweep"]

FORMAT = 1
TARGETS = ("pca", "prediction")
CONTROLS = ("random", "orthogonal")
MATCHES = ("norm", "output")


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep measures. The sweep file's header, its config hash and the ``rwasym intervene``
    flags all derive from these fields (`header`, `rwasym.app.cli`)."""

    matrices: Sequence[str] = _opt(("blocks.*.attn.W_Q",), "registry globs of the matrices to edit", list_of=str)
    directions: str = _opt(
        "pca:4,random:32,orthogonal:32",
        "kind:count of targets (pca, prediction) and their matched controls (random, orthogonal)",
    )
    alphas: Sequence[int | float] = _opt((1.0,), "edit scales α, e.g. 0.5,1,2", list_of=float)
    mode: str = _opt("transplant", "transplant (base + α u vᵀ) or ablate (tuned − α u vᵀ)", choices=MODES)
    match: str = _opt(
        "norm",
        "controls matched to their target in ‖α u vᵀ‖_F (norm) or in mean-square output change (output)",
        choices=MATCHES,
    )
    seed: int = _opt(0, "seeds the control directions (and keys the rows)")
    beta: float = _opt(0.1, "DPO β of the implicit-reward metrics")
    heads: bool = _opt(False, "also edit every attention head separately")
    edits_per_pass: int | None = _opt(
        None,
        "edits measured in one batched forward (default 4 on CPU, 64 on "
        "an accelerator; part of the configuration: batch composition moves "
        "float rounding)",
        type=int,
    )
    max_pairs: int | None = _opt(None, "held-out pairs used (default all)", type=int)
    max_tokens: int | None = _opt(None, "tokens of the covariance capture (default all)", type=int)
    reuse_prefix: bool = _opt(True, "score chosen and rejected in one pass where they share a prefix")
    post_norm: str = _opt(
        "residual",
        "post-sublayer-norm models (OLMo 2, Gemma 2/3): residual = directions, norms "
        "and matching of W_O / W_out edits in diag(γ_post)·ΔW, as the residual stream sees the "
        "change (the edit written is the raw-weight equivalent); raw = on the raw ΔW",
        choices=("residual", "raw"),
    )
    joint: bool = _opt(
        False,
        "edit every matrix of each --matrices entry at once (a set: globs joined by +, or "
        "read / write / all); one row per set, rank, direction and α (rwasym.analyses.joint)",
    )
    ranks: Sequence[int] = _opt(
        (1,),
        "joint: edit ranks r, each edit the top-r target directions of every matrix (controls: random r-frames)",
        list_of=int,
    )

    def __post_init__(self) -> None:
        for name in ("matrices", "alphas", "ranks"):  # lists and single values become tuples
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int, float)) else tuple(value))
        if self.mode not in MODES:
            raise RwasymError(f"mode must be one of {MODES}; got {self.mode!r}")
        parse_directions(self.directions)
        if self.post_norm not in ("residual", "raw"):
            raise RwasymError(f"post_norm must be 'residual' or 'raw'; got {self.post_norm!r}")
        if self.match not in MATCHES:
            raise RwasymError(f"match must be one of {MATCHES}; got {self.match!r}")
        alphas = [float(a) for a in self.alphas]
        if not alphas or len(set(alphas)) != len(alphas) or not all(math.isfinite(a) for a in alphas):
            raise RwasymError(f"alphas must be distinct finite numbers; got {alphas}")
        object.__setattr__(self, "alphas", tuple(alphas))
        ranks = self.ranks
        if (
            not ranks
            or len(set(ranks)) != len(ranks)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
        ):
            raise RwasymError(f"ranks must be distinct positive integers such as 1,8; got {list(ranks)}")
        if not self.joint and ranks != (1,):
            raise RwasymError(f"ranks={list(ranks)} needs joint=True (--joint): per-matrix sweeps are rank 1")
        if self.joint and self.heads:
            raise RwasymError("joint edits are whole-matrix edits of a set; drop heads (--heads) or joint (--joint)")
        e = self.edits_per_pass
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise RwasymError(f"edits_per_pass must be a positive integer; got {e!r}")

    def header(
        self,
        *,
        base: str,
        tuned: str,
        pairs: str,
        cov_data: str,
        matrices: Sequence[str],
        metrics: Any,
        edits_per_pass: int,
        dtype: str,
        post_norm: bool = False,
    ) -> dict:
        """The ``config`` of the sweep file's header: this configuration resolved against the run
        (weight and data hashes, matched matrix names, metric names — any iterable of them, e.g. the
        evaluator's metric dict —, the pass width, the dtype).
        Its hash keys the file; ``match`` is absent for "norm" so files from rwasym 0.1 still resume, and
        ``post_norm`` is recorded only for models with post-sublayer norms (``post_norm=True``)."""
        kinds = parse_directions(self.directions)
        return dict(
            base=base,
            tuned=tuned,
            pairs=pairs,
            cov_data=cov_data,
            matrices=list(matrices),
            heads=bool(self.heads),
            directions=",".join(f"{k}:{c}" for k, c in kinds),
            alphas=list(self.alphas),
            mode=self.mode,
            seed=int(self.seed),
            beta=float(self.beta),
            metrics=sorted(metrics),
            edits_per_pass=edits_per_pass,
            max_tokens=self.max_tokens,
            reuse_prefix=bool(self.reuse_prefix),
            dtype=dtype,
            **({} if self.match == "norm" else {"match": self.match}),
            **({"joint": True, "ranks": list(self.ranks)} if self.joint else {}),
            **({"post_norm": self.post_norm} if post_norm else {}),
        )

    def to_dict(self) -> dict:
        return asdict(self)


_DESCRIPTORS = (
    "id",
    "matrix",
    "layer",
    "matrix_kind",
    "head",
    "side",
    "direction",
    "index",
    "target",
    "matched_to",
    "alpha",
    "mode",
    "seed",
    "u_norm",
    "edit_norm",
    "input_second_moment",
    "input_energy_ratio",
    "rank",
    "n_matrices",
)


# --------------------------------------------------------------------------------- parsing
def parse_directions(spec: str) -> list[tuple[str, int]]:
    """``"pca:4,random:32,orthogonal:32"`` → [("pca", 4), ("random", 32), ("orthogonal", 32)]."""
    out: dict[str, int] = {}
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        kind, _, count = part.partition(":")
        if kind not in TARGETS + CONTROLS or not count.strip().isdigit() or int(count) < 1 or kind in out:
            raise RwasymError(
                f"bad direction spec {part!r} in {spec!r}: write kind:count with kind in "
                f"{', '.join(TARGETS + CONTROLS)}, each once, count >= 1 (e.g. pca:4,random:32)"
            )
        out[kind] = int(count)
    if not any(k in out for k in TARGETS):
        raise RwasymError(
            f"direction spec {spec!r} has no target kind: add pca:k (read side) or "
            "prediction:k (write side); controls are matched to the targets"
        )
    return list(out.items())


def _hash(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def row_id(
    matrix: str, head: int | None, direction: str, index: int, target: str, alpha: float, mode: str, seed: int
) -> str:
    """The deterministic key of one sweep row."""
    return _hash([matrix, head, direction, index, target, float(alpha), mode, int(seed)])


# --------------------------------------------------------------------------------- the file
def read_sweep(path: str | os.PathLike, *, repair: bool = False) -> tuple[dict | None, list[dict]]:
    """(header, rows) of a sweep file. A half-written last line is dropped with a warning (and
    cut from the file when ``repair``); a corrupt complete line raises RwasymError."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None, []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        warnings.warn(
            f"rwasym: dropping a half-written last line of {str(path)!r} ({len(raw) - end} bytes, "
            "from an interrupted run); it will be recomputed",
            stacklevel=2,
        )
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    records = []
    for number, line in enumerate(raw[:end].decode().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RwasymError(
                f"{str(path)!r} line {number} is corrupt ({err}); it is not a file this "
                "version of rwasym wrote, or it was edited: move it away and re-run"
            ) from None
    if not records:
        return None, []
    header = records[0]
    if not isinstance(header, dict) or header.get("rwasym_sweep") != FORMAT:
        raise RwasymError(
            f"{str(path)!r} is not an rwasym sweep file (its first line is not a header); choose another --out path"
        )
    return header, records[1:]


def _require_config(path: Path, header: dict | None, config: dict) -> None:
    """Raise unless the sweep file's header (None: no file yet) was written by ``config``."""
    if header is not None and header.get("config_hash") != _hash(config):
        old = header.get("config", {})
        diffs = [
            f"{k}: file has {old.get(k)!r}, this run has {config.get(k)!r}"
            for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)
        ]
        raise RwasymError(
            f"sweep file {str(path)!r} was written by a different configuration ("
            f"{'; '.join(diffs) or 'config hash differs'}); use another out path, or delete "
            "the file to start over"
        )


class _Store:
    """The append-only JSON-lines file of one sweep configuration."""

    def __init__(self, path: str | os.PathLike, config: dict, reference: dict):
        self.path = Path(path)
        digest = _hash(config)
        header, rows = read_sweep(self.path, repair=True)
        _require_config(self.path, header, config)
        self.rows = {r["id"]: r for r in rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        if header is None:
            self._fh.truncate(0)
            self._write({"rwasym_sweep": FORMAT, "config_hash": digest, "config": config, "reference": reference})

    def _write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, row: dict) -> None:
        self._write(row)
        self.rows[row["id"]] = row

    def close(self) -> None:
        self._fh.close()


# --------------------------------------------------------------------------------- the plan
def _generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(int(_hash([seed, *parts]), 16) % (2**63))


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
    ev = Evaluator(base, tuned, data_set, beta=cfg.beta, metrics=metrics, reuse_prefix=cfg.reuse_prefix)
    cov_data = data if data is not None else {"input_ids": ev.data.text, "attention_mask": ev.data.text_mask}
    tokens_for_hash = cov_data["input_ids"] if isinstance(cov_data, Mapping) else cov_data
    header = cfg.header(
        base=base.weights_hash(),
        tuned=tuned.weights_hash(),
        pairs=_hash(
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
    )
    alphas, mode, seed, heads, match, max_tokens = cfg.alphas, cfg.mode, cfg.seed, cfg.heads, cfg.match, cfg.max_tokens
    rank, size = distributed.world()
    if size == 1:
        store = _Store(out, header, ev.reference)
    else:  # this rank's own file; rows finished in <out> or any rank file count as done
        done = _finished_rows(out, header)
        distributed.barrier()  # every rank has read the files before any rank repairs / appends
        store = _Store(_rank_path(out, rank), header, ev.reference)
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
        )
        deltas = WeightDeltas(base, tuned, [s.name for s in specs])  # each ΔW formed when read, float64
        host, sign = (base, 1.0) if mode == "transplant" else (tuned, -1.0)
        plan, warned = [], set()
        if cfg.joint:
            plan = _joint_plan(ev, base, tuned, sets, acts, kinds, cfg, sign, edits_per_pass)
        for spec in specs if not cfg.joint else []:
            full = deltas[spec.name]  # ΔW (float64), one matrix at a time
            gamma = _post_scale(base, spec.name, cfg.post_norm)
            if gamma is not None:  # directions and norms as the residual stream sees the change
                full = gamma[:, None] * full
            for head in [None] + (list(range(spec.n_heads)) if heads and spec.n_heads else []):
                delta = full if head is None else head_slice(spec, full, head)
                if float(delta.abs().max()) == 0.0:
                    continue  # nothing to transplant or ablate (e.g. a frozen matrix)
                edits = _unit_edits(base, spec, head, delta, acts.for_matrix(spec.name), kinds, seed, warned, match)
                items = []
                for alpha in alphas:
                    for d, desc in edits:
                        meta = dict(
                            id=row_id(spec.name, head, d.kind, d.index, d.target, alpha, mode, seed),
                            matrix=spec.name,
                            layer=spec.layer,
                            matrix_kind=spec.kind,
                            head=head,
                            **desc,
                            alpha=alpha,
                            mode=mode,
                            seed=int(seed),
                            edit_norm=abs(alpha) * d.norm,
                        )
                        u, v = embed_head(spec, sign * alpha * d.u, d.v, head)
                        items.append((meta, u if gamma is None else u / gamma, v))  # the raw-weight edit
                plan += [
                    ([m for m, _, _ in c], _matrix_pass(ev, host, spec.name, c))
                    for c in (items[i : i + edits_per_pass] for i in range(0, len(items), edits_per_pass))
                ]
        if not plan:
            raise RwasymError(
                f"nothing to sweep for {[s.name for s in specs]} with directions {cfg.directions!r}: every "
                "ΔW is zero, or no target applies (prediction needs write matrices W_O / W_out)"
            )
        mine = [metas for j, (metas, _) in enumerate(plan) if j % size == rank]  # every pass when size == 1
        bar = tqdm(
            total=sum(len(m) for m in mine),
            initial=sum(1 for ms in mine for m in ms if m["id"] in store.rows),
            desc="sweep",
            unit="edit",
            disable=quiet(progress) or rank != 0,
        )
        for j, (metas, run) in enumerate(plan):
            if j % size != rank or all(meta["id"] in store.rows for meta in metas):
                continue  # another rank's pass, or finished
            for meta, values in zip(metas, run()):
                if meta["id"] not in store.rows:
                    store.append({**meta, **values, **ev.gap_fractions(values, mode)})
                    bar.update(1)
        bar.close()
        if size == 1:
            return [store.rows[meta["id"]] for metas, _ in plan for meta in metas]
    finally:
        store.close()
    ids = [meta["id"] for metas, _ in plan for meta in metas]
    distributed.barrier()  # every rank file is complete
    if rank == 0:
        _merge_shards(out, header, ev.reference, ids)
    distributed.barrier()  # <out> is merged
    return read_sweep(out)[1]


def _post_scale(base: Model, name: str, post_norm: str) -> torch.Tensor | None:
    """γ_post_eff of a write matrix behind a post-sublayer norm under the residual convention
    (`Model.post_norm_scale`), else None. An edit E_res chosen on diag(γ)·ΔW is written as the raw
    E = diag(γ)⁻¹ E_res, so that the residual stream sees E_res (per-token RMS aside)."""
    if post_norm != "residual":
        return None
    gamma = base.post_norm_scale(name)
    if gamma is not None and float(gamma.abs().min()) == 0.0:
        raise RwasymError(
            f"{name}: its post-sublayer norm has a zero scale, so an edit cannot be expressed in the "
            "residual convention; use post_norm='raw' (--post-norm raw)"
        )
    return gamma


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
) -> list:
    """The passes of a joint sweep (`rwasym.analyses.joint`): per set and rank, every α of every
    target / control edit, ``edits_per_pass`` edits per batched forward."""
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

    plan = []
    for label, specs in sets.items():
        for r in cfg.ranks:
            edits = joint_edits(
                base, specs, delta_of, acts, kinds, r, lambda *parts: _generator(cfg.seed, "joint", *parts), cfg.match
            )
            edits = [
                (desc, {n: (U if (scale := scales[n]) is None else U / scale, V) for n, (U, V) in edit.items()})
                for desc, edit in edits
            ]  # the raw-weight edits
            items = []
            for alpha in cfg.alphas:
                for desc, edit in edits:
                    meta = dict(
                        id=_hash(
                            [
                                "joint",
                                label,
                                r,
                                desc["direction"],
                                desc["index"],
                                desc["target"],
                                float(alpha),
                                cfg.mode,
                                int(cfg.seed),
                            ]
                        ),
                        matrix=label,
                        layer=None,
                        matrix_kind="joint",
                        head=None,
                        **desc,
                        alpha=alpha,
                        mode=cfg.mode,
                        seed=int(cfg.seed),
                        edit_norm=abs(alpha) * desc["u_norm"],
                    )
                    items.append((meta, edit, sign * alpha))
            for i in range(0, len(items), edits_per_pass):
                chunk = items[i : i + edits_per_pass]
                plan.append(([m for m, _, _ in chunk], lambda chunk=chunk: joint_values(ev, host, chunk)))
    return plan


def _rank_path(out: str | os.PathLike, rank: int) -> Path:
    """``<out>.rank<r>.jsonl``: the rows rank r measured (``sweep.jsonl`` → ``sweep.jsonl.rank1.jsonl``)."""
    return Path(f"{out}.rank{rank}.jsonl")


def _shard_files(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    found = out.parent.glob(f"{glob.escape(out.name)}.rank*.jsonl")
    return sorted(
        (p for p in found if p.name[len(out.name) + 5 : -6].isdigit()),
        key=lambda p: int(p.name[len(out.name) + 5 : -6]),
    )


def _finished_rows(out: str | os.PathLike, config: dict) -> dict[str, dict]:
    """id → row of every row already in ``<out>`` or a ``<out>.rank<r>.jsonl`` file (read only;
    a file of another configuration raises as `_Store` does). A resume may use another world size."""
    rows: dict[str, dict] = {}
    for path in [Path(out)] + _shard_files(out):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a half-written line is dropped; its owner warns and repairs it
            header, found = read_sweep(path)
        _require_config(path, header, config)
        rows.update({r["id"]: r for r in found})
    return rows


def _merge_shards(out: str | os.PathLike, config: dict, reference: dict, ids: list[str]) -> None:
    """Write ``<out>`` as an uninterrupted single-process run would have (header, then the rows in
    plan order) from ``<out>`` and the rank files, atomically, then delete the rank files."""
    shards = _shard_files(out)
    rows = _finished_rows(out, config)
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RwasymError(
            f"cannot merge the sweep shards into {str(out)!r}: {len(missing)} of {len(ids)} rows "
            f"are in no rank file (e.g. id {missing[0]}); re-run the same command to finish them"
        )
    header = {"rwasym_sweep": FORMAT, "config_hash": _hash(config), "config": config, "reference": reference}
    tmp = Path(f"{out}.merging")
    with open(tmp, "w") as fh:
        for record in [header] + [rows[i] for i in ids]:
            fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    for path in shards:
        path.unlink()


@dataclass
class SweepSummary:
    """Target-versus-control comparisons, one dict per group × control × metric."""

    rows: list[dict]
    config: dict = field(default_factory=dict)

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps({"config": self.config, "rows": self.rows}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, metrics: Sequence[str] | None = None) -> str:
        lines = [
            "| matrix | head | mode | α | target | control | metric | target mean | control mean | diff [95% CI] | p |",
            "|" + "---|" * 11,
        ]
        for r in self.rows:
            if metrics is None or r["metric"] in metrics:
                head = "" if r["head"] is None else r["head"]
                target = r["target"] if "rank" not in r else f"{r['target']} (rank {r['rank']})"
                lines.append(
                    f"| {r['matrix']} | {head} | {r['mode']} | {r['alpha']:g} | {target} | "
                    f"{r['control']} | {r['metric']} | {r['target_mean']:.4g} | {r['control_mean']:.4g} | "
                    f"{r['diff']:+.4g} [{r['ci_low']:+.4g}, {r['ci_high']:+.4g}] | {r['p_value']:.3g} |"
                )
        return "\n".join(lines)


def _group_order(item: tuple) -> tuple:
    matrix, head, mode, alpha, target, rank = item[0]
    return (matrix, -1 if head is None else head, mode, alpha, target, rank or 0)


def summarize(
    rows: Sequence[dict] | str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    n_boot: int = 2000,
    n_permutations: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> SweepSummary:
    """Per matrix (or joint set) × head × mode × α × target family (× rank for joint rows): target
    rows versus each control kind and
    both pooled ("control"), for every numeric metric (default: all but the row descriptors,
    input_energy included): means, diff = target − control, bootstrap CI, permutation p."""
    if isinstance(rows, (str, os.PathLike)):
        _, rows = read_sweep(rows)
    rows = list(rows)
    if metrics is None:
        metrics = sorted(
            {
                k
                for r in rows
                for k, v in r.items()
                if k not in _DESCRIPTORS and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # joint rows (rwasym.analyses.joint) are grouped by their edit rank too
        groups.setdefault((r["matrix"], r["head"], r["mode"], r["alpha"], r["target"], r.get("rank")), []).append(r)
    out = []
    for (matrix, head, mode, alpha, target, rank), members in sorted(groups.items(), key=_group_order):
        for control in [c for c in CONTROLS if any(m["direction"] == c for m in members)] + ["control"]:
            wanted = CONTROLS if control == "control" else (control,)
            for metric in metrics:
                t = [m[metric] for m in members if m["direction"] == target and m.get(metric) is not None]
                c = [m[metric] for m in members if m["direction"] in wanted and m.get(metric) is not None]
                if not t or not c:
                    continue
                lo, hi = bootstrap_ci(t, c, n_boot, level, seed)
                out.append(
                    dict(
                        matrix=matrix,
                        head=head,
                        mode=mode,
                        alpha=alpha,
                        target=target,
                        **({} if rank is None else {"rank": rank}),
                        control=control,
                        metric=metric,
                        n_target=len(t),
                        n_control=len(c),
                        target_mean=float(np.mean(t)),
                        control_mean=float(np.mean(c)),
                        diff=float(np.mean(t) - np.mean(c)),
                        ci_low=lo,
                        ci_high=hi,
                        p_value=permutation_pvalue(t, c, n_permutations, seed),
                    )
                )
    config = dict(n_boot=n_boot, n_permutations=n_permutations, level=level, seed=seed)
    return SweepSummary(rows=out, config=config)
