"""Head slicing: the one place that knows which axis of a studied matrix indexes heads.

W_Q / W_K / W_V (n_heads·d_head × d_model; K/V have ``n_key_value_heads`` heads under GQA): head h
is rows h·d_head:(h+1)·d_head. W_O (d_model × n_heads·d_head): head h is those columns. MLP
matrices have no heads. Everything that slices or pads a head (probe rows, sweeps, rank-1 edits,
factored LoRA deltas) goes through `head_range`.
"""

from typing import TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ..math.checks import require_vector
from ..math.lowrank import LowRankDelta

T = TypeVar("T", Tensor, LowRankDelta)


def head_range(spec, head: int) -> slice:
    """The slice of head ``head`` along ``spec.head_axis`` (RwasymError for MLP matrices or a
    head out of range). ``spec``: a `rwasym.models.MatrixSpec`."""
    if spec.head_axis is None:
        raise RwasymError(f"{spec.name} is an MLP matrix and has no heads; pass head=None")
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < spec.n_heads:
        raise RwasymError(
            f"head {head!r} is out of range for {spec.name}: it has {spec.n_heads} heads "
            f"(K/V count n_key_value_heads under GQA); pass 0 <= head < {spec.n_heads}"
        )
    return slice(head * spec.d_head, (head + 1) * spec.d_head)


def head_slice(spec, w: T, head: int) -> T:
    """Head ``head``'s block of a full matrix ``w`` laid out like ``spec`` (n_out × n_in): rows for
    Q/K/V, columns for O. A `LowRankDelta` stays factored (rows of B, or columns of A)."""
    sl = head_range(spec, head)
    if isinstance(w, LowRankDelta):
        if w.shape != spec.shape:
            raise RwasymError(
                f"{spec.name} has shape {spec.shape} but this ΔW has shape {w.shape}; slice the delta of that matrix"
            )
        return w.rows(sl) if spec.head_axis == "out" else w.cols(sl)
    return w[sl] if spec.head_axis == "out" else w[:, sl]


def head_input_block(spec, C: Float[Tensor, "n_in n_in"], head: int | None) -> Tensor:
    """The block of an input-side covariance that head ``head`` reads: (d_head × d_head) for W_O
    (heads index its input), C itself when heads index the output or ``head`` is None."""
    if head is None or spec.head_axis != "in":
        return C
    sl = head_range(spec, head)
    return C[sl, sl]


def unit_shape(spec, head: int | None = None) -> tuple[int, int]:
    """(n_out, n_in) of the matrix, or of head ``head``'s block (d_head × d_model for Q/K/V,
    d_model × d_head for O)."""
    if head is None:
        return spec.shape
    head_range(spec, head)
    return (spec.d_head, spec.n_in) if spec.head_axis == "out" else (spec.n_out, spec.d_head)


def embed_head(
    spec, u: Float[Tensor, " n_out"], v: Float[Tensor, " n_in"], head: int | None = None
) -> tuple[Tensor, Tensor]:
    """Full-matrix vectors (u_full (spec.n_out,), v_full (spec.n_in,), float64) with
    W[h] + u vᵀ ⇔ W + u_full v_fullᵀ.

    Q/K/V (heads index rows): u ∈ R^{d_head} is zero-padded into rows h·d_head:(h+1)·d_head.
    O (heads index columns): v ∈ R^{d_head} is zero-padded into those columns.
    """
    n_out, n_in = unit_shape(spec, head)
    u, v = require_vector(u, n_out, "u"), require_vector(v, n_in, "v")
    if head is None:
        return u, v
    sl = head_range(spec, head)
    full = torch.zeros(spec.n_out if spec.head_axis == "out" else spec.n_in, dtype=torch.float64)
    if spec.head_axis == "out":
        full[sl] = u
        return full, v
    full[sl] = v
    return u, full
