"""Typed views of the few torch entry points whose stubs a strict type checker cannot see through.

``torch.linalg`` and ``torch.special`` are bound at import time to the C extension modules
``torch._C._linalg`` / ``torch._C._special``, which ship without ``.pyi`` stubs, so every function
in them is Unknown to pyright. ``Tensor.tolist`` is stubbed as returning a bare ``list`` and
``torch.from_numpy`` as taking a bare ``numpy.ndarray`` (both partially Unknown).

The views below are the *same objects* (``typing.cast`` is the identity at run time), typed with
the signatures torch documents, restricted to the arguments rwasym uses. Nothing here computes
anything, and the result NamedTuples are only the static shape of torch's ``torch.return_types``
structseqs (``linalg_svd``, ``linalg_eigh``, ``linalg_qr``): unpacking and attribute access behave
the same; never ``isinstance``-check against them.
"""

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol, cast

import torch
from numpy.typing import NDArray
from torch import Tensor

__all__ = ["EighResult", "QRResult", "SVDResult", "from_numpy", "linalg", "special", "tolist"]


class SVDResult(NamedTuple):
    """Static shape of ``torch.return_types.linalg_svd``: A = U diag(S) Vh."""

    U: Tensor
    S: Tensor
    Vh: Tensor


class EighResult(NamedTuple):
    """Static shape of ``torch.return_types.linalg_eigh`` (eigenvalues ascending)."""

    eigenvalues: Tensor
    eigenvectors: Tensor


class QRResult(NamedTuple):
    """Static shape of ``torch.return_types.linalg_qr``: A = Q R."""

    Q: Tensor
    R: Tensor


class _Linalg(Protocol):
    """The part of ``torch.linalg`` rwasym calls."""

    def svd(self, A: Tensor, full_matrices: bool = ...) -> SVDResult: ...

    def svdvals(self, A: Tensor) -> Tensor: ...

    def eigh(self, A: Tensor) -> EighResult: ...

    def eigvalsh(self, A: Tensor) -> Tensor: ...

    def qr(self, A: Tensor, mode: Literal["reduced", "complete", "r"] = ...) -> QRResult: ...

    def matrix_norm(self, A: Tensor) -> Tensor: ...

    def vector_norm(
        self, x: Tensor, ord: float = ..., dim: int | Sequence[int] | None = ..., keepdim: bool = ...
    ) -> Tensor: ...


class _Special(Protocol):
    """The part of ``torch.special`` rwasym calls."""

    def xlogy(self, input: Tensor | float, other: Tensor | float) -> Tensor: ...


class _FromNumpy(Protocol):
    def from_numpy(self, ndarray: NDArray[Any]) -> Tensor: ...


class _ToList(Protocol):
    def tolist(self) -> Any: ...


linalg = cast(_Linalg, torch.linalg)
special = cast(_Special, torch.special)
from_numpy = cast(_FromNumpy, torch).from_numpy  # the builtin torch.from_numpy itself


def tolist(x: Tensor) -> Any:
    """``x.tolist()``: nested Python lists of the entries (a Python scalar for a 0-d tensor)."""
    return cast(_ToList, x).tolist()
