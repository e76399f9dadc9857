"""Spectra of representations and weights: RankMe, alpha-ReQ, spikiness, spectral lifecycle.

Pure functions on tensors; no model is loaded here. Every input is copied to float64 on CPU
whatever its dtype (bf16/fp16/fp32 in, fp64 inside), and every result is a small frozen
dataclass whose ``to_dict()`` is plain JSON-able Python (non-finite floats become ``None``).

Axis names: ``n`` samples (tokens), ``d`` features, ``n_out n_in`` a weight W acting as y = W a.

Sources: RankMe — Garrido et al. 2023 (arXiv 2210.02885); alpha-ReQ — Agrawal et al. 2022,
used across training in arXiv 2509.23024; effective rank — Roy & Vetterli 2007; the spectral
lifecycle follows the per-checkpoint SVD analyses described in DESIGN.md.
The post-training SVD comparison (arXiv 2509.17866) lives in ``rwasym.math.svd``.
"""

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._common import as_f64, fit_line, jsonable
from ._typed_torch import linalg, special, tolist

# ----------------------------------------------------------------------------- private helpers

_NEGLIGIBLE_RTOL = 1e-10  # eigenvalues <= rtol * lambda_1 count as numerically zero
_SYMMETRY_RTOL = 1e-6  # max ||C - C^T||_F / ||C||_F accepted as "symmetric"
_PSD_RTOL = 1e-8  # min eigenvalue >= -rtol * lambda_1 accepted as "positive semidefinite"
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _entropy_rank(w: Tensor, eps: float = 0.0) -> float:
    """exp(-sum p_i log p_i) with p_i = w_i / sum(w) + eps, taking 0 log 0 = 0."""
    p = w / w.sum() + eps
    return math.exp(-float(special.xlogy(p, p).sum()))


