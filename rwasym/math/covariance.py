"""Streaming float64 statistics of activations (baukit `runningstats` style).

`RunningCovariance` accumulates a token count N, the sum s = Σ_t a_t and the sum of outer products
S = Σ_t a_t a_tᵀ of d-dimensional rows a_t, batch by batch, as *float64 sums* (each batch's d × d
product is formed in float32 about the batch mean for float32 and narrower inputs: see `add`).
Readouts are computed from the sums on demand; `merge` adds sums (an all-reduce is a sum);
`state_dict` makes the accumulator resumable. ``add(x, weights=w)`` accumulates frequency-weighted sums
(Σ w, Σ w a, Σ w a aᵀ), e.g. a mixture-of-experts routing weight per token.
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

    Weighted rows (``add(x, weights=w)``, w_t ≥ 0 finite): the sums become W = Σ_t w_t, s = Σ_t w_t a_t,
    S = Σ_t w_t a_t a_tᵀ (rows added without weights have w_t = 1, so an accumulator never given weights
    is the unweighted one, bit for bit). The weights are *frequency-style*: w_t counts how much of row t
    there is (an integer w_t is the row repeated w_t times), not a reliability weight (no effective-sample
    correction Σw² / (Σw)² is applied). Readouts: μ̃ = s / W; second moment S / W; covariance
    Σ_t w_t (a_t − μ̃)(a_t − μ̃)ᵀ / W = (S − W μ̃ μ̃ᵀ) / W with ``unbiased=False``, and / (W − 1) with
    ``unbiased=True`` (the frequency-weight correction: `torch.cov(fweights=w)`, which equals the
    unweighted covariance of the repeated rows for integer weights). `count` stays the number of rows
    added; `weight_sum` is W (= `count` when no weights were given).

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
        self._weight_sum = 0.0  # W = Σ w_t: equals _count exactly until a weighted add (then _weighted)
        self._weighted = False
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
    def _rows(
        self, x: Tensor, weight_mask: Tensor | None, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Validate a batch and return the selected rows (n, d) on the device: float64 for float64
        inputs or ``gram_dtype=torch.float64``, else float32; and their weights (n,) float64, or None."""
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
                w = None if weights is None else self._weights(weights, x)[flat.to(self.device)]
                return self._cast(rows), w
        return self._cast(rows), None if weights is None else self._weights(weights, x)

    def _cast(self, rows: Tensor) -> Tensor:
        wide = rows.dtype == torch.float64 or self.gram_dtype == torch.float64
        return rows.to(device=self.device, dtype=torch.float64 if wide else torch.float32)

    def _weights(self, weights: Tensor, x: Tensor) -> Float[Tensor, " n"]:
        """The weights of all rows of ``x`` (its leading shape), checked: float64 (n,) on the device."""
        what = f"weights of {self.label()}.add"
        w = require_floating(require_tensor(weights, what), what)
        if w.shape != x.shape[:-1]:
            raise RwasymError(
                f"{what} must have the leading shape {tuple(x.shape[:-1])} of the input (one weight per row; input "
                f"shape {shape_str(x)}); got shape {tuple(w.shape)}."
            )
        w = w.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise RwasymError(
                f"{what} must be finite and non-negative (frequency weights: how much each row counts); got values "
                f"in [{float(w.min())}, {float(w.max())}]. Pass e.g. routing weights, not log-probabilities."
            )
        return w

    def add(
        self,
        x: Float[Tensor, "*batch d"],
        weight_mask: Bool[Tensor, "*batch"] | None = None,
        *,
        weights: Float[Tensor, "*batch"] | None = None,
    ) -> None:
        """Add the rows of `x` (all leading axes flattened), or only those where `weight_mask`; with
        ``weights`` (one finite w_t ≥ 0 per row) add Σ w_t, Σ w_t a_t and Σ w_t a_t a_tᵀ instead (see the
        class docstring: frequency weights)."""
        self._require_sums()
        rows, w = self._rows(x, weight_mask, weights)  # (n, d) float32 or float64; (n,) float64 or None
        if w is not None:
            self._add_weighted(rows, w)
            return
        row_sum = rows.sum(dim=0, dtype=torch.float64)
        # Σ over rows is finite iff every selected entry is (float64 cannot overflow from
        # fp16/bf16/fp32 inputs): an O(d) check instead of a pass over the batch. Nothing is
        # added when it fails.
        if not bool(torch.isfinite(row_sum).all()):
            require_finite(rows, f"the input to {self.label()}.add (selected rows)")
        n = rows.shape[0]
        self._count += n
        self._weight_sum += n
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

    def _add_weighted(self, rows: Tensor, w: Float[Tensor, " n"]) -> None:
        """Add Σ w, Σ w a and Σ w a aᵀ of selected rows (n, d) with float64 weights (n,). The product is
        formed as in `add`: float64 throughout for float64 rows, else a float32 product about the batch's
        weighted mean m with the exact float64 correction Σ w a aᵀ = Σ w (a − m)(a − m)ᵀ + m s_wᵀ + s_w mᵀ
        − W_b m mᵀ (s_w = Σ w a, W_b = Σ w of the batch)."""
        row_sum = (w[:, None] * rows.double()).sum(dim=0)  # s_w (d,)
        if not bool(torch.isfinite(row_sum).all()):
            require_finite(rows, f"the input to {self.label()}.add (selected rows)")
        n, total = rows.shape[0], float(w.sum())
        self._count += n
        self._weight_sum += total
        self._weighted = True
        self._sum += row_sum
        if rows.dtype == torch.float64:
            self._sum_outer.addmm_(rows.T, rows * w[:, None])
        elif n > 0 and total > 0:
            m64 = row_sum / total
            centred = rows - m64.float()
            step = self.dim if self.dim < _BLOCKED_ABOVE else _PRODUCT_BLOCK
            scaled = centred * w.float()[:, None]
            for start in range(0, self.dim, step):
                self._sum_outer[:, start : start + step] += centred.T @ scaled[:, start : start + step]
            m = m64.float().double()  # the centre actually subtracted (its float32 value)
            self._sum_outer.addr_(m, row_sum).addr_(row_sum, m).addr_(m, m, alpha=-total)

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
        self._weight_sum += other._weight_sum
        self._weighted |= other._weighted
        self._sum += other._sum.to(self.device)
        self._sum_outer += other._sum_outer.to(self.device)
        return self

    def __iadd__(self, other: "RunningCovariance") -> "RunningCovariance":
        return self.merge(other)

    def all_reduce(self) -> "RunningCovariance":
        """Sum N, W, s and S over all ranks of the default process group, in place; return self.

        One float64 all-reduce of the packed vector [N, W, s, vec(S)] (N is exact in float64 up to
        2⁵³ tokens; W = Σ w, equal to N unless weights were added); afterwards every rank holds the sums
        of every rank's rows. A no-op without an initialised process group or with a single rank (see
        `rwasym.distributed`).
        """
        if not distributed.is_distributed():
            return self
        self._require_sums()
        packed = torch.cat(
            [
                torch.tensor([float(self._count), self._weight_sum], dtype=torch.float64, device=self.device),
                self._sum,
                self._sum_outer.reshape(-1),
            ]
        )  # (2 + d + d²,)
        distributed.all_reduce_sum_(packed)
        self._count = int(round(float(packed[0])))
        self._weight_sum = float(packed[1])
        self._weighted = self._weighted or self._weight_sum != self._count
        self._sum.copy_(packed[2 : 2 + self.dim])
        self._sum_outer.copy_(packed[2 + self.dim :].reshape(self.dim, self.dim))
        return self

    # ----------------------------------------------------------------------------- readouts
    @property
    def count(self) -> int:
        """Number of rows (tokens) accumulated so far (weighted or not)."""
        return self._count

    @property
    def weight_sum(self) -> float:
        """W = Σ_t w_t of the rows accumulated so far (= `count` when no weights were given)."""
        return self._weight_sum if self._weighted else float(self._count)

    def _total(self) -> int | float:
        """The divisor of the readouts: N (an int, as before weights existed) or W for a weighted accumulator."""
        return self._weight_sum if self._weighted else self._count

    def _require_tokens(self, what: str, minimum: int = 1) -> None:
        if self._weighted and self._count > 0:
            if self._weight_sum <= 0 or (minimum > 1 and self._weight_sum <= 1):
                raise RwasymError(
                    f"{self.label()} holds weight sum W={self._weight_sum:g} over {self._count} row(s); its {what} "
                    f"divides by {'W - 1' if minimum > 1 else 'W'} and needs W > {1 if minimum > 1 else 0}; accumulate "
                    "more rows, or pass unbiased=False (divide by W)."
                )
            return
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
        """μ = s / N, float64 (d,) (μ̃ = s / W for weighted rows)."""
        self._require_tokens("mean")
        return self._sum / self._total()

    @property
    def scatter(self) -> Float[Tensor, "d d"]:
        """S = Σ_t a_t a_tᵀ itself (float64, not a copy: read it, do not modify it)."""
        self._require_sums()
        return self._sum_outer

    def second_moment(self) -> Float[Tensor, "d d"]:
        """Uncentered second moment S / N = (1/N) Σ_t a_t a_tᵀ, float64 (d, d) (S / W for weighted rows)."""
        self._require_tokens("second moment")
        self._require_sums()
        return self._sum_outer / self._total()

    def covariance(self, center: bool = True, unbiased: bool = True, *, consume: bool = False) -> Float[Tensor, "d d"]:
        """Covariance from the sums, float64 (d, d), symmetrised.

        center=True:  (S − N μ μᵀ) / (N − 1)   (unbiased, = torch.cov) or / N (unbiased=False); for
        weighted rows N is W = Σ w (see the class docstring: / (W − 1) = torch.cov(fweights=w)).
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
            return self._sum_outer.div_(self._total()) if consume else self._sum_outer / self._total()
        self._require_tokens("covariance", minimum=2 if unbiased else 1)
        total = self._total()
        mu = self._sum / total  # (d,)
        denom = total - 1 if unbiased else total
        # (S − N μ μᵀ) / denom, then (C + Cᵀ)/2, by row blocks into one d × d result: the same elementwise
        # operations as the whole-matrix expressions (bit for bit), with block-sized temporaries only; each
        # row block of the first pass reads only the same rows of S, so S's storage can be that result
        cov = self._sum_outer if consume else torch.empty_like(self._sum_outer)
        self._consumed = consume
        step = max(1, _COV_BLOCK_BYTES // (8 * max(1, self.dim)))
        for i in range(0, self.dim, step):
            cov[i : i + step] = (self._sum_outer[i : i + step] - total * torch.outer(mu[i : i + step], mu)) / denom
        for i in range(0, self.dim, step):
            j = i + step
            upper = 0.5 * (cov[i:j, i:] + cov[i:, i:j].T)  # rows i:j from column i on, and their mirror
            cov[i:j, i:] = upper
            cov[i:, i:j] = upper.T
        return cov

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, int | Tensor]:
        """Plain ints and float64 CPU tensors: dim, count, sum (d,), sum_outer (d, d); and weight_sum (a
        float64 scalar tensor W) only for an accumulator given weights, so unweighted states are unchanged."""
        self._require_sums()
        state: dict[str, int | Tensor] = {
            "dim": self.dim,
            "count": self._count,
            "sum": self._sum.detach().cpu().clone(),
            "sum_outer": self._sum_outer.detach().cpu().clone(),
        }
        if self._weighted:
            state["weight_sum"] = torch.tensor(self._weight_sum, dtype=torch.float64)
        return state

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
        weight_sum = state.get("weight_sum")
        self._weighted = weight_sum is not None
        self._weight_sum = (
            float(_state_tensor(weight_sum, "weight_sum", ())) if weight_sum is not None else float(count)
        )
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
