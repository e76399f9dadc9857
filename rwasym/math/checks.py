"""Input validation: the one set of validators every layer of rwasym uses.

Every helper raises `RwasymError` with the rule, the value received and the fix, and returns the
input converted to the form the math uses (float64 on CPU, plain ints).
"""

import contextlib
import operator
from collections.abc import Generator
from typing import TYPE_CHECKING, Literal, SupportsIndex, cast

import torch
from torch import Tensor

from ..errors import RwasymError

if TYPE_CHECKING:
    import ctypes


def shape_str(x: Tensor) -> str:
    """`(3, 4)`-style shape text for error messages."""
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def require_tensor(x: object, what: str) -> Tensor:
    """Return `x` if it is a torch Tensor, else raise naming `what`."""
    if not isinstance(x, Tensor):
        raise RwasymError(f"{what} must be a torch.Tensor; got {type(x).__name__}.")
    return x


def require_floating(x: Tensor, what: str) -> Tensor:
    """Reject integer, bool and complex tensors (real floating dtypes only)."""
    if not x.is_floating_point():
        raise RwasymError(
            f"{what} must have a real floating-point dtype (float16, bfloat16, float32, float64); "
            f"got dtype {x.dtype} with shape {shape_str(x)}. Integer input usually means token ids "
            "were passed instead of activations or weights; otherwise cast with `.float()`."
        )
    return x


_FINITE_CHUNK = 1 << 22  # entries checked at once: torch.isfinite's temporaries are ≈ 1.4× its input's bytes


def _all_finite(x: Tensor) -> bool:
    """Whether every entry is finite, checked in chunks of `_FINITE_CHUNK` entries: a 28,672² float64
    covariance (6.6 GB) checked whole made ≈ 9 GB of temporaries, which ran a 24 GB machine out of memory."""
    if x.numel() <= _FINITE_CHUNK or not x.is_contiguous():
        return bool(torch.isfinite(x).all())
    flat = x.reshape(-1)  # a view of a contiguous tensor
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def require_finite(x: Tensor, what: str) -> Tensor:
    """Reject tensors holding NaN or Inf, saying how many entries are bad and of which kind (checked in chunks:
    no temporary the size of ``x``)."""
    if not _all_finite(x):
        finite = torch.isfinite(x)
        bad, n_nan = int((~finite).sum()), int(torch.isnan(x).sum())
        raise RwasymError(
            f"{what} contains {bad} non-finite value(s) out of {x.numel()} (shape {shape_str(x)}): {n_nan} NaN "
            f"and {bad - n_nan} Inf. Check the checkpoint or the computation: non-finite values usually come "
            "from fp16 overflow or a diverged checkpoint; run the model in float32/bfloat16, repair them "
            "(torch.nan_to_num) or find where they came from upstream."
        )
    return x


