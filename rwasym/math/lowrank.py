"""Factored weight deltas ΔW = scale · B A (LoRA), never materialised unless asked.

B (n_out × r) and A (r × n_in) in `nn.Linear` layout (y = ΔW a). Everything downstream
(`relative_fraction`, `random_null`, `fraction_curve`, `closed_form_u`, the probe) accepts a
`LowRankDelta` and never forms the n_out × n_in matrix: ‖ΔW U‖²_F = scale²‖B (A U)‖²_F,
‖Uᵀ ΔW‖²_F = scale²‖(Uᵀ B) A‖²_F, ‖ΔW‖²_F = scale² tr((BᵀB)(AAᵀ)), all O(r (n_out + n_in) k).
A rank-0 delta (B is n_out × 0, A is 0 × n_in) is the zero update. Reading adapters from disk
lives in `rwasym.models.lora`.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ._typed_torch import linalg

__all__ = ["LowRankDelta"]


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """ΔW = scale · B A, float64 on CPU, nn.Linear layout (ΔW is n_out × n_in, acting as y = ΔW a).

    B (n_out × r) and A (r × n_in) are the LoRA factors; r = 0 is the zero update. Nothing here
    forms the n_out × n_in product except `materialize`: norms, products and the SVD cost
    O(r² (n_out + n_in)) or O(r (n_out + n_in) k).
    """

    B: Float[Tensor, "n_out r"]
    A: Float[Tensor, "r n_in"]
    scale: float = 1.0

    def __post_init__(self) -> None:
        for which in ("B", "A"):
            x = getattr(self, which)
            if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
                raise RwasymError(
                    f"LowRankDelta.{which} must be a 2-D floating tensor; got "
                    f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
                )
            x = x.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(x).all()):
                raise RwasymError(f"LowRankDelta.{which} contains NaN or Inf; check the adapter weights")
            object.__setattr__(self, which, x)
        if self.B.shape[1] != self.A.shape[0]:
            raise RwasymError(
                f"LowRankDelta needs B (n_out, r) and A (r, n_in) with one r; got B "
                f"{tuple(self.B.shape)} and A {tuple(self.A.shape)}"
            )
        object.__setattr__(self, "scale", float(self.scale))
        if not math.isfinite(self.scale):
            raise RwasymError(f"LowRankDelta.scale must be finite; got {self.scale}")

    @classmethod
    def zeros(cls, n_out: int, n_in: int) -> "LowRankDelta":
        """The zero update of an n_out × n_in matrix (rank 0)."""
        return cls(torch.zeros(n_out, 0, dtype=torch.float64), torch.zeros(0, n_in, dtype=torch.float64))

    @property
    def shape(self) -> tuple[int, int]:
        """(n_out, n_in) of ΔW."""
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    @property
    def rank(self) -> int:
        """r, the inner dimension of the factors (an upper bound on rank(ΔW))."""
        return int(self.A.shape[0])

    def materialize(self) -> Float[Tensor, "n_out n_in"]:
        """The dense ΔW = scale · B A (float64, n_out × n_in)."""
        return self.scale * (self.B @ self.A)

    def frobenius_sq(self) -> float:
        """‖ΔW‖²_F = scale² · tr((BᵀB)(AAᵀ)), O(r² (n_out + n_in)); both Gram matrices are symmetric,
        so the trace is the sum of their elementwise product."""
        if self.rank == 0:
            return 0.0
        return float(self.scale**2 * ((self.B.T @ self.B) * (self.A @ self.A.T)).sum())

    def norm(self) -> float:
        """‖ΔW‖_F."""
        return math.sqrt(max(self.frobenius_sq(), 0.0))

    def matvec(self, v: Float[Tensor, " n_in *k"]) -> Float[Tensor, " n_out *k"]:
        """ΔW v = scale · B (A v) for a vector (n_in,) or a matrix (n_in, k); float64."""
        v = v.detach().to("cpu", torch.float64)
        if v.shape[0] != self.shape[1]:
            raise RwasymError(
                f"ΔW of shape (n_out, n_in) = {self.shape} needs v with n_in = {self.shape[1]} "
                f"rows; got {tuple(v.shape)}"
            )
        return self.scale * (self.B @ (self.A @ v))

    def rmatvec(self, u: Float[Tensor, " n_out *k"]) -> Float[Tensor, " n_in *k"]:
        """ΔWᵀ u = scale · Aᵀ (Bᵀ u) for a vector (n_out,) or a matrix (n_out, k); float64."""
        u = u.detach().to("cpu", torch.float64)
        if u.shape[0] != self.shape[0]:
            raise RwasymError(
                f"ΔW of shape (n_out, n_in) = {self.shape} needs u with n_out = {self.shape[0]} "
                f"rows; got {tuple(u.shape)}"
            )
        return self.scale * (self.A.T @ (self.B.T @ u))

    def rows(self, index: slice | Tensor) -> "LowRankDelta":
        """ΔW[index] (rows of B; A shared), still factored."""
        return LowRankDelta(self.B[index], self.A, self.scale)

    def cols(self, index: slice | Tensor) -> "LowRankDelta":
        """ΔW[:, index] (columns of A; B shared), still factored."""
        return LowRankDelta(self.B, self.A[:, index], self.scale)

    def svd(self) -> tuple[Float[Tensor, "n_out q"], Float[Tensor, " q"], Float[Tensor, "q n_in"]]:
        """Thin SVD ΔW = U diag(S) Vh from QR of the factors, O(r² (n_out + n_in)).

        Q_B R_B = B and Q_A R_A = Aᵀ (reduced QR), so ΔW = Q_B (scale R_B R_Aᵀ) Q_Aᵀ; with the small
        SVD scale R_B R_Aᵀ = Ũ S Ṽᵀ, U = Q_B Ũ and Vh = Ṽᵀ Q_Aᵀ. S is descending, q = min(r, n_out, n_in).
        """
        q_b, r_b = linalg.qr(self.B)  # (n_out, q_b), (q_b, r)
        q_a, r_a = linalg.qr(self.A.T)  # (n_in, q_a), (q_a, r)
        u, s, vh = linalg.svd(self.scale * (r_b @ r_a.T), full_matrices=False)  # (q_b, q_a)
        return q_b @ u, s, vh @ q_a.T

    def svdvals(self) -> Float[Tensor, " q"]:
        """Singular values of ΔW (descending, q = min(r, n_out, n_in) of them), via `svd`'s small core."""
        if self.rank == 0:
            return torch.zeros(0, dtype=torch.float64)
        r_b = linalg.qr(self.B, mode="r").R  # (q_b, r)
        r_a = linalg.qr(self.A.T, mode="r").R  # (q_a, r)
        return linalg.svdvals(self.scale * (r_b @ r_a.T))

    def __repr__(self) -> str:
        return f"LowRankDelta(shape={self.shape}, rank={self.rank}, scale={self.scale:g})"
