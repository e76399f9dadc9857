"""Closed-form rank-1 algebra: u = ΔW v, target and control directions, output-energy matching.

- `closed_form_u(ΔW, v)` = ΔW v: for a unit input direction v, argmin_u ‖ΔW − u vᵀ‖_F = ΔW v, so
  a transplant runs W_base + α u vᵀ on the base and an ablation W_tuned − α u vᵀ on the tuned
  model (the tuned delta along v moved in or taken out). Applying edits to a running model is
  `rwasym.hooks.edits`.
- `directions` builds targets and controls. Input side (v chosen, u = ΔW v): ``pca`` (top input
  principal directions of the base's activations at the matrix input), ``random`` (Haar on the unit
  sphere), ``orthogonal`` (Haar on the unit sphere of the orthogonal complement of the top-k PCA
  subspace). Output side, for write matrices (W_O, W_out), whose output is the residual stream:
  ``prediction`` picks an output direction p among the top prediction directions (left singular
  vectors of diag(γ_final)·W_U) and edits with the least-squares rank-1 component of ΔW along p,
  p pᵀ ΔW = u vᵀ with u = ‖ΔWᵀp‖ p and v = ΔWᵀp / ‖ΔWᵀp‖; its ``random`` / ``orthogonal`` controls
  draw p the same way in R^{d_model}. A control's u keeps its direction and is rescaled to
  ‖u_target‖ of target ``matched_to = j mod k`` (so ‖α u vᵀ‖_F matches, since ‖v‖ = 1);
  `match_output_energy` instead matches the mean-square change of the linear's output,
  ‖u‖² vᵀ M v with M = E[a aᵀ] (high-energy PCA directions otherwise move the model more).
- Rank r (the joint sweep, `rwasym.analyses.joint`): `frame_edit` is the least-squares rank-r
  component of ΔW on an orthonormal frame F (r rows) of one side, ΔW FᵀF (input) or FᵀF ΔW
  (output), as factors (U, V) with edit E = Uᵀ V; `random_frame` draws a Haar frame; `edit_norm`
  and `edit_energy` give ‖E‖_F and the mean-square output change tr(E M Eᵀ) without forming E.
- `spectrum_matched_delta`: a control for the whole delta that keeps ΔW's singular values and
  draws its singular vectors Haar-uniformly (it breaks the output directions an input-side frame
  control ΔW FᵀF keeps).
"""

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._typed_torch import linalg
from .checks import as_float64_matrix, require_vector
from .covariance import RunningCovariance
from .lowrank import LowRankDelta
from .subspaces import complement_basis, haar_frames, pca_basis, prediction_basis

__all__ = [
    "DIRECTION_KINDS",
    "Direction",
    "closed_form_u",
    "directions",
    "edit_energy",
    "edit_norm",
    "frame_edit",
    "match_output_energy",
    "random_frame",
    "spectrum_matched_delta",
    "unit_vector",
]

DIRECTION_KINDS = ("pca", "prediction", "random", "orthogonal", "spectrum")
_TARGET_OF_SIDE = {"input": "pca", "output": "prediction"}


def unit_vector(v: Any, n: int, what: str = "v") -> Tensor:
    """A finite float64 vector of length n with ‖v‖ = 1 (to 1e-6), or RwasymError."""
    v = require_vector(v, n, what)
    norm = float(linalg.vector_norm(v))
    if abs(norm - 1.0) > 1e-6:
        raise RwasymError(
            f"{what} must be a unit vector (‖{what}‖ = 1); got ‖{what}‖ = {norm:.6g}. "
            f"Normalise it first: {what} = {what} / {what}.norm()."
        )
    return v


def closed_form_u(
    delta: Float[Tensor, "n_out n_in"] | LowRankDelta, v: Float[Tensor, " n_in"]
) -> Float[Tensor, " n_out"]:
    """u = ΔW v, the least-squares rank-1 component of ΔW along the unit input direction v.

    For ‖v‖ = 1, ‖ΔW − u vᵀ‖²_F is minimised by u = ΔW v (its gradient −2(ΔW − u vᵀ)v vanishes
    there). Returns float64. Example: ΔW = [[1, 2], [3, 4]], v = e₂ → u = [2, 4] (shape (n_out,)).
    A factored `LowRankDelta` ΔW = s · B A gives u = s · B (A v), O(r (n_out + n_in)).
    """
    if isinstance(delta, LowRankDelta):
        return delta.matvec(unit_vector(v, delta.shape[1], "v"))
    d = as_float64_matrix(delta, "delta (ΔW = W_tuned − W_base)")
    return d @ unit_vector(v, d.shape[1], "v")


