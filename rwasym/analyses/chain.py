"""Stage chains: the consecutive weight deltas of a training chain (base → SFT → DPO → …) measured in one frame.

For checkpoints A₀, A₁, …, A_S of one architecture, stage s is ΔW_s = W_{A_s} − W_{A_{s−1}} and the total is
T = W_{A_S} − W_{A_0} = Σ_s ΔW_s (exactly, up to one rounding per stage in float64). Every stage and the total are
probed (`rwasym.probe`, ``delta="given"``) against the **same** subspaces: the activation statistics of A₀ on the
given data (captured once) and A₀'s prediction subspace, so stages are comparable row by row (``frame="each"``:
each stage in the subspaces of the checkpoint it starts from instead; rows carry ``frame``).

Per studied matrix:

- **norm shares** ``share_s = ‖ΔW_s‖²_F / ‖T‖²_F`` (they sum to one when the stages' deltas are mutually
  orthogonal in the Frobenius inner product) and **projection shares** ``projection_s = ⟨ΔW_s, T⟩_F / ‖T‖²_F``
  (they sum to one always, since Σ_s ΔW_s = T; a negative one is a stage that undid part of the total);
- **principal angles** between every two stages' top-r singular subspaces, on the input side (row spaces, the
  right singular vectors V: does a later stage read where an earlier one read?) and the output side (column
  spaces, the left singular vectors U: does it write where the other wrote?). The cosines are the singular values
  of U_aᵀU_b. Their summary ``overlap = ‖U_aᵀU_b‖²_F / r`` (mean cos²) is the probe's fraction f of
  ΔW := U_aᵀ in the subspace U_b, so its Haar null is exact (`rwasym.math.fraction.null_moments`):
  E = r/n and Var = 2(n−r)² / (n²(n+2)(n−1)) for a subspace of dimension r in R^n; rows carry ``z``. r is
  min(``angle_rank``, the numerical rank of both deltas).

Memory: the chain reads each matrix from the stage checkpoints when it needs it (Hugging Face folders through
`rwasym.models.checkpoint.CheckpointWeights`, never loaded whole; other sources loaded one at a time would be
resident, so folders are the scalable form). At a time it holds A₀ (loaded, for the capture), T and one stage's
ΔW of one matrix, and the top-r factors of every stage of that matrix.
"""

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .._progress import quiet
from ..errors import RwasymError
from ..hooks.activations import capture
from ..math.checks import linalg_threads
from ..math.fraction import null_moments
from ..models import Model, check_same_architecture, load
from ..models.audit import unchanged_between
from ..models.checkpoint import CheckpointWeights
from ..models.deltas import WeightDeltas
from ..models.loading import checkpoint_folder
from .options import option, resolve_config
from .probe import ProbeConfig, probe, probe_sites
from .readouts import delta_directions

__all__ = ["ChainConfig", "ChainResult", "chain", "principal_overlap"]


