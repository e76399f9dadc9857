"""Streaming float64 statistics of activations (baukit `runningstats` style).

`RunningCovariance` accumulates a token count N, the sum s = Σ_t a_t and the sum of outer products
S = Σ_t a_t a_tᵀ of d-dimensional rows a_t, batch by batch, as *float64 sums* (each batch's d × d
product is formed in float32 about the batch mean for float32 and narrower inputs: see `add`).
Readouts are computed from the sums on demand; `merge` adds sums (an all-reduce is a sum);
`state_dict` makes the accumulator resumable.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .. import distributed
from ..errors import RwasymError
from .checks import require_finite, require_floating, require_int, require_tensor, shape_str

__all__ = ["RunningCovariance"]

_STATE_KEYS = ("dim", "count", "sum", "sum_outer")

_BLOCKED_ABOVE = 8192  # sites at least this wide form their float32 product in column blocks
_PRODUCT_BLOCK = 2048
_COV_BLOCK_BYTES = 64 * 2**20  # float64 bytes of one row block of `covariance`'s temporaries


class RunningCovariance:
    """Streaming count, mean, second moment and covariance of d-dimensional rows, in float64.

    Accumulation (float64 sums, not Welford/Chan updates): every batch is added into

        N = Σ_t 1,   s = Σ_t a_t  (d,),   S = Σ_t a_t a_tᵀ  (d, d).

    s is summed in float64. For float32 / float16 / bfloat16 inputs the batch's d × d product is a
    float32 GEMM about the batch mean m (fp32, half the cost of a float64 GEMM on a CPU), added in
    float64 as Σ_b a aᵀ = Σ_b (a − m)(a − m)ᵀ + m s_bᵀ + s_b mᵀ − n_b m mᵀ (exact algebra for any m);
    centring first keeps the float32 rounding relative to the batch's spread, not to ‖μ‖², which is
    large in residual streams with massive activations. ``gram_dtype=torch.float64`` (and float64
    inputs) forms the product in float64 throughout.

    Readouts: mean μ = s / N; uncentered second moment S / N; covariance
    (S − N μ μᵀ) / (N − 1), which equals `torch.cov` of the concatenated rows. Sums make `merge`
    exact and order-free up to float64 rounding, so shards reduce with a plain all-reduce.
    Trade-offs: the centered covariance is a difference of sums, so its relative error grows like
    ε₆₄ · ‖μ‖² / λ (λ the eigenvalue of interest; negligible with ε₆₄ ≈ 1e-16); the float32 products
    add an error of order ε₃₂ · √n_b · (the batch's spread) per entry, which moves the top
    eigenvectors of real activations by ~1e-6 (tests/test_precision.py bounds it against float64).

    Input dtypes float16 / bfloat16 / float32 / float64 are accepted (the upcasts are exact);
    `*batch` leading axes are flattened, and `weight_mask` (same `*batch` shape, bool) selects the
    rows to count, e.g. the attention mask to drop padding.

    Example:
        >>> acc = RunningCovariance(4)
        >>> acc.add(torch.randn(2, 8, 4), weight_mask=torch.ones(2, 8, dtype=torch.bool))
        >>> acc.count, acc.covariance().shape
        (16, torch.Size([4, 4]))
    """

    def __init__(
        self,
        dim: int,
        *,
        name: str | None = None,
        device: torch.device | str = "cpu",
        gram_dtype: torch.dtype | None = None,
    ) -> None:
        dim = require_int(dim, "dim")
        if dim <= 0:
            raise RwasymError(f"RunningCovariance dim must be a positive integer; got dim={dim}.")
        if gram_dtype not in (None, torch.float32, torch.float64):
            raise RwasymError(
                f"gram_dtype must be None (float32 products for float32-or-narrower inputs), "
                f"torch.float32 or torch.float64; got {gram_dtype!r}."
            )
        self.gram_dtype = gram_dtype
        self.dim = dim
        self.name = name
        self.device = torch.device(device)
        self._count = 0
        self._sum: Tensor = torch.zeros(dim, dtype=torch.float64, device=self.device)  # (d,)
        self._sum_outer: Tensor = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)  # (d, d)
        self._consumed = False  # covariance(consume=True) turned S into C in place: only N and s remain

    def __repr__(self) -> str:
        return f"RunningCovariance(dim={self.dim}, count={self._count}, name={self.name!r})"

    def _require_sums(self) -> None:
        if self._consumed:
            raise RwasymError(
                f"{self.label()} gave its d × d sum to covariance(consume=True), which turned it into the covariance "
                "in place: it can no longer accumulate or report S (its count and mean remain). Accumulate into a "
                "new RunningCovariance, or call covariance() without consume to keep the sums."
            )

    def label(self) -> str:
        """How this accumulator is named in error messages (its dim, and its statistic's name if set)."""
        label = f"RunningCovariance(dim={self.dim})"
        return f"{label} for statistic {self.name!r}" if self.name else label

    # ----------------------------------------------------------------------------- accumulation
    def _rows(self, x: Tensor, weight_mask: Tensor | None) -> Tensor:
        """Validate a batch and return the selected rows (n, d) on the device: float64 for float64
        inputs or ``gram_dtype=torch.float64``, else float32."""
        what = f"the input to {self.label()}.add"
        x = require_floating(require_tensor(x, what), what)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise RwasymError(
                f"{what} must have trailing dimension d={self.dim}; got shape {shape_str(x)}. "
                "Pass activations shaped (..., d) for the site this accumulator was made for."
            )
        rows = x.detach().reshape(-1, self.dim)  # (n, d)
        if weight_mask is not None:
            mask = require_tensor(weight_mask, "weight_mask")
            if mask.dtype != torch.bool:
                raise RwasymError(
                    f"weight_mask must be a bool tensor selecting rows; got dtype {mask.dtype}. "
                    "Convert an attention mask with `attention_mask.bool()`."
                )
            if mask.shape != x.shape[:-1]:
                raise RwasymError(
                    f"weight_mask shape {tuple(mask.shape)} must equal the leading shape "
                    f"{tuple(x.shape[:-1])} of the input (input shape {shape_str(x)})."
                )
            flat = mask.reshape(-1).to(rows.device)
            if not bool(flat.all()):  # skip the copy in the common unpadded case
                rows = rows[flat]
        wide = rows.dtype == torch.float64 or self.gram_dtype == torch.float64
        return rows.to(device=self.device, dtype=torch.float64 if wide else torch.float32)

    def add(
        self,
        x: Float[Tensor, "*batch d"],
        weight_mask: Bool[Tensor, "*batch"] | None = None,
    ) -> None:
        """Add the rows of `x` (all leading axes flattened), or only those where `weight_mask`."""
        self._require_sums()
        rows = self._rows(x, weight_mask)  # (n, d) float32 or float64
        row_sum = rows.sum(dim=0, dtype=torch.float64)
        # Σ over rows is finite iff every selected entry is (float64 cannot overflow from
        # fp16/bf16/fp32 inputs): an O(d) check instead of a pass over the batch. Nothing is
        # added when it fails.
        if not bool(torch.isfinite(row_sum).all()):
            require_finite(rows, f"the input to {self.label()}.add (selected rows)")
        n = rows.shape[0]
        self._count += n
        self._sum += row_sum
        if rows.dtype == torch.float64:
            self._sum_outer.addmm_(rows.T, rows)
        elif n > 0:  # float32 product about the batch mean, then the exact float64 correction
            m = rows.mean(dim=0)  # (d,) float32
            centred = rows - m
            m64 = m.double()
            # the float32 product added in place (converted exactly; no float64 copy of it); very wide sites
            # (an 8B MLP hidden state: d 14,336) in column blocks, so the temporary is d × block, not d²
            step = self.dim if self.dim < _BLOCKED_ABOVE else _PRODUCT_BLOCK
            for start in range(0, self.dim, step):
                self._sum_outer[:, start : start + step] += centred.T @ centred[:, start : start + step]
            self._sum_outer.addr_(m64, row_sum).addr_(row_sum, m64).addr_(m64, m64, alpha=-float(n))

    def merge(self, other: "RunningCovariance") -> "RunningCovariance":
        """Add another accumulator's sums into this one (in place) and return self."""
        if not isinstance(other, RunningCovariance):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise RwasymError(f"can only merge a RunningCovariance; got {type(other).__name__}.")
        self._require_sums()
        other._require_sums()
        if other.dim != self.dim:
            raise RwasymError(
                f"cannot merge {other.label()} into {self.label()}: dimensions differ "
                f"({other.dim} != {self.dim}); merge accumulators of the same site."
            )
        self._count += other._count
        self._sum += other._sum.to(self.device)
        self._sum_outer += other._sum_outer.to(self.device)
        return self

    def __iadd__(self, other: "RunningCovariance") -> "RunningCovariance":
        return self.merge(other)

    def all_reduce(self) -> "RunningCovariance":
        """Sum N, s and S over all ranks of the default process group, in place; return self.

        One float64 all-reduce of the packed vector [N, s, vec(S)] (N is exact in float64 up to
        2⁵³ tokens); afterwards every rank holds the sums of every rank's rows. A no-op without
        an initialised process group or with a single rank (see `rwasym.distributed`).
        """
        if not distributed.is_distributed():
            return self
        self._require_sums()
        packed = torch.cat(
            [
                torch.tensor([float(self._count)], dtype=torch.float64, device=self.device),
                self._sum,
                self._sum_outer.reshape(-1),
            ]
        )  # (1 + d + d²,)
        distributed.all_reduce_sum_(packed)
        self._count = int(round(float(packed[0])))
        self._sum.copy_(packed[1 : 1 + self.dim])
        self._sum_outer.copy_(packed[1 + self.dim :].reshape(self.dim, self.dim))
        return self

    # ----------------------------------------------------------------------------- readouts
    @property
    def count(self) -> int:
        """Number of rows (tokens) accumulated so far."""
        return self._count

    def _require_tokens(self, what: str, minimum: int = 1) -> None:
        if self._count == 0:
            raise RwasymError(
                f"{self.label()} is empty: no tokens were accumulated (count=0), so its {what} "
                "is undefined; check the data / attention mask (an empty batch or an all-False "
                "weight_mask adds nothing)."
            )
        if self._count < minimum:
            raise RwasymError(
                f"{self.label()} holds count={self._count} token(s) but the unbiased {what} "
                f"divides by N - 1 and needs at least {minimum}; accumulate more tokens or pass "
                "unbiased=False."
            )

    def mean(self) -> Float[Tensor, " d"]:
        """μ = s / N, float64 (d,)."""
        self._require_tokens("mean")
        return self._sum / self._count

    @property
    def scatter(self) -> Float[Tensor, "d d"]:
        """S = Σ_t a_t a_tᵀ itself (float64, not a copy: read it, do not modify it)."""
        self._require_sums()
        return self._sum_outer

    def second_moment(self) -> Float[Tensor, "d d"]:
        """Uncentered second moment S / N = (1/N) Σ_t a_t a_tᵀ, float64 (d, d)."""
        self._require_tokens("second moment")
        self._require_sums()
        return self._sum_outer / self._count

    def covariance(self, center: bool = True, unbiased: bool = True, *, consume: bool = False) -> Float[Tensor, "d d"]:
        """Covariance from the sums, float64 (d, d), symmetrised.

        center=True:  (S − N μ μᵀ) / (N − 1)   (unbiased, = torch.cov) or / N (unbiased=False).
        center=False: S / N, the uncentered second moment; no degree of freedom is spent on a
        mean, so `unbiased` is ignored.
        consume=True: C is formed in S's own storage (the same bits; no second d × d matrix: 6.6 GB at a 70B
        model's 28,672-wide MLP state) and the accumulator keeps only N and s (`count`, `mean`); anything
        that needs S afterwards raises.
        """
        self._require_sums()
        if not center:
            self._require_tokens("second moment")
            self._consumed = consume
            return self._sum_outer.div_(self._count) if consume else self._sum_outer / self._count
        self._require_tokens("covariance", minimum=2 if unbiased else 1)
        mu = self._sum / self._count  # (d,)
        denom = self._count - 1 if unbiased else self._count
        # (S − N μ μᵀ) / denom, then (C + Cᵀ)/2, by row blocks into one d × d result: the same elementwise
        # operations as the whole-matrix expressions (bit for bit), with block-sized temporaries only; each
        # row block of the first pass reads only the same rows of S, so S's storage can be that result
        cov = self._sum_outer if consume else torch.empty_like(self._sum_outer)
        self._consumed = consume
        step = max(1, _COV_BLOCK_BYTES // (8 * max(1, self.dim)))
        for i in range(0, self.dim, step):
            cov[i : i + step] = (
                self._sum_outer[i : i + step] - self._count * torch.outer(mu[i : i + step], mu)
            ) / denom
        for i in range(0, self.dim, step):
            j = i + step
            upper = 0.5 * (cov[i:j, i:] + cov[i:, i:j].T)  # rows i:j from column i on, and their mirror
            cov[i:j, i:] = upper
            cov[i:, i:j] = upper.T
        return cov

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, int | Tensor]:
        """Plain ints and float64 CPU tensors: dim, count, sum (d,), sum_outer (d, d)."""
        self._require_sums()
        return {
            "dim": self.dim,
            "count": self._count,
            "sum": self._sum.detach().cpu().clone(),
            "sum_outer": self._sum_outer.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, int | Tensor]) -> None:
        """Replace this accumulator's sums by those in `state` (from `state_dict`)."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise RwasymError(
                f"state dict for {self.label()} is missing keys {missing}; expected keys "
                f"{list(_STATE_KEYS)} as written by RunningCovariance.state_dict()."
            )
        dim, count = require_int(state["dim"], "state['dim']"), require_int(state["count"], "state['count']")
        if dim != self.dim:
            raise RwasymError(f"state dict has dim={dim} but {self.label()} has dim={self.dim}.")
        if count < 0:
            raise RwasymError(f"state dict has a negative count={count}; the file is corrupt.")
        s = _state_tensor(state["sum"], "sum", (dim,))
        S = _state_tensor(state["sum_outer"], "sum_outer", (dim, dim))
        self._count = count
        self._sum = s.detach().to(device=self.device, dtype=torch.float64).clone()
        self._sum_outer = S.detach().to(device=self.device, dtype=torch.float64).clone()
        self._consumed = False

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, int | Tensor],
        *,
        name: str | None = None,
        device: torch.device | str = "cpu",
    ) -> "RunningCovariance":
        """Build an accumulator from `state_dict()` output."""
        if "dim" not in state:
            raise RwasymError("state dict has no 'dim' key; pass the output of RunningCovariance.state_dict().")
        acc = cls(require_int(state["dim"], "state['dim']"), name=name, device=device)
        acc.load_state_dict(state)
        return acc


def _state_tensor(value: object, key: str, shape: tuple[int, ...]) -> Tensor:
    """``value`` (read from ``state[key]``), which must be a tensor of ``shape``."""
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        got = shape_str(value) if isinstance(value, Tensor) else type(value).__name__
        raise RwasymError(f"state['{key}'] must be a tensor of shape {shape}; got {got}.")
    return value