@dataclass(frozen=True, eq=False)
class Direction:
    """One edit u vᵀ (α = 1) of a matrix or head block; v is unit so ‖u vᵀ‖_F = ‖u‖.

    kind: pca | prediction | random | orthogonal. side: "input" (v drawn, u = ΔW v) or "output"
    (output direction p drawn, u = ‖ΔWᵀp‖ p, v = ΔWᵀp/‖ΔWᵀp‖). target: the target family the
    direction belongs to or is matched against (pca for input, prediction for output).
    matched_to: for controls rescaled to a target's norm, that target's index. direction: the
    drawn vector (v on the input side, p on the output side), float64.
    """

    kind: str
    index: int
    side: str
    target: str
    u: Float[Tensor, " n_out"]
    v: Float[Tensor, " n_in"]
    direction: Tensor
    matched_to: int | None = None

    @property
    def norm(self) -> float:
        """‖u vᵀ‖_F = ‖u‖ (α = 1)."""
        return float(linalg.vector_norm(self.u))

    def energy(self, cov: Float[Tensor, "n_in n_in"] | RunningCovariance, center: bool = True) -> float:
        """Input energy vᵀ C v (C: the input covariance, e.g. the base's)."""
        C = cov.covariance(center=center) if isinstance(cov, RunningCovariance) else cov.to(torch.float64)
        return float(self.v @ C.cpu() @ self.v)


def _side_vectors(delta: Tensor, drawn: Tensor, side: str, tiny: float) -> tuple[Tensor, Tensor]:
    """(u, v) of the least-squares rank-1 component of ΔW along the drawn unit vector; on the output
    side a component of norm <= ``tiny`` is the zero edit (u = 0, v = e_0)."""
    if side == "input":
        return delta @ drawn, drawn
    w = delta.T @ drawn  # (n_in,)
    norm = linalg.vector_norm(w)
    if float(norm) <= tiny:  # ΔW has no component along p: a zero edit (v arbitrary but unit)
        v = torch.zeros_like(w)
        v[0] = 1.0
        return torch.zeros_like(drawn), v
    return norm * drawn, w / norm


def _subspace(
    side: str, k: int, n: int, cov: Tensor | RunningCovariance | None, unembedding: Tensor | None, what: str
) -> Tensor:
    if side == "input":
        if cov is None:
            raise RwasymError(
                f"{what} directions on the input side need cov= (the input covariance, "
                "a (n_in, n_in) tensor or RunningCovariance of the base's activations)"
            )
        return pca_basis(cov, k).U
    if unembedding is None:
        raise RwasymError(
            f"{what} directions on the output side need unembedding= (d_model, d_vocab), e.g. model.unembedding()"
        )
    if unembedding.shape[0] != n:
        raise RwasymError(
            f"prediction directions live in the residual stream R^{unembedding.shape[0]}, but this matrix's "
            f"output has n_out={n}: the output side is defined for write matrices (W_O, W_out) only; "
            "use pca (input side) directions for read matrices"
        )
    return prediction_basis(unembedding, k).U


def match_output_energy(
    controls: list[Direction],
    targets: list[Direction],
    second_moment: Float[Tensor, "n_in n_in"],
) -> list[Direction]:
    """Rescale each control's u so its edit changes the linear's output as much, on average, as its
    matched target's: ‖u_c‖² · v_cᵀ M v_c = ‖u_t‖² · v_tᵀ M v_t, with M = E[a aᵀ] the uncentered
    second moment of the matrix input (E‖α u vᵀ a‖² = α² ‖u‖² vᵀ M v).

    The default matching (equal ‖u vᵀ‖_F) lets a high-energy target direction move the model more
    than a low-energy control; this one compares directions at equal output change. Controls
    without ``matched_to`` keep their index modulo the number of targets. float64.
    """
    M = as_float64_matrix(second_moment, "second_moment (E[a aᵀ] of the matrix input)")
    if not targets:
        raise RwasymError("match_output_energy needs at least one target direction")

    def effect(d: Direction) -> float:
        return float(d.u.square().sum()) * float(d.v @ M @ d.v)

    out: list[Direction] = []
    for j, d in enumerate(controls):
        m = d.matched_to if d.matched_to is not None else j % len(targets)
        want, have = effect(targets[m]), effect(d)
        if have <= 0.0:
            raise RwasymError(
                f"control {d.kind}[{d.index}] has zero output energy (u = 0: ΔW has no component "
                "along it; or vᵀ M v = 0); it cannot be matched — use match='norm' or more data for M"
            )
        out.append(replace(d, u=d.u * (want / have) ** 0.5, matched_to=m))
    return out


