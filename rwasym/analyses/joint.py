"""Joint edits: one closed-form edit in every matrix of a set at once (the sweep's ``joint`` mode).

A rank-1 transplant into a single matrix of a 30-layer model moves almost nothing measurable; the
tuned model's behaviour lives in many matrices together. A joint edit of a matrix set S (every
layer's W_Q, every read matrix, every write matrix, or any globs) at rank r is, for all m ∈ S at once,

    transplant:  W_m = W_base,m + α E_m        ablate:  W_m = W_tuned,m − α E_m

with E_m = the least-squares rank-r component of ΔW_m = W_tuned,m − W_base,m on an orthonormal
r-frame F_m (`rwasym.math.rank1.frame_edit`: ΔW FᵀF on the input side, FᵀF ΔW on the output side).

- Target i (i < c, the target count of the direction spec): F_m = target directions i·r … (i+1)·r − 1
  of matrix m — the top input principal directions of the base's activations at its input (``pca``),
  or, for write matrices when ``prediction`` is asked, the top prediction directions (left singular
  vectors of the effective unembedding diag(γ_final)·W_U, output side). r = 1, i = 0 is the top
  direction of every matrix; r = 8, i = 0 its top-8 subspace.
- Control j, drawn per matrix on the same side as its target: ``random`` (a Haar r-frame),
  ``orthogonal`` (a Haar r-frame in the orthogonal complement of the matrix's top c·r target
  subspace), or ``spectrum`` (target j mod c's own frame applied to a fresh random delta with ΔW_m's
  singular values and Haar singular vectors, `rwasym.math.rank1.spectrum_matched_delta`: it keeps the
  frame and the spectrum, not ΔW's own column / row space), or ``output_random`` (a Haar r-frame on
  the matrix's output side, FᵀF ΔW, whatever the target's side: for read matrices it keeps ΔW's
  input space but not its output structure), or ``donor`` (target j mod c's own frame applied to a donor run's
  ΔW_m = W_donor,m − W_base,m, another seed or run from the same base: where the target points, with another
  run's change behind it), rescaled per matrix so that ‖E_m‖_F
  (``match="norm"``, also the start of ``match="kl"``) or the mean-square output change
  tr(E_m M_m E_mᵀ), M_m = E[a aᵀ] of the base's input (``match="output"``), equals that of target
  j mod c of the same matrix. Every matrix of a control edit is thus matched to its own target.

Matrices whose ΔW is zero are left out of a set. One row per (set, rank, direction, index, α), keyed
like the per-matrix rows (`rwasym.analyses.sweep`): ``matrix`` is the set's label, ``rank`` r,
``n_matrices`` |S|, ``u_norm`` (Σ_m ‖E_m‖²_F)^½ at α = 1, ``output_energy`` Σ_m tr(E_m M_m E_mᵀ).
Edits are applied by forward hooks (all matrices of a set together, k edits per batched forward),
which equals writing the weights to float rounding and leaves the host unchanged.
"""

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import RwasymError
from ..math.rank1 import edit_energy, edit_norm, frame_edit, random_frame, spectrum_matched_delta
from ..math.subspaces import complement_basis, pca_basis, prediction_basis
from ..models import MatrixSpec, Model

__all__ = ["KEYWORDS", "matrix_set", "joint_edits"]

KEYWORDS = {
    "read": "every read matrix (W_Q, W_K, W_V, W_in, W_gate)",
    "write": "every write matrix (W_O, W_out)",
    "all": "every matrix",
}


def matrix_set(model: Model, entry: str) -> list[MatrixSpec]:
    """The matrices of one set: ``read``, ``write``, ``all``, or registry globs joined by ``+``
    (``blocks.*.attn.W_Q+blocks.*.attn.W_K``), in registry order."""
    entry = str(entry).strip()
    if entry in KEYWORDS:
        specs = [s for s in model.matrices() if entry == "all" or s.side == entry]
    else:
        globs = [g.strip() for g in entry.split("+") if g.strip()]
        specs = model.matrices(globs) if globs else []
    if not specs:
        if entry in KEYWORDS:
            raise RwasymError(f"the matrix set {entry!r} ({KEYWORDS[entry]}) is empty for this model")
        raise model.unmatched(entry)
    return specs


