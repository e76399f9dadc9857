"""Gradient anisotropy report: is ΔW's structure inherited from C_a (read side) or C_δ (write side)?

For each studied matrix, from `rwasym.hooks.gradients.capture_gradients` statistics: the
spikiness (top-1 share, participation ratio, effective rank; `rwasym.math.spectra.spikiness`) of
C_a = Σ a aᵀ and C_δ = Σ δ δᵀ — and of C_a over the tokens with δ_t ≠ 0 (``a_active_*``) and of the
δ-weighted Σ_t ‖δ_t‖² a_t a_tᵀ (``a_weighted_*``), with the token counts each used (``a_tokens``,
``active_tokens``) — and the relative fraction of G = Σ δ aᵀ against the PCA basis of
C_a (input side) and against the prediction basis (the residual-stream side).
"""

from typing import Any

from ..hooks.gradients import GradientStats
from ..math.checks import linalg_threads
from ..math.fraction import relative_fraction
from ..math.spectra import spikiness
from ..math.subspaces import pca_basis, prediction_basis
from ..models import Model, load

__all__ = ["anisotropy_report"]


def anisotropy_report(model: Any, stats: GradientStats, *, k: int = 8, center: bool = True) -> list[dict]:
    """Per matrix: spikiness of C_a and C_δ, and the relative fraction of G against the read-side
    PCA basis of C_a (input side) and the prediction basis (the residual-stream side: input for
    read matrices, output for write matrices).

    center: the one centring convention of rwasym's subspaces and spectra (the probe's
    ``ProbeConfig.center``, the same default): True uses the centred covariances of a_t and δ_t for the
    spikiness and the PCA basis, False the uncentred sums Σ a aᵀ, Σ δ δᵀ. Both are reported whatever
    ``center`` is (``*_centered``, ``*_uncentered``), since G = Σ δ aᵀ carries (Σ_t δ_t) μᵀ along the mean
    input μ, which a centred basis cannot see; ``G_mean_fraction`` = ‖G μ̂‖²/‖G‖² is that part's share."""
    with linalg_threads(1):
        return _anisotropy_rows(load(model), stats, k, center)


def _anisotropy_rows(model: Model, stats: GradientStats, k: int, center: bool) -> list[dict]:
    pred = prediction_basis(model.unembedding(), min(k, model.d_model)).U
    rows = []
    for name, G in stats.G.items():
        spec = model.matrix(name)
        a_stat, d_stat = stats.inputs[name], stats.grads[name]
        C_a, C_d = stats.second_moments(name)
        # both centrings; the plain fields follow `center`
        spectra = {
            "uncentered": (spikiness(C_a), spikiness(C_d)),
            "centered": (spikiness(a_stat.covariance(center=True)), spikiness(d_stat.covariance(center=True))),
        }
        sa, sd = spectra["centered" if center else "uncentered"]
        row = dict(
            matrix=name,
            layer=spec.layer,
            kind=spec.kind,
            side=spec.side,
            a_top1_share=sa.top1_share,
            a_participation_ratio=sa.participation_ratio,
            a_effective_rank=sa.effective_rank,
            a_dim=sa.d,
            delta_top1_share=sd.top1_share,
            delta_participation_ratio=sd.participation_ratio,
            delta_effective_rank=sd.effective_rank,
            delta_dim=sd.d,
            grad_norm=float(G.norm()),
            center=center,
            **stats.token_counts(name),
        )
        for which, (a_s, d_s) in spectra.items():
            row[f"a_top1_share_{which}"] = a_s.top1_share
            row[f"delta_top1_share_{which}"] = d_s.top1_share
        # which tokens made the gradient: C_a over δ_t ≠ 0 tokens, and the δ-weighted Σ_t ‖δ_t‖² a_t a_tᵀ
        active, weighted = stats.active_inputs.get(name), stats.weighted_inputs.get(name)
        if active is not None and active.count > 0 and weighted is not None:
            s_act = spikiness(active.second_moment() * active.count)
            s_w = spikiness(weighted)
            row.update(
                a_active_top1_share=s_act.top1_share,
                a_active_effective_rank=s_act.effective_rank,
                a_weighted_top1_share=s_w.top1_share,
                a_weighted_effective_rank=s_w.effective_rank,
            )
        if float(G.square().sum()) > 0:
            kk = min(k, spec.n_in)
            both = {
                "uncentered": relative_fraction(G, pca_basis(C_a, kk, center=False).U, "input"),
                "centered": relative_fraction(G, pca_basis(a_stat, kk, center=True).U, "input"),
            }
            read = both["centered" if center else "uncentered"]
            row.update(G_input_pca_relative=read.relative, G_input_pca_fraction=read.fraction)
            row.update({f"G_input_pca_relative_{which}": r.relative for which, r in both.items()})
            mean = a_stat.mean()
            if float(mean.norm()) > 0:  # the (Σ δ) μᵀ part of G: its share along the mean input direction
                mu = mean / mean.norm()
                row["G_mean_fraction"] = float((G @ mu).square().sum() / G.square().sum())
            resid_side = "input" if spec.side == "read" else "output"
            if (spec.n_in if resid_side == "input" else spec.n_out) == model.d_model:
                pr = relative_fraction(G, pred, resid_side)
                row.update(
                    G_prediction_relative=pr.relative, G_prediction_fraction=pr.fraction, G_prediction_side=resid_side
                )
        rows.append(row)
    return rows
