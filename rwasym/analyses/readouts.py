"""Readouts: ΔW's leading directions in words — tokens on the write side, corpus contexts on the read side.

For a studied matrix with ΔW = Σ_i σ_i u_i v_iᵀ (its SVD; for post-norm write matrices diag(γ_post)·ΔW, as the
probe measures them), the rank-1 component σ_i u_i v_iᵀ adds σ_i (v_iᵀ a) u_i to the matrix's output for an input
a. So:

- **tokens** (write matrices, whose output is the residual stream): the logit change per unit of u_i is
  l_i = W̃_Uᵀ u_i with W̃_U = diag(γ_eff)·W_U (`rwasym.Model.unembedding`), and the readout lists the ``top``
  tokens with the largest and the smallest l_i. Wherever v_iᵀ a > 0 the component raises the top tokens' logits
  relative to the bottom ones, and where v_iᵀ a < 0 it lowers them (the *stated sign*; the SVD's joint sign flip
  of (u_i, v_i) leaves the statement unchanged). The prediction subspace's directions (top left singular vectors
  of W̃_U) are read the same way.
- **contexts** (every matrix): the corpus positions with the largest and smallest scores v_iᵀ a_t at the matrix's
  input, collected during the probe's own capture pass (`rwasym.hooks.contexts.TopContexts`), each with the
  token window ending there, decoded with the model's tokenizer.

`rwasym.probe(..., readouts=n)` attaches one row per matrix and direction to ``ProbeResult.readouts``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ..math.fraction import delta_gram
from ..math.lowrank import LowRankDelta
from ..models import MatrixSpec, Model

__all__ = ["delta_directions", "fill_contexts", "plan_readouts", "prediction_readouts", "token_readout"]


def token_readout(
    unembedding: Float[Tensor, "d_model d_vocab"], u: Float[Tensor, " d_model"], top: int = 10, tokenizer: Any = None
) -> dict:
    """The tokens a residual direction u promotes and demotes: l = W̃_Uᵀ u (``unembedding`` = W̃_U,
    d_model × vocab); {"top": [...], "bottom": [...]}, each entry {"id", "token", "logit"} (token decoded with
    ``tokenizer`` when given, else None), top by descending l, bottom by ascending l."""
    if u.dim() != 1 or u.shape[0] != unembedding.shape[0]:
        raise RwasymError(f"u must be a ({unembedding.shape[0]},) residual direction; got {tuple(u.shape)}")
    logits = unembedding.T @ u.to(unembedding.dtype)
    k = min(top, logits.shape[0])

    def entries(values: Tensor, index: Tensor) -> list[dict]:
        return [
            dict(id=int(i), token=None if tokenizer is None else tokenizer.decode([int(i)]), logit=float(v))
            for v, i in zip(values, index)
        ]

    hi, lo = logits.topk(k), (-logits).topk(k)
    return {"top": entries(hi.values, hi.indices), "bottom": entries(-lo.values, lo.indices)}


GRAM_ABOVE = (
    256  # both sides wider: the leading triplets from the smaller Gram's eigh (4× faster than the SVD at 576 × 1536)
)


def delta_directions(delta: Any, n: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """(σ (m,), U (n_out × m), V (n_in × m), ‖ΔW‖²_F): ΔW's ``n`` leading singular triplets (m = min(n, rank)),
    each column's largest-|entry| of U made positive (V flipped with it: the same rank-1 components).

    Both sides wider than `GRAM_ABOVE`: from the smaller Gram G (ΔWᵀΔW or ΔWΔWᵀ): its top eigenpairs give σ² and
    one side's vectors, the other side is ΔW v / σ (or ΔWᵀ u / σ); eigenvalues below min(n)·ε·λ₁ count as zero.
    Otherwise the SVD; ranks below n·ε·σ₁ count as zero."""
    dense = (delta.materialize() if isinstance(delta, LowRankDelta) else delta).to(torch.float64)
    energy = float((dense * dense).sum())
    eps = torch.finfo(torch.float64).eps
    if min(dense.shape) > GRAM_ABOVE:
        wide = dense.shape[1] > dense.shape[0]  # the Gram on the output side is the smaller one
        lam, Q = torch.linalg.eigh(delta_gram(dense, "output" if wide else "input"))
        lam, Q = lam.flip(0), Q.flip(1)
        m = min(n, int((lam > min(dense.shape) * eps * float(lam[0])).sum())) if lam.numel() and lam[0] > 0 else 0
        s = lam[:m].sqrt()
        if wide:
            U = Q[:, :m]
            V = (dense.T @ U) / s
        else:
            V = Q[:, :m]
            U = (dense @ V) / s
    else:
        U, s, Vh = torch.linalg.svd(dense, full_matrices=False)
        tol = max(dense.shape) * eps * (float(s[0]) if s.numel() else 0.0)
        m = min(n, int((s > tol).sum()))
        U, s, V = U[:, :m], s[:m], Vh[:m].T
    if m == 0:
        return s, U, V, energy
    signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))[0]
    signs[signs == 0] = 1.0
    return s, U * signs, V * signs, energy


def plan_readouts(
    base: Model,
    specs: Sequence[MatrixSpec],
    deltas: Mapping[str, Any],
    n: int,
    top: int,
    post_norm: str = "residual",
) -> tuple[list[dict], dict[str, tuple[str, Tensor]]]:
    """Readout rows with their token readouts filled, and the ``contexts`` to collect in the capture pass
    ({matrix: (input site, V)}). One SVD per matrix; matrices with ΔW = 0 get no rows."""
    unembedding = None
    rows, contexts = [], {}
    for spec in specs:
        delta = deltas[spec.name]
        gamma = base.post_norm_scale(spec.name) if post_norm == "residual" else None
        if gamma is not None:
            delta = (delta.materialize() if isinstance(delta, LowRankDelta) else delta) * gamma[:, None]
        sigma, U, V, energy = delta_directions(delta, n)
        if energy == 0.0 or sigma.numel() == 0:
            continue
        contexts[spec.name] = (base.input_hook(spec.name), V)
        if spec.side == "write" and unembedding is None:
            unembedding = base.unembedding()
        for i in range(sigma.numel()):
            rows.append(
                dict(
                    matrix=spec.name,
                    kind=spec.kind,
                    layer=spec.layer,
                    side=spec.side,
                    direction=i,
                    sigma=float(sigma[i]),
                    energy_share=float(sigma[i] ** 2) / energy,
                    site=base.input_hook(spec.name),
                    tokens=None if spec.side != "write" else token_readout(unembedding, U[:, i], top, base.tokenizer),  # type: ignore[arg-type]
                    contexts=None,
                )
            )
    return rows, contexts


def prediction_readouts(base: Model, U: Float[Tensor, "d_model k"], n: int, top: int) -> list[dict]:
    """Token readouts of the prediction subspace's first ``n`` directions (columns of ``U``)."""
    unembedding = base.unembedding()
    return [
        dict(
            matrix=None,
            kind="prediction",
            layer=None,
            side="write",
            direction=j,
            tokens=token_readout(unembedding, U[:, j], top, base.tokenizer),
            contexts=None,
        )
        for j in range(min(n, U.shape[1]))
    ]


def fill_contexts(rows: list[dict], contexts: Mapping[str, Any], tokenizer: Any = None) -> None:
    """Put each collected `TopContexts` column into its row (``contexts``: label = matrix name), with the windows
    decoded by ``tokenizer`` when given."""
    for row in rows:
        acc = contexts.get(row["matrix"]) if row["matrix"] is not None else None
        if acc is None:
            continue
        found = acc.to_dicts(row["direction"])
        if tokenizer is not None:
            for entries in found.values():
                for c in entries:
                    c["text"] = tokenizer.decode(c["ids"])
        row["contexts"] = found