def as_float64_array(x: object, what: str, ndim: int = 2) -> Tensor:
    """Validate a non-empty, finite tensor with ``ndim`` axes (any numeric dtype); float64 CPU copy."""
    if not isinstance(x, Tensor):
        raise RwasymError(f"{what} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    if x.ndim != ndim:
        raise RwasymError(
            f"{what} must have {ndim} axes, got shape {tuple(x.shape)}; "
            "reshape it (e.g. x.reshape(-1, x.shape[-1]) for activations)"
        )
    if x.numel() == 0:
        raise RwasymError(
            f"{what} is empty (shape {tuple(x.shape)}); pass a tensor with at least one entry along every axis"
        )
    return require_finite(x.detach().to(device="cpu", dtype=torch.float64), what)


def require_vector(x: object, n: int, what: str) -> Tensor:
    """A finite float64 CPU vector of length n, or RwasymError naming the problem."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise RwasymError(
            f"{what} must be a floating-point torch.Tensor of shape ({n},); got {type(x).__name__}"
            f"{'' if not isinstance(x, Tensor) else ' of dtype ' + str(x.dtype)}."
        )
    x = x.detach().to("cpu", torch.float64)
    if x.dim() != 1 or x.shape[0] != n:
        raise RwasymError(
            f"{what} must be a vector of shape ({n},); got shape {tuple(x.shape)}. "
            "Check which side of the matrix (n_out × n_in, y = W a) it belongs to."
        )
    return require_finite(x, what)


def require_matrix(x: object, what: str) -> Tensor:
    """Return `x` if it is a real floating 2-D tensor (no conversion, no finiteness check)."""
    x = require_floating(require_tensor(x, what), what)
    if x.ndim != 2:
        raise RwasymError(f"{what} must be a 2-D matrix; got shape {shape_str(x)} ({x.ndim}-D).")
    return x


def as_float64_matrix(x: object, what: str) -> Tensor:
    """Validate a finite real 2-D tensor and return it detached as float64 on CPU."""
    x64 = require_matrix(x, what).detach().to(device="cpu", dtype=torch.float64)
    return require_finite(x64, what)


def require_int(value: object, what: str) -> int:
    """Coerce an integer-like value (int, numpy int, 0-d integer tensor) to a Python int."""
    if isinstance(value, bool):
        raise RwasymError(f"{what} must be an integer; got the bool {value!r}.")
    try:  # operator.index raises TypeError for any value without __index__ (typeshed wants SupportsIndex)
        return operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise RwasymError(f"{what} must be an integer; got {value!r} ({type(value).__name__}).") from None


def require_positive_int(value: object, what: str) -> int:
    """Coerce to int and check >= 1."""
    value = require_int(value, what)
    if value <= 0:
        raise RwasymError(f"{what} must be a positive integer; got {what}={value}.")
    return value


def require_k(k: object, n: int, what: str) -> int:
    """Check 1 <= k <= n for a subspace dimension k inside a space of dimension n."""
    k = require_int(k, "k")
    if k <= 0:
        raise RwasymError(f"k={k} must be a positive subspace dimension; choose 1 <= k <= n={n}.")
    if k > n:
        raise RwasymError(f"k={k} exceeds the dimension n={n} of {what}; choose 1 <= k <= n={n}.")
    return k


def require_orthonormal(U: Tensor, what: str, tol: float = 1e-4) -> None:
    """Check UᵀU = I to `tol` (max abs entry); U is (n, k) float64."""
    if U.shape[1] > U.shape[0]:
        raise RwasymError(
            f"{what} has k={U.shape[1]} columns but only n={U.shape[0]} rows, so its columns cannot "
            "be orthonormal; pass an (n, k) basis with k <= n (columns are basis vectors)."
        )
    gram = U.T @ U  # (k, k)
    err = float((gram - torch.eye(U.shape[1], dtype=U.dtype)).abs().max()) if U.shape[1] else 0.0
    if err > tol:
        raise RwasymError(
            f"{what} must have orthonormal columns (UᵀU = I); got max |UᵀU - I| = {err:.3g} > {tol:g} "
            f"for shape {shape_str(U)}. Use a basis from rwasym.math.subspaces (Basis.U) or "
            "orthonormalise with `torch.linalg.qr(U).Q`."
        )


@contextlib.contextmanager
def linalg_threads(n: int = 1) -> Generator[None, None, None]:
    """Run small dense linear algebra (QR / eigh / SVD of ≤ 1k matrices) on ``n`` threads.

    On small matrices OpenMP thread start-up dominates: measured on 2 CPU cores, a batched
    (16, 512, 8) QR took 16 ms with 2 threads and 0.35 ms with 1. Restores the count on exit.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def release_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Freed float64 matrices of a few MB stay in the heap once glibc raises its mmap threshold, so
    a loop that frees one layer's matrices and allocates the next one's shows a growing RSS; the
    long drivers (probe layer by layer) call this after each release so their peak RSS is what
    is alive, not what was ever freed."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def available_memory() -> int:
    """Bytes of memory available to a new allocation now: ``MemAvailable`` of /proc/meminfo (Linux: free
    memory plus reclaimable caches), else the free physical pages (``os.sysconf``), else 8 GiB. Memory budgets
    (the probe's ``stats_budget``) derive from it, not from the model's size."""
    import os

    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


_libc: "ctypes.CDLL | Literal[False] | None" = None  # None: not looked up yet; False: no malloc_trim