def directions(
    kind: str,
    delta: Float[Tensor, "n_out n_in"],
    count: int,
    *,
    cov: Float[Tensor, "n_in n_in"] | RunningCovariance | None = None,
    unembedding: Float[Tensor, "d_model d_vocab"] | None = None,
    side: str | None = None,
    k: int | None = None,
    target_norms: list[float] | None = None,
    generator: torch.Generator | None = None,
    frames: Float[Tensor, "k n"] | None = None,
) -> list[Direction]:
    """``count`` edit directions of ``kind`` for ΔW (n_out × n_in; a head block works too).

    pca: v_i = i-th input principal direction of ``cov``, u_i = ΔW v_i (side "input").
    prediction: p_i = i-th prediction direction (left singular vector of ``unembedding``),
    u_i v_iᵀ = p_i p_iᵀ ΔW (side "output"; write matrices only).
    random: Haar-uniform unit vector in R^{n_in} (side "input") or R^{n_out} (side "output").
    orthogonal: Haar-uniform unit vector in the orthogonal complement of the top-``k`` target
    subspace (PCA of ``cov`` / prediction subspace) of that side.
    spectrum: the target's own direction (``frames``: the k targets' unit vectors on that side; draw j
    takes frames[j mod k]) applied to R_j = `spectrum_matched_delta`(ΔW) instead of ΔW — ΔW's singular
    values with Haar singular vectors, a fresh R_j per draw: u = R_j v (input side) or u vᵀ = p pᵀ R_j
    (output side). The edit keeps the frame and ΔW's spectrum but not ΔW's own column / row space, the
    structure that input-side random and orthogonal controls (ΔW v vᵀ) inherit.
    target_norms: rescale control j's u to target_norms[j mod len] (its direction is kept), so
    each control edit has its matched target's Frobenius norm; a control on which ΔW has no
    component (‖u‖ ≤ 1e-12·‖ΔW‖_F, e.g. an orthogonal control of a rank-1 ΔW along the top PC)
    stays the zero edit. float64 throughout.
    """
    if kind not in DIRECTION_KINDS:
        raise RwasymError(f"unknown direction kind {kind!r}; choose from {', '.join(DIRECTION_KINDS)}")
    delta = as_float64_matrix(delta, "delta (ΔW)")
    if (
        isinstance(count, bool)
        or not isinstance(count, int)  # pyright: ignore[reportUnnecessaryIsInstance]
        or count < 1
    ):
        raise RwasymError(f"count must be a positive integer; got {count!r}")
    side = {"pca": "input", "prediction": "output"}.get(kind, side)
    if side not in ("input", "output"):
        raise RwasymError(f"{kind} directions need side='input' (v drawn) or side='output' (p drawn); got {side!r}")
    n = delta.shape[1] if side == "input" else delta.shape[0]
    sources = [delta] * count  # the delta each direction takes its component of
    if kind in ("pca", "prediction"):
        drawn = _subspace(side, count, n, cov, unembedding, kind).T  # (count, n)
    elif kind == "spectrum":
        if frames is None or frames.dim() != 2 or frames.shape[1] != n or frames.shape[0] < 1:
            raise RwasymError(
                f"spectrum controls need frames= (the targets' unit vectors on the {side} side, shape (k, {n})); "
                f"got {None if frames is None else tuple(frames.shape)}"
            )
        if generator is None:
            raise RwasymError("spectrum controls need generator= (each draw is a random delta)")
        drawn = torch.stack([frames[j % frames.shape[0]].to(torch.float64) for j in range(count)])
        sources = [spectrum_matched_delta(delta, generator) for _ in range(count)]
    elif kind == "random":
        gauss = torch.randn(count, n, dtype=torch.float64, generator=generator)
        drawn = gauss / linalg.vector_norm(gauss, dim=1, keepdim=True)  # uniform on the sphere
    else:
        if k is None:
            raise RwasymError("orthogonal directions need k= (the dimension of the target subspace to avoid)")
        basis = _subspace(side, k, n, cov, unembedding, kind)
        if n - k < 1:
            raise RwasymError(f"the orthogonal complement of a {k}-dim subspace of R^{n} is empty; use k < {n}")
        drawn = torch.stack([complement_basis(basis, 1, generator)[:, 0] for _ in range(count)])
    out: list[Direction] = []
    # a component this small is rounding: the edit is zero, not rescaled noise
    tiny = 1e-12 * float(linalg.vector_norm(delta))
    for j in range(count):
        u, v = _side_vectors(sources[j], drawn[j], side, tiny)
        matched = None
        if kind == "spectrum":
            matched = j % drawn.shape[0] if frames is None else j % frames.shape[0]
        if target_norms and kind in ("random", "orthogonal", "spectrum"):
            matched = j % len(target_norms)
            norm = float(linalg.vector_norm(u))
            u = u * (target_norms[matched] / norm) if norm > tiny else torch.zeros_like(u)
        out.append(
            Direction(
                kind=kind,
                index=j,
                side=side,
                target=_TARGET_OF_SIDE[side],
                u=u,
                v=v,
                direction=drawn[j].clone(),
                matched_to=matched,
            )
        )
    return out


