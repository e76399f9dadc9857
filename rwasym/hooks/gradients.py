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
reference model) are ignored. Because C_a counts tokens whose δ_t is zero (the answer token under a
one-token loss, padding), two statistics beside it say which tokens made the gradient:
``active_inputs`` = Σ_{t: δ_t ≠ 0} a_t a_tᵀ (C_a over the tokens that reach G) and ``weighted_inputs`` =
Σ_t ‖δ_t‖² a_t a_tᵀ, the δ-weighted input statistic ΔW = −η Σ_t δ_t a_tᵀ inherits its input-side structure
from (E‖ΔW U‖² for a δ uncorrelated in direction with a is ∝ tr(Uᵀ (Σ_t ‖δ_t‖² a_t a_tᵀ) U)).
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .. import distributed
from .._progress import quiet
from ..errors import RwasymError
from ..math.covariance import RunningCovariance
from ..models import Model, flatten_site, load
from .activations import _Checkpoint


@dataclass
class GradientStats:
    """Streaming C_a, C_δ (as RunningCovariance: uncentered sums inside) and G = Σ δ aᵀ per matrix."""

    inputs: dict[str, RunningCovariance]
    grads: dict[str, RunningCovariance]
    G: dict[str, Tensor]
    n_batches: int = 0
    config: dict = field(default_factory=dict)
    # C_a over the tokens with δ_t ≠ 0, and Σ_t ‖δ_t‖² a_t a_tᵀ (float64 n_in × n_in sums; module docstring)
    active_inputs: dict[str, RunningCovariance] = field(default_factory=dict)
    weighted_inputs: dict[str, Tensor] = field(default_factory=dict)

    def token_counts(self, name: str) -> dict[str, int | None]:
        """Which tokens each statistic used: every forwarded token (C_a) and those with δ_t ≠ 0."""
        active = self.active_inputs.get(name)
        return dict(a_tokens=self.inputs[name].count, active_tokens=None if active is None else active.count)

    def second_moments(self, name: str) -> tuple[Tensor, Tensor]:
        """(C_a, C_δ) as uncentered sums Σ a aᵀ and Σ δ δᵀ (float64)."""
        return self.inputs[name].second_moment() * self.inputs[name].count, self.grads[
            name
        ].second_moment() * self.grads[name].count