def joint_edits(
    base: Model,
    specs: list[MatrixSpec],
    delta_of: Callable[[str], torch.Tensor],
    stats: Any,
    kinds: list[tuple[str, int]],
    rank: int,
    seed_generator: Callable[..., torch.Generator],
    match: str = "norm",
    donor_of: Callable[[str], torch.Tensor] | None = None,
) -> list[tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """(row descriptors, {matrix: (U, V)} at α = 1) of every joint edit of one set at one rank.

    delta_of(name): ΔW of a matrix (float64, n_out × n_in); stats: the base's `ActivationStats` at
    the matrices' inputs; kinds: the parsed direction spec; seed_generator(*parts): the seeded
    generator of one (matrix, rank, kind). Order: targets i = 0 … c − 1, then each control kind's
    draws j = 0 … (module docstring). donor_of(name): a donor run's ΔW of a matrix (the ``donor`` family)."""
    counts = dict(kinds)
    if "pca" in counts and "prediction" in counts and counts["pca"] != counts["prediction"]:
        raise RwasymError(
            f"a joint sweep uses one target family per set (pca for read matrices, prediction for "
            f"write ones), so pca and prediction need the same count; got {counts}"
        )
    c = counts.get("pca", counts.get("prediction"))
    if c is None:
        raise RwasymError(
            f"kinds {kinds!r} has no target kind: add ('pca', k) (read side) or ('prediction', k) (write side); "
            "controls are matched to the targets"
        )
    controls = [
        (kind, counts[kind])
        for kind in ("random", "orthogonal", "spectrum", "output_random", "donor")
        if kind in counts
    ]
    if "donor" in counts and donor_of is None:
        raise RwasymError("the donor control family needs donor_of (a donor run's ΔW: control_delta=)")
    pred_basis: torch.Tensor | None = None
    per_matrix: dict[str, dict[str, Any]] = {}  # name → {"edits": [(U, V), ...], "M": second moment}
    used: set[str] = set()
    for spec in specs:
        delta = delta_of(spec.name)
        if float(delta.abs().max()) == 0.0:
            continue  # a frozen matrix: nothing to transplant or ablate
        target = "prediction" if spec.side == "write" and "prediction" in counts else "pca"
        if target == "pca" and "pca" not in counts:
            continue  # prediction only: read matrices have no output-side target
        side, n = ("input", spec.n_in) if target == "pca" else ("output", spec.n_out)
        if c * rank >= n:
            raise RwasymError(
                f"{spec.name}: {c} target(s) of rank {rank} need c·r = {c * rank} < {n} directions on "
                f"its {side} side (the orthogonal control lives in the complement); lower the rank or "
                "the target count"
            )
        stat = stats.for_matrix(spec.name)
        M = stat.second_moment()
        if target == "pca":
            basis = pca_basis(stat.covariance(), c * rank).U  # (n_in, c·r)
        else:
            if pred_basis is None:
                pred_basis = prediction_basis(base.unembedding(), c * rank).U  # (d_model, c·r), computed once
            basis = pred_basis
        used.add(target)
        edits = []
        for i in range(c):
            U, V = frame_edit(delta, basis[:, i * rank : (i + 1) * rank].T, side)
            edits.append((U, V))
        targets = [(edit_norm(U, V), edit_energy(U, V, M)) for U, V in edits]
        for kind, count in controls:
            g = seed_generator(spec.name, rank, target, kind)
            for j in range(count):
                source, frame_side = delta, side
                if kind == "spectrum":  # the target's own frame on a random delta with ΔW's spectrum
                    F, source = basis[:, (j % c) * rank : (j % c + 1) * rank].T, spectrum_matched_delta(delta, g)
                elif kind == "donor":  # the target's own frame on another run's ΔW of this matrix
                    assert donor_of is not None  # checked above
                    F, source = basis[:, (j % c) * rank : (j % c + 1) * rank].T, donor_of(spec.name)
                    if float(source.abs().max()) == 0.0:
                        raise RwasymError(
                            f"{spec.name}: the donor run left this matrix unchanged (its ΔW is zero), so a donor "
                            "control edit of it is zero; choose a donor that trained it, or leave donor out"
                        )
                elif kind == "output_random":  # a Haar frame on the output side whatever the target's side
                    F, frame_side = random_frame(spec.n_out, rank, g), "output"
                elif kind == "random":
                    F = random_frame(n, rank, g)
                else:
                    F = complement_basis(basis, rank, g).T
                U, V = frame_edit(source, F, frame_side)
                want, have = (
                    (targets[j % c][0], edit_norm(U, V))
                    if match == "norm"
                    else (targets[j % c][1] ** 0.5, edit_energy(U, V, M) ** 0.5)
                )
                if have > 0.0:
                    U = U * (want / have)
                elif match == "output":
                    raise RwasymError(
                        f"{spec.name}: a {kind} control edit has zero output energy; it cannot be "
                        "matched — use match='norm' or more data for the input second moment"
                    )
                edits.append((U, V))
        per_matrix[spec.name] = dict(edits=edits, M=M)
    if not per_matrix:
        return []
    labels = [("target", i, None) for i in range(c)] + [
        (kind, j, j % c) for kind, count in controls for j in range(count)
    ]
    target_name = "+".join(sorted(used))
    side = {"pca": "input", "prediction": "output"}.get(target_name, "mixed")
    out = []
    for e, (kind, index, matched) in enumerate(labels):
        edit = {name: m["edits"][e] for name, m in per_matrix.items()}
        norm2 = sum(edit_norm(U, V) ** 2 for U, V in edit.values())
        energy = sum(edit_energy(U, V, per_matrix[name]["M"]) for name, (U, V) in edit.items())
        out.append(
            (
                dict(
                    side=side,
                    direction=target_name if kind == "target" else kind,
                    index=index,
                    target=target_name,
                    matched_to=matched,
                    rank=rank,
                    n_matrices=len(edit),
                    u_norm=norm2**0.5,
                    output_energy=energy,
                ),
                edit,
            )
        )
    return out


def scaled(
    edit: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The edit with every U multiplied by ``scale`` (α, and −1 in ablate mode)."""
    return {name: (scale * U, V) for name, (U, V) in edit.items()}


def iter_values(ev: Any, host: Model, chunk: list) -> Iterator[dict]:
    """Metrics of each (meta, edit, scale) of a chunk, one batched forward per stream."""
    return ev.iter_joint(host, [scaled(edit, s) for _, edit, s in chunk])
