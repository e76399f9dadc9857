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
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from . import distributed
from ._checks import linalg_threads
from .activations import _quiet
from .errors import RwasymError
from .models import Model, flatten_site, load
from .probe_math import relative_fraction
from .spectra import spikiness
from .stats import RunningCovariance
from .subspaces import pca_basis, prediction_basis


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
            inputs={s.name: RunningCovariance(s.n_in, name=f"{s.name} a_t") for s in self.specs},
            grads={s.name: RunningCovariance(s.n_out, name=f"{s.name} δ_t") for s in self.specs},
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
    matrices: Optional[str] = None,
    progress: Optional[bool] = None,
) -> GradientStats:
    """Run ``loss_fn(model, batch).backward()`` per batch and stream C_a, C_δ and G per matrix.

    loss_fn: any scalar loss of the model on a batch (CE on text, DPO / SFT / graded on
    preference pairs: see `rwasym.train`). Parameter gradients are left zeroed afterwards and the
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
            for i, batch in enumerate(tqdm(batches, desc="gradients", disable=_quiet(progress) or rank != 0)):
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


def anisotropy_report(model: Any, stats: GradientStats, *, k: int = 8) -> list[dict]:
    """Per matrix: spikiness of C_a and C_δ, and the relative fraction of G against the read-side
    PCA basis of C_a (input side) and the prediction basis (the residual-stream side: input for
    read matrices, output for write matrices)."""
    with linalg_threads(1):
        return _anisotropy_rows(load(model), stats, k)


def _anisotropy_rows(model: Model, stats: GradientStats, k: int) -> list[dict]:
    pred = prediction_basis(model.unembedding(), min(k, model.d_model)).U
    rows = []
    for name, G in stats.G.items():
        spec = model.matrix(name)
        C_a, C_d = stats.second_moments(name)
        sa, sd = spikiness(C_a), spikiness(C_d)
        row = dict(matrix=name, layer=spec.layer, kind=spec.kind, side=spec.side,
                   a_top1_share=sa.top1_share, a_participation_ratio=sa.participation_ratio,
                   a_effective_rank=sa.effective_rank, a_dim=sa.d,
                   delta_top1_share=sd.top1_share, delta_participation_ratio=sd.participation_ratio,
                   delta_effective_rank=sd.effective_rank, delta_dim=sd.d, grad_norm=float(G.norm()))
        if float(G.square().sum()) > 0:
            read = relative_fraction(G, pca_basis(C_a, min(k, spec.n_in), center=False).U, "input")
            row.update(G_input_pca_relative=read.relative, G_input_pca_fraction=read.fraction)
            resid_side = "input" if spec.side == "read" else "output"
            if (spec.n_in if resid_side == "input" else spec.n_out) == model.d_model:
                pr = relative_fraction(G, pred, resid_side)
                row.update(G_prediction_relative=pr.relative, G_prediction_fraction=pr.fraction,
                           G_prediction_side=resid_side)
        rows.append(row)
    return rows


OBJECTIVES = ("ce", "dpo", "sft", "graded")


def objective_batches(
    objective: str,
    data: Any,
    *,
    reference: Optional[Model] = None,
    batch_size: int = 16,
    n_batches: int = 4,
    beta: float = 0.1,
    lam: float = 0.5,
) -> tuple[Callable[[Model, Any], Tensor], list]:
    """(loss_fn, batches) for `capture_gradients` under one of the package's objectives.

    "ce": next-token cross-entropy (mean over tokens) on ``data``, a token tensor (n_seqs, pos);
    batches are consecutive slices of ``batch_size`` rows. "dpo" | "sft" | "graded": the
    alignment objective of `rwasym.train` (graded: λ·DPO + (1−λ)·CE(chosen)) on ``data``, a
    `PreferencePairs`; dpo and graded need the frozen ``reference`` (usually the base itself,
    where the DPO margin starts at zero). At most ``n_batches`` batches are used.
    """
    from .pairs import PreferencePairs
    from .train import AlignConfig, _next_token_ce, alignment_loss

    if objective not in OBJECTIVES:
        raise RwasymError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if batch_size <= 0 or n_batches <= 0:
        raise RwasymError(f"batch_size and n_batches must be positive; got {batch_size} and {n_batches}")
    if objective == "ce":
        if not isinstance(data, Tensor) or data.dim() != 2:
            raise RwasymError("objective 'ce' needs a token tensor of shape (n_seqs, pos); "
                              f"got {type(data).__name__}. Pass text tokens, not preference pairs")
        batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)][:n_batches]
        return _next_token_ce, batches
    if not isinstance(data, PreferencePairs):
        raise RwasymError(f"objective {objective!r} needs PreferencePairs (a .jsonl or pairs .safetensors "
                          f"file); got {type(data).__name__}")
    cfg = AlignConfig(objective=objective, beta=beta, lam=lam)
    if objective != "sft" and reference is None:
        raise RwasymError(f"objective {objective!r} needs a frozen reference model; pass reference= (e.g. the base)")
    batches = [data.subset(torch.arange(i, min(i + batch_size, len(data))))
               for i in range(0, len(data), batch_size)][:n_batches]

    def align_loss(model: Model, pairs: Any) -> Tensor:
        return alignment_loss(model, pairs, cfg, reference)

    return align_loss, batches