class _Capture:
    """Hooks that feed `GradientStats`: a at hook_in, δ via a tensor hook on hook_out."""

    def __init__(self, model: Model, names: Sequence[str]):
        self.model = model
        self.specs = [model.matrix(n) for n in names]
        for spec in self.specs:
            model.linear_hooks(spec.name, "gradient capture")  # refuses expert matrices (no hooks of their own)
        self.stats = GradientStats(
            # float64 products: δ_t spans many orders of magnitude and C_δ is often near rank-deficient
            inputs={
                s.name: RunningCovariance(s.n_in, name=f"{s.name} a_t", gram_dtype=torch.float64) for s in self.specs
            },
            grads={
                s.name: RunningCovariance(s.n_out, name=f"{s.name} δ_t", gram_dtype=torch.float64) for s in self.specs
            },
            G={s.name: torch.zeros(s.n_out, s.n_in, dtype=torch.float64) for s in self.specs},
            active_inputs={
                s.name: RunningCovariance(s.n_in, name=f"{s.name} a_t (δ_t ≠ 0)", gram_dtype=torch.float64)
                for s in self.specs
            },
            weighted_inputs={s.name: torch.zeros(s.n_in, s.n_in, dtype=torch.float64) for s in self.specs},
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
                    weight = delta.double().square().sum(1)  # ‖δ_t‖²
                    self.stats.active_inputs[spec.name].add(a, weight > 0)
                    a64 = a.double()
                    self.stats.weighted_inputs[spec.name] += (a64 * weight[:, None]).T @ a64

                y.register_hook(on_grad)
            return y

        return fn


def capture_gradients(
    model: Any,
    loss_fn: Callable[[Model, Any], Tensor],
    batches: Iterable[Any],
    *,
    matrices: str | Sequence[str] | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    checkpoint_key: Any = None,
) -> GradientStats:
    """Run ``loss_fn(model, batch).backward()`` per batch and stream C_a, C_δ and G per matrix.

    loss_fn: any scalar loss of the model on a batch (CE on text, DPO / SFT / graded on
    preference pairs: see `rwasym.train`). Parameter gradients are left zeroed afterwards and the
    model is left in the mode it had; nothing is updated.

    Data parallel (under ``torchrun``, see `rwasym.distributed`): with world_size W > 1, every
    rank must be given the same ``batches``; rank r runs batch i iff i mod W = r, then C_a, C_δ,
    G and the batch count are summed over ranks, so every rank returns the statistics of all
    batches (equal to one process's up to float64 summation order).

    checkpoint: a ``.safetensors`` file that makes a long capture survive a crash: C_a, C_δ, G and
    the batch count are written there (atomically) every ``checkpoint_every`` batches and at the
    end, keyed by the model's weights hash, the matrices, the loss function's qualified name and
    ``checkpoint_key`` (anything JSON that tells two losses apart, e.g. the objective with its β
    and λ). A rerun with the same key skips the batches already in the file — after checking that
    they hash (`batch_digest`) to the batches the file was written from — and gives the same sums
    as an uninterrupted run; a finished file is returned without a backward pass. A file with
    another key or other batches, or one that cannot be read, is refused (`RwasymError`), never
    reused. Single process only.
    """
    model = load(model)
    names = [s.name for s in model.matrices(matrices)]
    if not names:
        raise model.unmatched(matrices)
    cap = _Capture(model, names)
    rank, size = distributed.world()
    ckpt = None
    if checkpoint is not None:
        if size > 1:
            raise RwasymError("capture_gradients(checkpoint=...) runs in one process; under torchrun drop checkpoint=")
        key = dict(
            format=_CHECKPOINT_FORMAT,
            weights=model.weights_hash(),
            matrices=names,
            dtype=str(model.dtype),
            loss=getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__),
            key=checkpoint_key,
        )
        try:
            json.dumps(key)
        except TypeError:
            raise RwasymError(
                f"checkpoint_key={checkpoint_key!r} must be JSON (numbers, strings, lists, dicts)"
            ) from None
        ckpt = _Checkpoint(Path(checkpoint), key, checkpoint_every)
    sums = (
        {f"{n}/a_t": cap.stats.inputs[n] for n in names}
        | {f"{n}/delta_t": cap.stats.grads[n] for n in names}
        | {f"{n}/a_t_active": cap.stats.active_inputs[n] for n in names}
    )
    extra = cap.stats.G | {f"{n}/a_t_weighted": cap.stats.weighted_inputs[n] for n in names}
    resume = None if ckpt is None else ckpt.load(sums, set(), extra=extra)
    done_batches = 0 if resume is None else int(resume["batches"])
    if resume is not None:
        cap.stats.n_batches = int(resume["seen"])
    digest = hashlib.sha256()  # of the batches read so far, in order
    was_training = model.bridge.training
    model.bridge.eval()  # deterministic: no dropout while measuring
    n_read = 0
    try:
        with model.bridge.hooks(fwd_hooks=cap.hooks()):
            for i, batch in enumerate(tqdm(batches, desc="gradients", disable=quiet(progress) or rank != 0)):
                n_read = i + 1
                if ckpt is not None:
                    digest.update(batch_digest(batch))
                if i < done_batches:  # in the checkpoint already: check it is this very batch sequence
                    assert resume is not None  # done_batches > 0 only when resuming
                    if i == done_batches - 1 and digest.hexdigest() != resume.get("data"):
                        raise RwasymError(
                            f"gradient checkpoint {str(checkpoint)!r} was written from other batches "
                            "(their hashes differ); pass the same batches in the same order, or "
                            "another checkpoint path"
                        )
                    continue
                if resume is not None and resume["done"]:
                    raise RwasymError(
                        f"gradient checkpoint {str(checkpoint)!r} is finished after {done_batches} "
                        "batches but more were given; pass the same batches, or another checkpoint path"
                    )
                if i % size != rank:
                    continue  # another rank's batch
                model.bridge.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise RwasymError(
                        f"the loss is {float(loss.detach())} on batch {i}; check the data and the model weights"
                    )
                loss.backward()
                cap.stats.n_batches += 1
                if ckpt is not None and n_read % ckpt.every == 0:
                    ckpt.save(
                        sums,
                        set(),
                        n_read,
                        cap.stats.n_batches,
                        done=False,
                        extra=extra,
                        info={"data": digest.hexdigest()},
                    )
    finally:
        model.bridge.zero_grad(set_to_none=True)
        model.bridge.train(was_training)
    if resume is not None and n_read < done_batches:
        raise RwasymError(
            f"gradient checkpoint {str(checkpoint)!r} holds {done_batches} batches but only {n_read} "
            "were given; pass the same batches, or another checkpoint path"
        )
    if ckpt is not None and cap.stats.n_batches > 0 and not (resume is not None and resume["done"]):
        ckpt.save(sums, set(), n_read, cap.stats.n_batches, done=True, extra=extra, info={"data": digest.hexdigest()})
    if size > 1:
        distributed.require_same([n_read], "the number of batches given to capture_gradients")
        _all_reduce(cap.stats)
    if cap.stats.n_batches == 0:
        raise RwasymError("no batches were given to capture_gradients; pass at least one batch")
    return cap.stats


_CHECKPOINT_FORMAT = "rwasym-gradients/2"  # /2: with the active and δ-weighted input statistics


def batch_digest(batch: Any) -> bytes:
    """A content hash of one batch — tensors (dtype, shape, bytes), mappings, sequences, dataclasses
    such as `rwasym.data.PreferencePairs`, and plain scalars — so a resumed capture can check it is
    given the batches its checkpoint was written from."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            h.update(b"M")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            h.update(type(x).__qualname__.encode())
            for f in dataclasses.fields(x):
                feed(f.name)
                feed(getattr(x, f.name))
        elif x is None or isinstance(x, (str, int, float, bool)):
            h.update(f"S{type(x).__name__}:{x!r}".encode())
        else:
            raise RwasymError(
                f"capture_gradients(checkpoint=...) cannot hash a batch holding {type(x).__name__}; "
                "pass batches of tensors, dicts, lists or dataclasses of them, or drop checkpoint="
            )

    feed(batch)
    return h.digest()


def _all_reduce(stats: GradientStats) -> None:
    """Sum C_a, C_δ (their N, Σ, Σ outer), G and n_batches over all ranks, in place."""
    for name in stats.G:
        stats.inputs[name].all_reduce()
        stats.grads[name].all_reduce()
        distributed.all_reduce_sum_(stats.G[name])
        if name in stats.active_inputs:
            stats.active_inputs[name].all_reduce()
            distributed.all_reduce_sum_(stats.weighted_inputs[name])
    n = torch.tensor([float(stats.n_batches)], dtype=torch.float64)
    stats.n_batches = int(distributed.all_reduce_sum_(n)[0])
