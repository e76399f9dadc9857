"""Post-training SVD comparison of a base and a tuned weight (arXiv 2509.17866).

The paper's finding: post-training (SFT/RL) leaves a weight W = U Sigma V^T as
W' ~ (U R_U) (c Sigma) (V R_V)^T — near-uniform scaling of the singular values and one
*consistent* orthogonal rotation of the left and right singular vectors (R_U ~ R_V); rebuilding
the tuned weight with the rotations made inconsistent is catastrophic for behaviour.

Pure functions on tensors, float64 on CPU whatever the input dtype. Axis names:
``n_out n_in`` a weight acting as y = W a, ``k`` the number of top singular directions.

Sign convention: singular vectors are defined up to a joint sign flip (u_i, v_i) -> (-u_i, -v_i).
Every tuned pair is flipped, jointly, so that u_i . u'_i >= 0; W' = sum_i sigma'_i u'_i v'_i^T
is unchanged by that, and identical inputs give R_U = R_V = I exactly.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._common import as_f64, fit_line, jsonable
from ._typed_torch import linalg, tolist
from .subspaces import haar_frames

REBUILD_MODES = (
    "tuned",  # U' Sigma' V'^T: reproduces W_tuned (sanity check)
    "tuned_rotation_base_sigma",  # U' Sigma V'^T: tuned rotations, base singular values
    "tuned_scaling_only",  # U Sigma' V^T: tuned singular values, base vectors
    "identity_rotation",  # alias of tuned_scaling_only (R_U = R_V = I)
    "break_consistency",  # U' Sigma' (V Q)^T, Q Haar-random: right rotation made inconsistent
)
_ZERO_RTOL = 1e-12  # a singular value <= rtol * sigma_1 counts as zero


def _svd_pair(W_base: object, W_tuned: object, fn: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Thin SVDs of both matrices with the tuned signs aligned to the base (see module doc):
    (U, S, V, U', S', V'), V and V' as (n_in, r)."""
    A = as_f64(W_base, "W_base", fn)
    B = as_f64(W_tuned, "W_tuned", fn)
    if A.shape != B.shape:
        raise RwasymError(
            f"{fn}: W_base has shape {tuple(A.shape)} but W_tuned has shape "
            f"{tuple(B.shape)}; pass the same matrix of two checkpoints of one "
            f"architecture (both stored as n_out x n_in)"
        )
    U, S, Vh = linalg.svd(A, full_matrices=False)  # (n_out, r), (r,), (r, n_in)
    U2, S2, Vh2 = linalg.svd(B, full_matrices=False)
    sign = torch.sign((U * U2).sum(dim=0))  # (r,)
    sign[sign == 0] = 1.0
    return U, S, Vh.T, U2 * sign, S2, Vh2.T * sign  # V, V' as (n_in, r)


@dataclass(frozen=True, eq=False)
class PostTrainingSVD:
    """Scaling and rotation statistics of W_tuned against W_base over the top-k directions.

    ratio_*: statistics of sigma'_i / sigma_i (std is the population std);
    fit_*: least squares log sigma' = slope * log sigma + intercept (NaN slope/r2 if all
    sigma_i are equal); consistency = ||R_U - R_V||_F / sqrt(2k) (0 = one shared rotation,
    ~1 for unrelated random rotations, at most sqrt(2)); orth_defect_* = ||R^T R - I||_F
    (0 when the top-k subspaces of both matrices coincide); diag_dominance_* = mean |diag R|.
    R_U = U_k^T U'_k and R_V = V_k^T V'_k are kept as (k x k) float64 tensors.
    """

    k: int
    n_out: int
    n_in: int
    ratio_mean: float
    ratio_std: float
    ratio_min: float
    ratio_max: float
    fit_slope: float
    fit_intercept: float
    fit_r2: float
    consistency: float
    orth_defect_u: float
    orth_defect_v: float
    diag_dominance_u: float
    diag_dominance_v: float
    sigma_base: tuple[float, ...]
    sigma_tuned: tuple[float, ...]
    R_U: Tensor
    R_V: Tensor

    def to_dict(self, include_rotations: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("R_U", "R_V")}
        if include_rotations:
            d["R_U"], d["R_V"] = self.R_U, self.R_V
        return jsonable(d)


