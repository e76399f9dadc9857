"""Rank-1 edits W' = W + α u vᵀ on a running model, two equivalent ways.

- ``mechanism="hook"`` adds α (vᵀa) u to the linear's output at its ``hook_out`` (a read at its
  ``hook_in`` in the same forward; nothing is mutated); `edit_hooks` applies k edits at once on k
  batch slices (the sweep's batched evaluation).
- ``mechanism="weight"`` writes the host parameter through `Model.edit` (restored bit-exactly on
  exit, also on exceptions).

Per-head edits are full-matrix edits with zero-padded vectors (`rwasym.models.embed_head`): u lives
in head h's output rows for W_Q/W_K/W_V (K/V index the ``n_key_value_heads`` heads under GQA), v in
head h's input columns for W_O. The directions themselves (u = ΔW v, targets, controls) are
`rwasym.math.rank1`; behavioural metrics are `rwasym.analyses.behaviour`.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError
from ..models import Model, embed_head, flatten_site, load

__all__ = ["MECHANISMS", "MODES", "edit_hooks", "rank1_edit"]

MECHANISMS = ("hook", "weight")
MODES = ("transplant", "ablate")


def edit_hooks(
    model: Model, matrix: str, U: Float[Tensor, "k *r n_out"], V: Float[Tensor, "k *r n_in"]
) -> list[tuple[str, Callable]]:
    """Forward hooks applying k rank-1 (or rank-r) edits at once, edit e on batch slice e.

    The forward's batch must be k·B rows laid out edit-major (row e·B + b, e.g.
    ``tokens.repeat(k, 1)``); edit e adds (vₑᵀ a) uₑ to the output of rows e·B:(e+1)·B, with a the
    linear's input captured at ``spec.hook_in`` in the same forward. Fold α into U. With U of shape
    (k, r, n_out) and V (k, r, n_in), edit e is the rank-r W + U[e]ᵀ V[e] = W + Σ_j U[e, j] V[e, j]ᵀ
    (the joint sweep's edits; hooks of several matrices may be active together). Hook tensors
    may be per-head shaped (…, heads, d_head): they are flattened with `flatten_site` and reshaped
    back. Use inside ``model.bridge.hooks(fwd_hooks=...)``.
    """
    spec = model.matrix(matrix)
    model.linear_hooks(matrix, "a hook edit")  # refuses expert matrices (no hooks of their own)
    if U.dim() == 2 and V.dim() == 2:
        U, V = U[:, None], V[:, None]  # rank 1
    if U.dim() != 3 or U.shape[::2] != (U.shape[0], spec.n_out) or V.shape != (*U.shape[:2], spec.n_in):
        raise RwasymError(
            f"{matrix} edits need U of shape (k, {spec.n_out}) and V of shape (k, {spec.n_in}) (or "
            f"(k, r, {spec.n_out}) and (k, r, {spec.n_in}) for rank r); got {tuple(U.shape)} and "
            f"{tuple(V.shape)}. Embed per-head vectors with embed_head."
        )
    k = U.shape[0]
    U = U.to(model.device, model.dtype)
    V = V.to(model.device, model.dtype)
    state: dict[str, Tensor] = {}

    def read(x: Tensor, hook: Any = None) -> Tensor:
        state["a"] = x
        return x

    def write(y: Tensor, hook: Any = None) -> Tensor:
        a = state.pop("a", None)
        if a is None:
            raise RwasymError(
                f"{matrix}: the input hook {spec.hook_in} did not fire before the output hook "
                f"{spec.hook_out}, so the edit cannot be applied; the bridge's hook layout does not "
                "match the registry (run model.self_check() to see which hooks fire)"
            )
        a = flatten_site(a, spec.n_in)  # (batch, pos, n_in)
        flat = flatten_site(y, spec.n_out)  # (batch, pos, n_out)
        if flat.shape[0] % k:
            raise RwasymError(
                f"a batch of {k} edits needs a forward batch that is a multiple of {k} "
                f"(edit-major: tokens.repeat({k}, 1)); got batch {flat.shape[0]}"
            )
        a = a.reshape(k, -1, spec.n_in)
        if U.shape[1] == 1:  # rank 1: one product per entry
            coef = torch.einsum("etn,en->et", a, V[:, 0])  # (k, B·pos)
            out = flat.reshape(k, -1, spec.n_out) + coef.unsqueeze(-1) * U[:, 0].unsqueeze(1)  # (k, B·pos, n_out)
        else:
            coef = torch.einsum("etn,ern->etr", a, V)  # (k, B·pos, r)
            out = flat.reshape(k, -1, spec.n_out) + torch.einsum("etr,ero->eto", coef, U)
        return out.reshape(y.shape)

    return [(spec.hook_in, read), (spec.hook_out, write)]


@contextlib.contextmanager
def rank1_edit(
    model: Any,
    matrix: str,
    u: Float[Tensor, " n_out"],
    v: Float[Tensor, " n_in"],
    alpha: float = 1.0,
    head: int | None = None,
    mechanism: str = "hook",
) -> Iterator[Model]:
    """Temporarily apply W' = W + α u vᵀ to ``matrix`` (or to head ``head`` of it).

    mechanism="hook": forward hooks add α (vᵀa) u at the linear's hook_out (a read at its
    hook_in); no parameter is touched. mechanism="weight": the host parameter is written through
    `Model.edit` and restored bit-exactly on exit, also when the body raises. Both give the same
    logits to float rounding. u, v: full-matrix vectors (n_out,), (n_in,), or the head's block
    (`unit_shape`) when ``head`` is given; v need not be unit here. Yields the `Model`. An expert of a
    mixture-of-experts MLP has no hooks of its own: mechanism="weight" only.

    Example::

        with rank1_edit(model, "blocks.0.attn.W_Q", u, v, alpha=2.0):
            logits = model.bridge(tokens)
    """
    model = load(model)
    spec = model.matrix(matrix)
    if mechanism not in MECHANISMS:
        raise RwasymError(f"mechanism must be one of {MECHANISMS}; got {mechanism!r}")
    u_full, v_full = embed_head(spec, u, v, head)
    alpha = float(alpha)
    if mechanism == "weight":
        with model.edit({matrix: model.weight(matrix) + alpha * torch.outer(u_full, v_full)}):
            yield model
        return
    hooks = edit_hooks(model, matrix, (alpha * u_full)[None], v_full[None])
    with model.bridge.hooks(fwd_hooks=hooks):
        yield model