# -- rank r: edits E = Uᵀ V on an orthonormal frame ------------------------------------------------
def frame_edit(
    delta: Float[Tensor, "n_out n_in"], frame: Float[Tensor, "r n"], side: str
) -> tuple[Float[Tensor, "r n_out"], Float[Tensor, "r n_in"]]:
    """(U, V) of the least-squares rank-r component of ΔW on the orthonormal frame F (rows f_j).

    side "input" (F in R^{n_in}): E = ΔW FᵀF = Σ_j (ΔW f_j) f_jᵀ, so U = F ΔWᵀ, V = F — rank 1 is
    `closed_form_u`'s u vᵀ. side "output" (F in R^{n_out}): E = FᵀF ΔW = Σ_j f_j (ΔWᵀ f_j)ᵀ, so
    U = F, V = F ΔW — rank 1 is the ``prediction`` edit p pᵀ ΔW. E = Uᵀ V in both (argmin of
    ‖ΔW − E‖_F over E with that row / column space). The rows of V need not be unit. float64.
    """
    delta = as_float64_matrix(delta, "delta (ΔW)")
    F = as_float64_matrix(frame, "frame")
    n = delta.shape[1] if side == "input" else delta.shape[0]
    if side not in ("input", "output") or F.shape[1] != n:
        raise RwasymError(
            f"frame_edit needs side 'input' (frame rows in R^{delta.shape[1]}) or 'output' (rows in "
            f"R^{delta.shape[0]}); got side={side!r} and a frame of shape {tuple(F.shape)}"
        )
    gram = F @ F.T
    if float((gram - torch.eye(F.shape[0], dtype=torch.float64)).abs().max()) > 1e-8:
        raise RwasymError(
            "frame_edit needs an orthonormal frame (F Fᵀ = I); orthonormalise its rows first (torch.linalg.qr(F.T).Q.T)"
        )
    return (F @ delta.T, F) if side == "input" else (F, F @ delta)


def random_frame(n: int, r: int, generator: torch.Generator | None = None) -> Float[Tensor, "r n"]:
    """A Haar-uniform orthonormal r-frame of R^n as rows (sign-fixed QR of a Gaussian), float64."""
    if not 1 <= r <= n:
        raise RwasymError(f"a frame of {r} orthonormal vectors needs 1 <= r <= n = {n}")
    return haar_frames(1, n, r, generator)[0].T


def edit_norm(U: Float[Tensor, "r n_out"], V: Float[Tensor, "r n_in"]) -> float:
    """‖Uᵀ V‖_F = (Σ_ij (U Uᵀ)_ij (V Vᵀ)_ij)^½, without forming the n_out × n_in edit."""
    return max(float(((U @ U.T) * (V @ V.T)).sum()), 0.0) ** 0.5


def edit_energy(
    U: Float[Tensor, "r n_out"], V: Float[Tensor, "r n_in"], second_moment: Float[Tensor, "n_in n_in"]
) -> float:
    """The mean-square output change E‖E a‖² = tr(E M Eᵀ) of the edit E = Uᵀ V, with M = E[a aᵀ]
    the uncentered second moment of the input: Σ_ij (U Uᵀ)_ij (V M Vᵀ)_ij."""
    M = as_float64_matrix(second_moment, "second_moment (E[a aᵀ] of the matrix input)")
    return max(float(((U @ U.T) * (V @ M @ V.T)).sum()), 0.0)


def spectrum_matched_delta(
    delta: Float[Tensor, "n_out n_in"], generator: torch.Generator
) -> Float[Tensor, "n_out n_in"]:
    """A random delta with ΔW's singular values and Haar-random singular vectors, float64.

    R = U diag(σ) Vᵀ, σ = the r = min(n_out, n_in) singular values of ΔW, U (n_out, r) and V (n_in, r)
    independent Haar frames from `haar_frames` (U drawn first, then V, from ``generator``). R keeps
    ΔW's spectrum, so ‖R‖_F = ‖ΔW‖_F and the stable and effective ranks, while its left and right
    singular subspaces are uniform: the law of R is invariant under R → O₁ R O₂ᵀ for orthogonal O₁,
    O₂, and E[R] = 0. The control that breaks ΔW's input and output structure (DESIGN "Causal
    tests: compare edits at equal effect").
    """
    d = as_float64_matrix(delta, "delta (ΔW = W_tuned − W_base)")
    n_out, n_in = d.shape
    r = min(n_out, n_in)
    sigma = linalg.svdvals(d)  # (r,)
    U = haar_frames(1, n_out, r, generator)[0]  # (n_out, r)
    V = haar_frames(1, n_in, r, generator)[0]  # (n_in, r)
    return (U * sigma) @ V.T
