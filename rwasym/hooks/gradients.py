"""Gradient anisotropy: per-token inputs a_t and upstream gradients δ_t of a linear map.

A linear map y = W a receives ΔW = −η Σ_t δ_t a_tᵀ with δ_t = ∂L/∂y_t, so ΔW inherits structure
from whichever side has the concentrated covariance: C_a = Σ a aᵀ (read side) or
C_δ = Σ δ δᵀ (write side). This module streams, per studied matrix and in float64,
C_a (forward hook at the linear's ``hook_in``), C_δ (a tensor hook on the linear's ``hook_out``,
i.e. the gradient of the loss with respect to the linear's output) and G = Σ_t δ_t a_tᵀ —
which equals the ``.grad`` autograd puts on W (tested), so nothing is silently missing
(TL #1680, PR #1750).

All tokens of every forward pass that builds a graph are counted in C_a; positions whose loss is
masked contribute δ_t = 0 to C_δ and G. Forward passes under ``torch.no_grad`` (e.g. a DPO
reference model) are ignored.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from .. import distributed
from ..errors import RwasymError
from ..math.covariance import RunningCovariance
from ..models import Model, flatten_site, load
from .activations import quiet


@dataclass
class GradientStats:
    """Streaming C_a, C_δ (as RunningCovariance: uncentered sums inside) and G = Σ δ aᵀ per matrix."""

    inputs: dict[str, RunningCovariance]
    grads: dict[str, RunningCovariance]
    G: dict[str, Tensor]
    n_batches: int = 0
    config: dict = field(default_factory=dict)

    def second_moments(self, name: str) -> tuple[Tensor, Tensor]:
        """(C_a, C_δ) as uncentered sums Σ a aᵀ and Σ δ δᵀ (float64)."""
        return self.inputs[name].second_moment() * self.inputs[name].count, \
            self.grads[name].second_moment() * self.grads[name].count


class _Capture:
    """Hooks that feed `GradientStats`: a at hook_in, δ via a tensor hook on hook_out."""

    def __init__(self, model: Model, names: Sequence[str]):
        self.model = model
        self.specs = [model.matrix(n) for n in names]
        self.stats = GradientStats(
            # float64 products: δ_t spans many orders of magnitude and C_δ is often near rank-deficient
            inputs={s.name: RunningCovariance(s.n_in, name=f"{s.name} a_t", gram_dtype=torch.float64) for s in self.specs},
            grads={s.name: RunningCovariance(s.n_out, name=f"{s.name} δ_t", gram_dtype=torch.float64) for s in self.specs},
            G={s.name: torch.zeros(s.n_out, s.n_in, dtype=torch.float64) for s in self.specs},
        )
        self._last_input: dict[str, Tensor] = {}

    def hooks(self) -> list:
        out = []
        for spec in self.specs:
            out.append((spec.hook_in, self._input_hook(spec)))
            out.append((spec.hook_out, self._output_hook(spec)))
        return out

    def _input_hook(self, spec):
        def fn(x: Tensor, hook: Any = None) -> Tensor:
            if torch.is_grad_enabled():
                a = flatten_site(x.detach(), spec.n_in).reshape(-1, spec.n_in)
                self._last_input[spec.name] = a
                self.stats.inputs[spec.name].add(a)
            return x

        return fn

    def _output_hook(self, spec):
        def fn(y: Tensor, hook: Any = None) -> Tensor:
            if y.requires_grad and spec.name in self._last_input:
                a = self._last_input.pop(spec.name)  # the input of this very call

                def on_grad(grad: Tensor) -> None:
                    delta = flatten_site(grad.detach(), spec.n_out).reshape(-1, spec.n_out)
                    self.stats.grads[spec.name].add(delta)
                    self.stats.G[spec.name] += delta.double().T @ a.double()  # Σ δ aᵀ (n_out, n_in)

                y.register_hook(on_grad)
            return y

        return fn


def capture_gradients(
    model: Any,
    loss_fn: Callable[[Model, Any], Tensor],
    batches: Iterable[Any],
    *,
    matrices: Union[str, Sequence[str], None] = None,
    progress: Optional[bool] = None,
) -> GradientStats:
    """Run ``loss_fn(model, batch).backward()`` per batch and stream C_a, C_δ and G per matrix.

    loss_fn: any scalar loss of the model on a batch (CE on text, DPO / SFT / graded on
    preference pairs: see `rwasym.substrate.train`). Parameter gradients are left zeroed afterwards and the
    model is left in the mode it had; nothing is updated.

    Data parallel (under ``torchrun``, see `rwasym.distributed`): with world_size W > 1, every
    rank must be given the same ``batches``; rank r runs batch i iff i mod W = r, then C_a, C_δ,
    G and the batch count are summed over ranks, so every rank returns the statistics of all
    batches (equal to one process's up to float64 summation order).
    """
    model = load(model)
    names = [s.name for s in model.matrices(matrices)]
    if not names:
        raise RwasymError(f"pattern {matrices!r} matches no matrix; valid: {', '.join(s.name for s in model.matrices())}")
    cap = _Capture(model, names)
    was_training = model.bridge.training
    model.bridge.eval()  # deterministic: no dropout while measuring
    rank, size = distributed.world()
    n_read = 0
    try:
        with model.bridge.hooks(fwd_hooks=cap.hooks()):
            for i, batch in enumerate(tqdm(batches, desc="gradients", disable=quiet(progress) or rank != 0)):
                n_read = i + 1
                if i % size != rank:
                    continue  # another rank's batch
                model.bridge.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise RwasymError(f"the loss is {float(loss.detach())} on batch {i}; check the data and the model weights")
                loss.backward()
                cap.stats.n_batches += 1
    finally:
        model.bridge.zero_grad(set_to_none=True)
        model.bridge.train(was_training)
    if size > 1:
        distributed.require_same([n_read], "the number of batches given to capture_gradients")
        _all_reduce(cap.stats)
    if cap.stats.n_batches == 0:
        raise RwasymError("no batches were given to capture_gradients; pass at least one batch")
    return cap.stats


def _all_reduce(stats: GradientStats) -> None:
    """Sum C_a, C_δ (their N, Σ, Σ outer), G and n_batches over all ranks, in place."""
    for name in stats.G:
        stats.inputs[name].all_reduce()
        stats.grads[name].all_reduce()
        distributed.all_reduce_sum_(stats.G[name])
    n = torch.tensor([float(stats.n_batches)], dtype=torch.float64)
    stats.n_batches = int(distributed.all_reduce_sum_(n)[0])