@dataclass(frozen=True)
class ChainConfig:
    """What a chain measures; the ``rwasym chain`` flags derive from these fields."""

    k: int = option(8, "the probe's subspace dimension k (the same subspaces of the first checkpoint for every stage)")
    angle_rank: int = option(8, "r: each stage's top-r singular subspaces compared across stages (principal angles)")
    matrices: str | Sequence[str] | None = option(
        None, "registry glob such as 'blocks.*.attn.W_Q' (default every matrix)", type=str
    )
    subspaces: str = option("activation,prediction", "the probe's subspaces (rwasym.ProbeConfig.subspaces)")
    null_samples: int = option(200, "Haar subspaces drawn for each probe row's null percentile")
    heads: bool = option(False, "per-head probe rows besides whole matrices")
    curves: bool = option(False, "r(k) curves in the probe rows")
    total: bool = option(True, "probe the total T = W_last − W_first too (a row set labelled 'total')")
    frame: str = option(
        "first",
        "whose subspaces each stage's probe rows use: first (the first checkpoint's, for every stage: comparable "
        "row by row) or each (the checkpoint the stage starts from: one more load and capture per stage)",
        choices=("first", "each"),
    )
    batch_size: int = option(16, "sequences per forward pass of the capture")
    max_tokens: int | None = option(None, "tokens of the activation capture (default all)", type=int)
    seed: int = option(0, "seeds the probe's Haar draws")

    def __post_init__(self) -> None:
        if self.frame not in ("first", "each"):
            raise RwasymError(
                f"frame={self.frame!r}: choose first (every stage in the first checkpoint's subspaces) or each"
            )
        for name in ("k", "angle_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RwasymError(f"{name}={value!r} must be a positive integer (e.g. 8)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class ChainResult:
    """Stage labels, probe rows (each with its ``stage``), norm / projection shares and principal-angle rows."""

    stages: list[str]
    probe_rows: list[dict] = field(default_factory=list)
    shares: list[dict] = field(default_factory=list)
    angles: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dicts(self, table: str = "shares") -> list[dict]:
        """One table as dicts: ``shares``, ``angles`` or ``probe``."""
        tables = {"shares": self.shares, "angles": self.angles, "probe": self.probe_rows}
        if table not in tables:
            raise RwasymError(f"table={table!r}: choose shares, angles or probe")
        return [dict(r) for r in tables[table]]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        import json

        doc = dict(
            stages=self.stages, config=self.config, shares=self.shares, angles=self.angles, probe=self.probe_rows
        )
        text = json.dumps(doc, indent=1)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def to_dataframe(self, table: str = "shares"):
        """One table as a pandas DataFrame: ``shares``, ``angles`` or ``probe``."""
        import pandas as pd

        return pd.DataFrame(self.to_dicts(table))

    def kind_shares(self) -> list[dict]:
        """Mean norm and projection share per matrix kind and stage, over the layers whose total changed (T ≠ 0;
        an untouched matrix has no shares)."""
        groups: dict = {}
        for r in self.shares:
            if r["share"] == r["share"]:  # not NaN: T ≠ 0
                groups.setdefault((r["kind"], r["stage"]), []).append(r)
        return [
            dict(
                kind=kind,
                stage=stage,
                share=sum(r["share"] for r in rows) / len(rows),
                projection=sum(r["projection"] for r in rows) / len(rows),
                matrices=len(rows),
            )
            for (kind, stage), rows in groups.items()
        ]

    def trajectory(self) -> list[dict]:
        """Per matrix kind, after each stage: the mean over layers of the cumulative projection
        Σ_{s' ≤ s} ⟨ΔW_s', T⟩/‖T‖² (the part of the total change reached along T; 1 after the last stage), from the
        share rows (matrices with T ≠ 0 only)."""
        out = []
        by_kind: dict = {}
        for r in self.shares:
            if r["share"] == r["share"]:
                by_kind.setdefault(r["kind"], {}).setdefault(r["matrix"], []).append(r)
        for kind, matrices in by_kind.items():
            for s, stage in enumerate(self.stages):
                reached = [sum(rows[j]["projection"] for j in range(s + 1)) for rows in matrices.values()]
                out.append(dict(kind=kind, stage=stage, step=s + 1, reached=sum(reached) / len(reached)))
        return out

    def kind_angles(self) -> list[dict]:
        """Mean overlap and z per matrix kind, side and stage pair (over layers)."""
        groups: dict = {}
        for r in self.angles:
            groups.setdefault((r["kind"], r["side"], r["stage_a"], r["stage_b"]), []).append(r)
        return [
            dict(
                kind=kind,
                side=side,
                stage_a=a,
                stage_b=b,
                overlap=sum(r["overlap"] for r in rows) / len(rows),
                null_mean=sum(r["null_mean"] for r in rows) / len(rows),
                z=sum(r["z"] for r in rows) / len(rows),
                matrices=len(rows),
            )
            for (kind, side, a, b), rows in groups.items()
        ]

    def summary(self) -> str:
        lines = [f"stages: {' | '.join(self.stages)}", "mean share of ‖T‖² per kind (norm / projection):"]
        for r in self.kind_shares():
            lines.append(f"  {r['kind']:7s} {r['stage']:>24s}  {r['share']:6.3f} / {r['projection']:6.3f}")
        lines.append("mean overlap of top-r subspaces between stages (Haar mean in brackets):")
        for r in self.kind_angles():
            lines.append(
                f"  {r['kind']:7s} {r['side']:6s} {r['stage_a']} vs {r['stage_b']}: {r['overlap']:.3f} "
                f"({r['null_mean']:.3f}), z {r['z']:.1f}"
            )
        return "\n".join(lines)


def principal_overlap(U_a: torch.Tensor, U_b: torch.Tensor) -> dict:
    """Principal angles between span(U_a) and span(U_b) (orthonormal n × r columns): cosines = singular values of
    U_aᵀU_b (descending, clamped to [0, 1]), angles in degrees, overlap = Σ cos² / r with its exact Haar null
    (E = r/n; `null_moments` of ΔW := U_aᵀ on the input side) and z = (overlap − E) / std."""
    n, r = U_a.shape
    cos = torch.linalg.svdvals(U_a.T @ U_b).clamp(0.0, 1.0)
    overlap = float((cos**2).sum()) / r
    null = null_moments(U_a.T.contiguous(), "input", U_b.shape[1])
    z = (overlap - null.mean) / null.std if null.std > 0 else float("nan")
    return dict(
        n=n,
        r=r,
        cosines=[float(c) for c in cos],
        angles_deg=[float(a) for a in torch.rad2deg(torch.arccos(cos))],
        overlap=overlap,
        null_mean=null.mean,
        null_std=null.std,
        z=z,
    )


def _weights(source: Any) -> Any:
    """A stage's weights (anything with ``weight(name)``): a Hugging Face folder (or hub snapshot) read from its
    files when a matrix is looked up (`CheckpointWeights`), anything else loaded (`rwasym.load`)."""
    if isinstance(source, Model):
        return source
    folder = checkpoint_folder(source)
    return CheckpointWeights(folder) if folder is not None else load(source)


def _expand(items: list) -> tuple[list, set[int]]:
    """A source that is a training folder (``step_*`` checkpoints, `rwasym.analyses.companion.checkpoint_folders`)
    becomes its checkpoints in step order, labelled ``"<label> step N"``: a stage given as a series is a trajectory.
    Returns the items and the positions that came from a series."""
    from .companion import checkpoint_folders

    out, series = [], set()
    for label, source in items:
        path = Path(os.fspath(source)).expanduser() if isinstance(source, (str, os.PathLike)) else None
        if path is not None and path.is_dir() and not (path / "config.json").exists() and any(path.glob("step_*")):
            for step, folder in sorted(checkpoint_folders(path).items()):
                series.add(len(out))
                out.append((f"{label} step {step}", folder))
        else:
            out.append((label, source))
    return out, series


def _loaded(source: Any) -> Model:
    return source if isinstance(source, Model) else load(source)


def chain(
    checkpoints: Sequence[Any] | Mapping[str, Any],
    data: Any,
    config: ChainConfig | None = None,
    *,
    progress: bool | None = None,
    **overrides: Any,
) -> ChainResult:
    """Measure every stage of a chain of checkpoints in the first checkpoint's subspaces (module docstring).

    checkpoints: two or more sources in training order (anything `rwasym.load` accepts; Hugging Face folders and
    hub names are read matrix by matrix), or {label: source}; a training folder of ``step_*`` checkpoints stands for
    its steps in order (a stage given as a trajectory; its step 0, identical to the checkpoint before, is left out
    with a warning). data: the corpus of the first checkpoint's
    activation statistics (anything `rwasym.hooks.activations.capture` accepts). Refused with RwasymError: fewer
    than two checkpoints, different architectures, and two consecutive checkpoints that are identical (a stage
    with ΔW = 0 everywhere; `rwasym audit` says more).
    """
    cfg: ChainConfig = resolve_config(ChainConfig, config, overrides, "chain")
    items = (
        list(checkpoints.items())
        if isinstance(checkpoints, Mapping)
        else [
            (os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"checkpoint {i}", s)
            for i, s in enumerate(checkpoints)
        ]
    )
    if not isinstance(checkpoints, Mapping):
        short = [os.path.basename(os.path.normpath(label)) or label for label, _ in items]
        if len(set(short)) == len(short):  # folder names label the stages; full paths when two share a name
            items = [(name, source) for name, (_, source) in zip(short, items)]
    items, series = _expand(items)
    if len(items) < 2:
        raise RwasymError("a chain needs at least two checkpoints in training order (base, then each stage)")
    labels, sources = [label for label, _ in items], [s for _, s in items]
    drop = []
    for i, _, identical in unchanged_between(sources):
        if identical and i in series:  # a run's step 0 is saved before its first update: its start again
            drop.append(i)
        elif identical:
            raise RwasymError(
                f"checkpoints {labels[i - 1]!r} and {labels[i]!r} are identical (every tensor equal): that stage "
                "changed nothing; check the chain's uploads or revisions (`rwasym audit` lists every finding)"
            )
    if drop:
        warnings.warn(
            f"rwasym.chain: left out {', '.join(labels[i] for i in drop)}: identical to the checkpoint before it "
            "(a training run's step 0)",
            stacklevel=2,
        )
        labels = [x for i, x in enumerate(labels) if i not in drop]
        sources = [x for i, x in enumerate(sources) if i not in drop]
        if len(sources) < 2:
            raise RwasymError("after leaving out the series' step 0, fewer than two checkpoints remain in the chain")
    first = _loaded(sources[0])
    specs = first.matrices(cfg.matrices)
    if not specs:
        raise first.unmatched(cfg.matrices)
    names = [s.name for s in specs]
    weights = [first] + [_weights(s) for s in sources[1:]]
    for w in weights[1:]:
        check_same_architecture(first, w if isinstance(w, Model) else w.model)
    stage_labels = [f"{labels[i - 1]} → {labels[i]}" for i in range(1, len(labels))]
    stages = [WeightDeltas(weights[i - 1], weights[i], names) for i in range(1, len(weights))]

    # one capture of the first checkpoint: every stage is probed against the same statistics
    probe_cfg = ProbeConfig(
        k=cfg.k,
        null_samples=cfg.null_samples,
        matrices=cfg.matrices,
        heads=cfg.heads,
        curves=cfg.curves,
        subspaces=cfg.subspaces,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        delta="given",
    )

    def statistics(model: Model):
        sites = list(probe_sites(model, specs, False))
        return capture(
            model, data, sites=sites, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, progress=progress
        )

    acts = statistics(first)
    probe_rows = []
    runs = [(label, deltas, i) for i, (label, deltas) in enumerate(zip(stage_labels, stages))]
    if cfg.total:
        runs.append(("total", WeightDeltas(weights[0], weights[-1], names), 0))
    for label, deltas, start in tqdm(runs, desc="chain stages", disable=quiet(progress)):
        # frame "each": a stage in the subspaces of the checkpoint it starts from (loaded, captured, then freed)
        frame = first if cfg.frame == "first" or start == 0 else _loaded(sources[start])
        frame_acts = acts if frame is first else statistics(frame)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rwasym.probe: .* have ΔW = 0")  # listed in the shares
            result = probe(frame, None, None, probe_cfg, activations=frame_acts, deltas=deltas, progress=False)
        probe_rows += [{"stage": label, "frame": labels[0 if frame is first else start], **row} for row in result.rows]
        del frame_acts

    shares, angles = [], []
    with linalg_threads(1):
        for spec in tqdm(specs, desc="chain shares and angles", disable=quiet(progress)):
            total = weights[-1].weight(spec.name) - weights[0].weight(spec.name)
            t2 = float((total * total).sum())
            factors = []
            for label, deltas in zip(stage_labels, stages):
                d = deltas[spec.name]
                d2, inner = float((d * d).sum()), float((d * total).sum())
                base = dict(matrix=spec.name, kind=spec.kind, layer=spec.layer, stage=label, norm2=d2)
                shares.append(
                    {
                        **base,
                        "share": d2 / t2 if t2 > 0 else float("nan"),
                        "projection": inner / t2 if t2 > 0 else float("nan"),
                    }
                )
                factors.append(delta_directions(d, cfg.angle_rank)[1:3] if d2 > 0 else None)  # (U, V), rank-cut
                del d
            del total
            for a in range(len(stages)):
                for b in range(a + 1, len(stages)):
                    if factors[a] is None or factors[b] is None:
                        continue
                    (Ua, Va), (Ub, Vb) = factors[a], factors[b]
                    r = min(Ua.shape[1], Ub.shape[1])
                    for side, A, B in (("input", Va, Vb), ("output", Ua, Ub)):
                        angles.append(
                            dict(
                                matrix=spec.name,
                                kind=spec.kind,
                                layer=spec.layer,
                                side=side,
                                stage_a=stage_labels[a],
                                stage_b=stage_labels[b],
                                **principal_overlap(A[:, :r], B[:, :r]),
                            )
                        )
    record = dict(cfg.to_dict(), checkpoints=labels, n_tokens=acts.n_tokens)
    return ChainResult(stages=stage_labels, probe_rows=probe_rows, shares=shares, angles=angles, config=record)
