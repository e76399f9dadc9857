"""Pure float64 math: tensors in, tensors and small dataclasses out. Never imports models, hooks,
TransformerLens or transformers (an import-linter contract in the test suite checks it).

checks (validation), covariance (`RunningCovariance`), lowrank (`LowRankDelta`), subspaces (PCA,
prediction, Haar frames), fraction (relative fraction, nulls, curves), spectra (RankMe, α-ReQ,
spikiness, lifecycle), svd (post-training SVD), rank1 (closed-form u, directions, matching,
spectrum-matched random deltas), calibration (the α of an edit at a collateral-effect budget),
inference (bootstrap, permutation, t-intervals, rank tests against controls, Holm), topk (certified top-k
eigenpairs at O(n² b)).
"""

from .calibration import ScaleSearch, calibrate_scale
from .covariance import RunningCovariance
from .fraction import (
    DeltaSpectrum,
    FractionResult,
    KFreeScore,
    NullMoments,
    NullResult,
    delta_spectrum,
    fraction_curve,
    gradient_shaped_delta,
    gradient_shaped_fraction,
    kfree_score,
    null_fractions,
    null_moments,
    random_null,
    relative_fraction,
)
from .lowrank import LowRankDelta
from .rank1 import Direction, closed_form_u, directions, match_output_energy, spectrum_matched_delta
from .spectra import alpha_req, lifecycle, rankme, rankme_from_cov, spikiness
from .subspaces import (
    Basis,
    complement_basis,
    haar_frames,
    k_for_variance,
    pca_basis,
    prediction_basis,
    prediction_fisher,
    random_basis,
)
from .svd import post_training_svd, rebuild
from .topk import TopEigen, top_eigenpairs, top_spectrum_until

__all__ = [
    "Basis",
    "DeltaSpectrum",
    "Direction",
    "FractionResult",
    "KFreeScore",
    "NullMoments",
    "LowRankDelta",
    "NullResult",
    "RunningCovariance",
    "ScaleSearch",
    "alpha_req",
    "calibrate_scale",
    "closed_form_u",
    "complement_basis",
    "delta_spectrum",
    "directions",
    "fraction_curve",
    "gradient_shaped_delta",
    "gradient_shaped_fraction",
    "haar_frames",
    "k_for_variance",
    "kfree_score",
    "lifecycle",
    "match_output_energy",
    "null_fractions",
    "null_moments",
    "pca_basis",
    "post_training_svd",
    "prediction_basis",
    "prediction_fisher",
    "random_basis",
    "random_null",
    "rankme",
    "rankme_from_cov",
    "rebuild",
    "relative_fraction",
    "spectrum_matched_delta",
    "spikiness",
    "top_eigenpairs",
    "top_spectrum_until",
    "TopEigen",
]