def _eigvalsh_desc(C_in: object, name: str, fn: str) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, tiny negatives clamped to 0."""
    C = as_f64(C_in, name, fn)
    if C.shape[0] != C.shape[1]:
        raise RwasymError(
            f"{fn}: {name} must be square (d x d), got shape {tuple(C.shape)}; "
            f"pass a covariance such as Z.T @ Z, not the data Z itself"
        )
    norm = float(linalg.matrix_norm(C))
    asym = float(linalg.matrix_norm(C - C.T))
    if asym > _SYMMETRY_RTOL * norm:
        raise RwasymError(
            f"{fn}: {name} is not symmetric (||C - C.T||_F / ||C||_F = "
            f"{asym / norm:.3g}); pass a covariance, or symmetrise it with "
            f"(C + C.T) / 2"
        )
    lam = linalg.eigvalsh((C + C.T) / 2).flip(0)
    if lam[0] <= 0:
        raise RwasymError(
            f"{fn}: {name} has no positive eigenvalue (largest = "
            f"{float(lam[0]):.3g}); the covariance is zero — check that "
            f"activations were accumulated"
        )
    if lam[-1] < -_PSD_RTOL * lam[0]:
        raise RwasymError(
            f"{fn}: {name} is not positive semidefinite (smallest eigenvalue "
            f"{float(lam[-1]):.3g}, largest {float(lam[0]):.3g}); pass a "
            f"covariance (a sum of outer products), not a difference of them"
        )
    return lam.clamp_min(0.0)


def _check_eps(eps: object, fn: str) -> None:
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise RwasymError(
            f"{fn}: eps must be a float in [0, 1), got {eps!r}; the default 1e-7 follows Garrido et al. 2023"
        )


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AlphaReq:
    """Power-law fit lambda_i ~ exp(intercept) * i^(-alpha) over 1-based indices lo..hi of d."""

    alpha: float
    intercept: float
    r2: float
    lo: int
    hi: int
    d: int

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


@dataclass(frozen=True)
class Spikiness:
    """Concentration of a covariance spectrum (see ``spikiness``)."""

    top1_share: float
    participation_ratio: float
    effective_rank: float
    d: int

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self.__dict__)


# ----------------------------------------------------------------------------- geometry


def rankme(Z: Float[Tensor, "n d"], eps: float = 1e-7) -> float:
    """RankMe effective rank of a representation matrix (Garrido et al. 2023).

    sigma = singular values of Z (min(n, d) of them, Z *not* centred),
    p_i = sigma_i / sum(sigma) + eps,  RankMe = exp(-sum_i p_i log p_i).
    Lies in [1, min(n, d)] up to O(eps); an isotropic Gaussian Z with n >> d gives ~ d.

    Example: ``rankme(torch.randn(4000, 32))`` is about 31.97 (of a maximum of 32).
    """
    Z64 = as_f64(Z, "Z", "rankme")
    _check_eps(eps, "rankme")
    s = linalg.svdvals(Z64)
    if s[0] <= 0:
        raise RwasymError(
            f"rankme: Z (shape {tuple(Z64.shape)}) is all zeros, so RankMe is "
            f"undefined; check that the activations were captured"
        )
    return _entropy_rank(s, eps)


def rankme_from_cov(C: Float[Tensor, "d d"], eps: float = 1e-7, n_samples: int | None = None) -> float:
    """RankMe from an accumulated *uncentred* second moment C = Z^T Z (streaming use).

    The singular values of Z are the square roots of the eigenvalues of Z^T Z, so
    ``rankme_from_cov(Z.T @ Z) == rankme(Z)`` (to float64 round-off) whenever n >= d; C may be
    scaled by any positive constant (e.g. divided by n) without changing the result. When n < d,
    C has d - n extra zero eigenvalues that each add an eps term; pass ``n_samples=n`` to keep
    only the top min(n, d) values and match ``rankme(Z)`` exactly. Do not pass a *centred*
    covariance if you want to match ``rankme(Z)``: RankMe does not centre Z.
    """
    _check_eps(eps, "rankme_from_cov")
    lam = _eigvalsh_desc(C, "C", "rankme_from_cov")
    if n_samples is not None:
        if not (isinstance(n_samples, int) and n_samples >= 1):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise RwasymError(
                f"rankme_from_cov: n_samples must be a positive int, got "
                f"{n_samples!r}; pass the number of rows accumulated into C"
            )
        lam = lam[: min(n_samples, lam.numel())]
    return _entropy_rank(lam.sqrt(), eps)


def alpha_req(
    Z: Float[Tensor, "n d"] | None = None,
    *,
    cov: Float[Tensor, "d d"] | None = None,
    index_range: tuple[int, int] | None = None,
) -> AlphaReq:
    """alpha-ReQ: power-law decay exponent of the covariance eigenspectrum (Agrawal et al. 2022).

    Pass exactly one of ``Z`` (n x d samples; its covariance is centred and divided by n - 1)
    or ``cov`` (d x d covariance, used as is). With eigenvalues lambda_1 >= ... >= lambda_d,
    fit log lambda_i = -alpha * log i + intercept by least squares over 1-based indices
    i = lo..hi (inclusive) and report alpha, intercept (natural log), r2 of that fit.

    Default range: lo = 1, hi = max(2, floor(d / 2)). The upper half of the spectrum is left out
    because it is where finite-sample noise lives (Marchenko-Pastur spreading flattens or bends
    the tail when n is not >> d) and where rank deficiency puts numerical zeros. In every range
    eigenvalues <= 1e-10 * lambda_1 are skipped (they sit at the tail, so this lowers hi); the
    returned ``hi`` is the last index actually fitted.
    """
    fn = "alpha_req"
    if (Z is None) == (cov is None):
        raise RwasymError(
            f"{fn}: pass exactly one of Z (samples, n x d) or cov= (d x d); got "
            f"{'both' if Z is not None else 'neither'}"
        )
    if Z is not None:
        Zc = as_f64(Z, "Z", fn)
        if Zc.shape[0] < 2:
            raise RwasymError(
                f"{fn}: Z has {Zc.shape[0]} row(s); a covariance needs at least 2 "
                f"samples — pass more rows or a precomputed cov="
            )
        d = Zc.shape[1]
        Zc = Zc - Zc.mean(dim=0, keepdim=True)
        lam = linalg.svdvals(Zc) ** 2 / (Zc.shape[0] - 1)  # min(n, d) eigenvalues
        if lam[0] <= 0:
            raise RwasymError(f"{fn}: Z has zero variance (all rows equal); nothing to fit")
    else:
        lam = _eigvalsh_desc(cov, "cov", fn)
        d = lam.numel()
    if index_range is None:
        lo, hi = 1, max(2, d // 2)
    else:
        lo, hi = index_range
    if not (
        isinstance(lo, int)  # pyright: ignore[reportUnnecessaryIsInstance]
        and isinstance(hi, int)  # pyright: ignore[reportUnnecessaryIsInstance]
        and 1 <= lo < hi <= d
    ):
        raise RwasymError(
            f"{fn}: index_range=({lo!r}, {hi!r}) is out of range for d={d}; pass "
            f"1-based inclusive ints with 1 <= lo < hi <= d"
        )
    n_ok = int((lam > _NEGLIGIBLE_RTOL * lam[0]).sum())
    hi = min(hi, n_ok)
    if hi - lo + 1 < 2:
        raise RwasymError(
            f"{fn}: only {max(0, hi - lo + 1)} non-negligible eigenvalue(s) in "
            f"index_range from lo={lo} ({n_ok} of d={d} are > 1e-10 * lambda_1); "
            f"pass more samples or a lower index_range"
        )
    i = torch.arange(lo, hi + 1, dtype=torch.float64)
    slope, intercept, r2 = fit_line(i.log(), lam[lo - 1 : hi].log())
    return AlphaReq(alpha=-slope, intercept=intercept, r2=r2, lo=lo, hi=hi, d=d)


def spikiness(C: Float[Tensor, "d d"]) -> Spikiness:
    """Concentration of a covariance C (d x d, symmetric PSD) from its eigenvalues lambda.

    top1_share = lambda_1 / sum(lambda)          (isotropic: 1/d; spiked: -> 1)
    participation_ratio = sum(lambda)^2 / sum(lambda^2)   (in [1, d])
    effective_rank = exp(H(lambda / sum(lambda))), H the Shannon entropy, 0 log 0 = 0
                     (Roy & Vetterli 2007; in [1, d]).
    Note: with C = Z^T Z this entropy is over sigma^2 of Z, whereas ``rankme`` uses sigma.
    """
    lam = _eigvalsh_desc(C, "C", "spikiness")
    total = float(lam.sum())
    return Spikiness(
        top1_share=float(lam[0]) / total,
        participation_ratio=total**2 / float((lam**2).sum()),
        effective_rank=_entropy_rank(lam),
        d=lam.numel(),
    )


# ----------------------------------------------------------------------------- lifecycle


def parse_matrix_name(name: str) -> tuple[int | None, str]:
    """Split ``"blocks.{L}.{kind}"`` into (L, kind); other names give (None, name).

    >>> parse_matrix_name("blocks.3.attn.W_Q")
    (3, 'attn.W_Q')
    """
    m = _NAME_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


@dataclass(frozen=True)
class LifecycleRow:
    """Spectral summary of one matrix at one checkpoint (NaN metrics for an all-zero matrix)."""

    step: int
    name: str
    layer: int | None
    kind: str
    n_out: int
    n_in: int
    stable_rank: float
    effective_rank: float
    top_k_energy: float
    top_k: int
    singular_values: tuple[float, ...]

    def to_dict(self, include_singular_values: bool = True) -> dict[str, Any]:
        d = dict(self.__dict__)
        if not include_singular_values:
            del d["singular_values"]
        return jsonable(d)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


@dataclass(frozen=True)
class Lifecycle:
    """Per (step, matrix) spectra across checkpoints; rows sorted by (step, name)."""

    rows: tuple[LifecycleRow, ...]
    top_k: int

    @property
    def steps(self) -> list[int]:
        return sorted({r.step for r in self.rows})

    def to_rows(self, include_singular_values: bool = False) -> list[dict[str, Any]]:
        return [r.to_dict(include_singular_values) for r in self.rows]

    def compression_timing(self) -> list[dict[str, Any]]:
        """Per matrix (sorted by layer, kind): the step of minimum effective rank.

        Ties go to the earliest step; all-zero (NaN) checkpoints are skipped.
        ``compression`` = effective rank at the first step minus the minimum.
        """
        by_name: dict[str, list[LifecycleRow]] = defaultdict(list)
        for r in self.rows:
            if math.isfinite(r.effective_rank):
                by_name[r.name].append(r)
        out: list[dict[str, Any]] = []
        for name, rs in by_name.items():
            rs.sort(key=lambda r: r.step)
            best = min(rs, key=lambda r: (r.effective_rank, r.step))
            out.append(
                {
                    "name": name,
                    "layer": rs[0].layer,
                    "kind": rs[0].kind,
                    "step_of_min": best.step,
                    "effective_rank_min": best.effective_rank,
                    "effective_rank_first": rs[0].effective_rank,
                    "effective_rank_last": rs[-1].effective_rank,
                    "compression": rs[0].effective_rank - best.effective_rank,
                }
            )
        out.sort(key=lambda o: (o["layer"] if o["layer"] is not None else -1, o["kind"], o["name"]))
        return jsonable(out)

    def kind_summary(self) -> list[dict[str, Any]]:
        """Means over layers per (kind, step): stable rank, effective rank, its fraction of
        min(n_out, n_in) (comparable across kinds of different size), top-k energy."""
        groups: dict[tuple[str, int], list[LifecycleRow]] = defaultdict(list)
        for r in self.rows:
            groups[(r.kind, r.step)].append(r)
        out: list[dict[str, Any]] = []
        for (kind, step), rs in sorted(groups.items()):
            out.append(
                {
                    "kind": kind,
                    "step": step,
                    "n_matrices": len(rs),
                    "stable_rank_mean": _mean([r.stable_rank for r in rs]),
                    "effective_rank_mean": _mean([r.effective_rank for r in rs]),
                    "effective_rank_frac_mean": _mean([r.effective_rank / min(r.n_out, r.n_in) for r in rs]),
                    "top_k_energy_mean": _mean([r.top_k_energy for r in rs]),
                }
            )
        return jsonable(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "rows": self.to_rows(include_singular_values=True),
            "compression_timing": self.compression_timing(),
            "kind_summary": self.kind_summary(),
        }


def _row(step: int, name: str, shape: tuple[int, int], s: Tensor, top_k: int, eps: float) -> LifecycleRow:
    layer, kind = parse_matrix_name(name)
    k = min(top_k, s.numel())
    s2 = s**2
    if s[0] > 0:
        stable = float(s2.sum() / s2[0])  # ||W||_F^2 / ||W||_2^2
        eff = _entropy_rank(s, eps)
        energy = float(s2[:k].sum() / s2.sum())
    else:
        stable = eff = energy = math.nan
    return LifecycleRow(
        step=step,
        name=name,
        layer=layer,
        kind=kind,
        n_out=shape[0],
        n_in=shape[1],
        stable_rank=stable,
        effective_rank=eff,
        top_k_energy=energy,
        top_k=k,
        singular_values=tuple(tolist(s)),
    )


def lifecycle(weights_by_step: Mapping[int, Mapping[str, Tensor]], top_k: int = 10, eps: float = 1e-7) -> Lifecycle:
    """Spectra of every weight matrix at every checkpoint.

    ``weights_by_step[step][name]`` is a 2-D weight (n_out x n_in); names like
    ``blocks.{L}.attn.W_Q`` are parsed into layer and kind by ``parse_matrix_name``. Per
    (step, matrix), with sigma the singular values (descending):
      stable rank    = ||W||_F^2 / ||W||_2^2 = sum(sigma^2) / sigma_1^2
      effective rank = RankMe on sigma: exp(H(sigma / sum(sigma) + eps)), so it equals
                       ``rankme(W, eps)`` and is on the same scale as the representation side
      top-k energy   = sum_{i<=k} sigma_i^2 / sum(sigma^2), k = min(top_k, min(n_out, n_in)).
    Same-shape matrices of one step are stacked and go through one batched
    ``torch.linalg.svdvals`` call (float64). A matrix must keep its shape across steps.
    """
    fn = "lifecycle"
    if (
        not isinstance(weights_by_step, Mapping)  # pyright: ignore[reportUnnecessaryIsInstance]
        or len(weights_by_step) == 0
    ):
        raise RwasymError(
            f"{fn}: weights_by_step is empty; pass {{step: {{name: tensor}}}} with at least one checkpoint"
        )
    if not (isinstance(top_k, int) and top_k >= 1):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise RwasymError(
            f"{fn}: top_k={top_k!r} is out of range; pass an int >= 1 (it is clipped to min(n_out, n_in) per matrix)"
        )
    _check_eps(eps, fn)
    shapes: dict[str, tuple[int, int]] = {}
    first_step: dict[str, int] = {}
    rows: list[LifecycleRow] = []
    for step in sorted(weights_by_step):
        mats = weights_by_step[step]
        if not isinstance(mats, Mapping) or len(mats) == 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise RwasymError(
                f"{fn}: checkpoint step={step} has no matrices; pass a non-empty "
                f"{{name: tensor}} mapping for every step or drop the step"
            )
        by_shape: dict[tuple[int, int], list[tuple[str, Tensor]]] = defaultdict(list)
        for name, w in mats.items():
            w = as_f64(w, f"weights_by_step[{step}][{name!r}]", fn)
            shape = (w.shape[0], w.shape[1])
            if shapes.setdefault(name, shape) != shape:
                raise RwasymError(
                    f"{fn}: matrix {name!r} has shape {shape} at step {step} but "
                    f"{shapes[name]} at step {first_step[name]}; a matrix must "
                    f"keep its shape across checkpoints — check the name mapping"
                )
            first_step.setdefault(name, step)
            by_shape[shape].append((name, w))
        for shape, items in by_shape.items():
            stacked = torch.stack([w for _, w in items])  # (batch, n_out, n_in)
            svals = linalg.svdvals(stacked)  # (batch, min(n_out, n_in))
            rows.extend(_row(int(step), name, shape, s, top_k, eps) for (name, _), s in zip(items, svals))
    rows.sort(key=lambda r: (r.step, r.name))
    return Lifecycle(rows=tuple(rows), top_k=top_k)