def post_training_svd(
    W_base: Float[Tensor, "n_out n_in"],
    W_tuned: Float[Tensor, "_n_out _n_in"],
    k: int | None = None,
) -> PostTrainingSVD:
    """Compare the SVDs of W_base = U Sigma V^T and W_tuned = U' Sigma' V'^T (arXiv 2509.17866).

    Over the top ``k`` singular directions (default all r = min(n_out, n_in)):
    scaling — ratios sigma'_i / sigma_i and the log-log fit log sigma' = a log sigma + b;
    rotation — R_U = U_k^T U'_k, R_V = V_k^T V'_k (signs aligned as in the module docstring),
    consistency ||R_U - R_V||_F / sqrt(2k), orthogonality defects ||R^T R - I||_F, and diagonal
    dominance mean |diag R|. W_tuned must have W_base's shape.
    """
    fn = "post_training_svd"
    U, S, V, U2, S2, V2 = _svd_pair(W_base, W_tuned, fn)
    n_out, n_in = U.shape[0], V.shape[0]
    r = S.numel()
    if k is None:
        k = r
    if not (isinstance(k, int) and 1 <= k <= r):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise RwasymError(
            f"{fn}: k={k!r} is out of range for W of shape ({n_out}, {n_in}); "
            f"pass an int with 1 <= k <= min(n_out, n_in) = {r}, or k=None for all"
        )
    for label, s in (("W_base", S), ("W_tuned", S2)):
        if s[k - 1] <= _ZERO_RTOL * max(float(s[0]), 1e-300):
            n_pos = int((s > _ZERO_RTOL * s[0]).sum()) if s[0] > 0 else 0
            raise RwasymError(
                f"{fn}: {label} has only {n_pos} non-zero singular value(s), fewer "
                f"than k={k}, so sigma'/sigma is undefined; pass k <= {n_pos}"
            )
    s, s2 = S[:k], S2[:k]
    ratio = s2 / s
    slope, intercept, r2 = fit_line(s.log(), s2.log())
    R_U = U[:, :k].T @ U2[:, :k]  # (k, k)
    R_V = V[:, :k].T @ V2[:, :k]  # (k, k)
    eye = torch.eye(k, dtype=torch.float64)
    return PostTrainingSVD(
        k=k,
        n_out=n_out,
        n_in=n_in,
        ratio_mean=float(ratio.mean()),
        ratio_std=float(ratio.std(correction=0)),
        ratio_min=float(ratio.min()),
        ratio_max=float(ratio.max()),
        fit_slope=slope,
        fit_intercept=intercept,
        fit_r2=r2,
        consistency=float(linalg.matrix_norm(R_U - R_V)) / math.sqrt(2 * k),
        orth_defect_u=float(linalg.matrix_norm(R_U.T @ R_U - eye)),
        orth_defect_v=float(linalg.matrix_norm(R_V.T @ R_V - eye)),
        diag_dominance_u=float(torch.diagonal(R_U).abs().mean()),
        diag_dominance_v=float(torch.diagonal(R_V).abs().mean()),
        sigma_base=tuple(tolist(s)),
        sigma_tuned=tuple(tolist(s2)),
        R_U=R_U,
        R_V=R_V,
    )


def rebuild(
    W_base: Float[Tensor, "n_out n_in"],
    W_tuned: Float[Tensor, "_n_out _n_in"],
    mode: str,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "n_out n_in"]:
    """Rebuild a weight from mixed base/tuned SVD factors (the disruption test of 2509.17866).

    With W_base = U Sigma V^T and W_tuned = U' Sigma' V'^T (all r = min(n_out, n_in) factors,
    signs aligned), ``mode`` is one of:
      "tuned"                      U' Sigma' V'^T  (= W_tuned; sanity check)
      "tuned_rotation_base_sigma"  U' Sigma  V'^T  (tuned rotations, base singular values)
      "tuned_scaling_only"         U  Sigma' V^T   (tuned singular values, no rotation)
      "identity_rotation"          same as "tuned_scaling_only" (R_U = R_V = I)
      "break_consistency"          U' Sigma' (V Q)^T, Q a Haar-random r x r orthogonal matrix:
                                   the right rotation R_V is replaced by a random one.
    Q is drawn from ``generator`` if given, else from a fresh generator seeded with ``seed``.
    Returns a float64 CPU tensor of W's shape.
    """
    fn = "rebuild"
    if mode not in REBUILD_MODES:
        raise RwasymError(f"{fn}: unknown mode {mode!r}; pass one of {', '.join(REBUILD_MODES)}")
    U, S, V, U2, S2, V2 = _svd_pair(W_base, W_tuned, fn)
    if mode == "tuned":
        left, sig, right = U2, S2, V2
    elif mode == "tuned_rotation_base_sigma":
        left, sig, right = U2, S, V2
    elif mode in ("tuned_scaling_only", "identity_rotation"):
        left, sig, right = U, S2, V
    else:  # break_consistency
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        left, sig, right = U2, S2, V @ haar_frames(1, S.numel(), S.numel(), generator)[0]
    return (left * sig) @ right.T  # (n_out, r) * (r,) @ (r, n_in) -> (n_out, n_in)
