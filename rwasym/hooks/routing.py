"""Routed activation statistics of mixture-of-experts MLPs: what each expert reads (issue #33, phase 2).

An expert e of layer L acts only on the tokens its router sends to it, A_e = {t : e ∈ topk(t)}, and its output
is multiplied by the routing weight w_{t,e} before the block sums it (`MixtralExperts.forward` and its OLMoE /
Qwen2-MoE twins). Two conventions for the statistics of its input a_t (the MLP block's input):

- ``weighting="tokens"`` (default): C_e = Σ_{t∈A_e} (a_t − μ_e)(a_t − μ_e)ᵀ / (N_e − 1), N_e = |A_e| — the
  inputs the expert actually sees, each routed token counted once;
- ``weighting="routing"``: C̃_e = Σ_{t∈A_e} w_{t,e} (a_t − μ̃_e)(a_t − μ̃_e)ᵀ / W_e, μ̃_e = Σ w a / W_e,
  W_e = Σ_{t∈A_e} w_{t,e} — the inputs in proportion to how much the expert's output counts (frequency-style
  weights of `RunningCovariance.add`; its ``covariance(unbiased=False)`` is C̃_e).

The router's decisions are read, not recomputed: a forward pre-hook on the Hugging Face experts module records
the (hidden_states, top_k_index, top_k_weights) the block passes to it — the indices and weights the experts
really use, whatever the family's softmax / top-k / ``norm_topk_prob`` convention.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm import tqdm

from .. import distributed
from .._progress import quiet
from ..errors import RwasymError
from ..math.covariance import RunningCovariance
from ..models import Model, load
from ..models.host import experts_module
from .activations import _as_batches, _check_exclusions, _kept_tokens, _require_captured

__all__ = ["RoutedStats", "capture_routed", "expert_hidden"]

WEIGHTINGS = ("tokens", "routing")
Key = tuple[int, int]  # (layer, expert)


@dataclass
class RoutedStats:
    """Per (layer, expert) statistics of the MLP-block input rows routed to that expert (see the module docstring).

    stats[(L, e)]: `RunningCovariance` of a_t over A_e (weighted by w_{t,e} when ``weighting == "routing"``);
    hidden[(L, e)]: the same for the expert's hidden state h_t = act(W_gate,e a_t) ⊙ (W_in,e a_t), the input of
    W_out,e (only when captured with ``hidden=True``); routing_weight[(L, e)]: W_e = Σ_{t∈A_e} w_{t,e} whatever
    the weighting; top_k[L], n_experts[L]: the router's k and E; n_tokens: the tokens counted (every layer sees
    the same), so Σ_e N_e = n_tokens · top_k[L].
    """

    stats: dict[Key, RunningCovariance]
    routing_weight: dict[Key, float]
    top_k: dict[int, int]
    n_experts: dict[int, int]
    n_tokens: int
    weighting: str = "tokens"
    hidden: dict[Key, RunningCovariance] = field(default_factory=dict)
    model: Model | None = None

    def count(self, layer: int, expert: int) -> int:
        """N_e: the counted tokens routed to ``expert`` of ``layer``."""
        return self._get(self.stats, layer, expert, "routed input").count

    def mean_routing_weight(self, layer: int, expert: int) -> float:
        """W_e / N_e: the mean routing weight of the tokens routed to the expert (nan when none is)."""
        n = self.count(layer, expert)
        return self.routing_weight[(layer, expert)] / n if n else float("nan")

    def few_tokens(self, k: int) -> list[str]:
        """The experts (``blocks.L.mlp.experts.e``) with N_e < k + 1 routed tokens: too few for a rank-k
        covariance basis, so they get no activation rows for this k (`for_expert` refuses them)."""
        return [f"blocks.{L}.mlp.experts.{e}" for (L, e), acc in sorted(self.stats.items()) if acc.count < k + 1]

    def for_expert(self, layer: int, expert: int, *, k: int | None = None, side: str = "input") -> RunningCovariance:
        """The routed statistics of the expert's input (``side="input"``: the read side of W_gate,e / W_in,e) or
        hidden state (``side="hidden"``: the input of W_out,e); with ``k`` RwasymError when N_e < k + 1."""
        table = {"input": self.stats, "hidden": self.hidden}.get(side)
        if table is None:
            raise RwasymError(f"side must be 'input' or 'hidden'; got {side!r}")
        acc = self._get(table, layer, expert, f"routed {side}")
        if k is not None and acc.count < k + 1:
            raise RwasymError(
                f"expert {expert} of blocks.{layer}.mlp received N_e={acc.count} routed token(s), fewer than k + 1 = "
                f"{k + 1}: its rank-{k} routed basis is undefined (it is listed by few_tokens({k})); capture more "
                "tokens or lower k"
            )
        return acc

    def for_matrix(self, name: str, *, k: int | None = None) -> RunningCovariance:
        """The statistics of the input of expert matrix ``name``: the routed MLP input for W_gate,e / W_in,e, the
        routed hidden state for W_out,e (captured with ``hidden=True``)."""
        parts = name.split(".")
        if len(parts) != 6 or parts[2:4] != ["mlp", "experts"] or parts[5] not in ("W_gate", "W_in", "W_out"):
            raise RwasymError(f"{name!r} is not an expert matrix (blocks.L.mlp.experts.e.W_gate | W_in | W_out)")
        side = "hidden" if parts[5] == "W_out" else "input"
        return self.for_expert(int(parts[1]), int(parts[4]), k=k, side=side)

    def _get(self, table: dict[Key, RunningCovariance], layer: int, expert: int, what: str) -> RunningCovariance:
        if (layer, expert) not in table:
            hint = " (pass hidden=True to capture_routed)" if what == "routed hidden" and not table else ""
            raise RwasymError(
                f"no {what} statistics for expert {expert} of blocks.{layer}.mlp{hint}; captured layers "
                f"{sorted(self.top_k)} with experts 0 … E − 1 (E = {self.n_experts})"
            )
        return table[(layer, expert)]


def moe_layers(model: Model) -> list[int]:
    """The layers whose MLP is a mixture of experts held in the registry (they have a ``W_router``)."""
    return sorted({spec.layer for spec in model.matrices("blocks.*.mlp.W_router")})


def _experts(model: Model, layer: int) -> nn.Module:
    experts = experts_module(model.bridge, f"blocks.{layer}.mlp")
    if experts is None:  # the registry holds W_router only where experts_module found the experts
        raise RwasymError(f"blocks.{layer}.mlp has no experts module rwasym can read")
    return experts


def _routing_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states (n, d), top_k_index (n, k), top_k_weights (n, k)) of an experts module's call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(not isinstance(v, Tensor) for v in values):
        raise RwasymError(
            "the experts module was not called as experts(hidden_states, top_k_index, top_k_weights) (transformers "
            "5's MixtralExperts / OlmoeExperts / Qwen2MoeExperts); rwasym cannot read this model's routing"
        )
    return values[0], values[1], values[2]


def _route(
    a: Float[Tensor, "n d"], index: Int[Tensor, "n k"], weights: Float[Tensor, "n k"], keep: Bool[Tensor, " n"], e: int
) -> tuple[Float[Tensor, "m d"], Float[Tensor, " m"]]:
    """The kept rows routed to expert ``e`` (e ∈ top_k_index[t]) and their routing weights w_{t,e}, float64."""
    hit = (index == e) & keep[:, None]  # (n, k): an expert appears at most once in a token's top k
    routed = hit.any(dim=1)
    return a[routed], (weights.double() * hit).sum(dim=1)[routed]


def expert_hidden(
    experts: nn.Module, e: int, rows: Float[Tensor, "m d"], dtype: torch.dtype
) -> Float[Tensor, "m d_mlp"]:
    """h = act(W_gate,e a) ⊙ (W_in,e a) for rows a routed to expert e, in ``dtype``: recomputed from the experts
    module's own fused weights (gate_up_proj[e] rows 0 … d_mlp − 1 and d_mlp … 2·d_mlp − 1) and its own
    activation ``act_fn`` (ACT2FN[config.hidden_act]), because the hidden state is a local of the experts'
    forward (no module or hook carries it; grouped_mm implementations never form it per expert)."""
    act = getattr(experts, "act_fn", None)
    if act is None or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise RwasymError(
            f"{type(experts).__name__} has no act_fn, or has biases / no gate: rwasym recomputes an expert's hidden "
            "state only for gated experts without biases (Mixtral, OLMoE, Qwen2-MoE); capture with hidden=False"
        )
    gate_up = cast(Tensor, experts.gate_up_proj)[e].detach().to(dtype)  # (2 d_mlp, d)
    gate, up = nn.functional.linear(rows.to(dtype), gate_up).chunk(2, dim=-1)
    return act(gate) * up


def _check_args(model: Model, layers: Sequence[int] | None, weighting: str, batch_size: int) -> list[int]:
    if weighting not in WEIGHTINGS:
        raise RwasymError(
            f"weighting must be 'tokens' (each routed token counts 1) or 'routing' (w_{{t,e}}); got {weighting!r}"
        )
    if batch_size <= 0:
        raise RwasymError(f"batch_size must be positive; got {batch_size}")
    if distributed.world()[1] > 1:
        raise RwasymError("capture_routed runs in a single process; run it outside torchrun")
    available = moe_layers(model)
    if not available:
        raise RwasymError(
            "this model has no mixture-of-experts MLP in its registry (no blocks.L.mlp.W_router); capture_routed "
            "is for Mixtral / OLMoE / Qwen2-MoE style models: use capture for dense ones"
        )
    chosen = available if layers is None else sorted({int(L) for L in layers})
    missing = [L for L in chosen if L not in available]
    if missing or not chosen:
        raise RwasymError(f"layers {missing or list(chosen)} have no mixture-of-experts MLP; choose among {available}")
    return chosen


def capture_routed(
    model: Any,
    data: Any,
    *,
    layers: Sequence[int] | None = None,
    weighting: str = "tokens",
    hidden: bool = False,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool | None = None,
    gram_dtype: torch.dtype | None = None,
    exclude_positions: Sequence[int] = (),
    exclude_tokens: Sequence[int] = (),
) -> RoutedStats:
    """Stream ``data`` through ``model`` once and accumulate, per (layer, expert), the routed input statistics.

    For every token t counted (padding, ``exclude_positions`` / ``exclude_tokens`` and ``max_tokens`` as in
    `rwasym.capture`: the excluded tokens still run through the model) and every expert e in its top k, the
    MLP-block input a_t is added to expert e's `RunningCovariance` with weight 1 (``weighting="tokens"``: C_e,
    N_e) or w_{t,e} (``"routing"``: C̃_e = covariance(unbiased=False), W_e = weight_sum); see the module
    docstring. (indices, weights) are those the block passes to its experts module (a forward pre-hook on it).
    hidden=True also accumulates the expert's hidden state h_t = act(W_gate,e a_t) ⊙ (W_in,e a_t) (the input of
    W_out,e; `expert_hidden`) with the same weights, in float32 (float64 for float64 models or
    ``gram_dtype=torch.float64``). layers: the MoE layers to capture (default all); later blocks are not run.
    data, batch_size, progress, gram_dtype: as in `rwasym.capture`. Single process.
    """
    model = load(model)
    exclude_positions, exclude_tokens = _check_exclusions(exclude_positions, exclude_tokens)
    chosen = _check_args(model, layers, weighting, batch_size)
    modules = {L: _experts(model, L) for L in chosen}
    n_experts = {L: int(cast(Tensor, m.gate_up_proj).shape[0]) for L, m in modules.items()}
    width = model.d_model
    stats = {
        (L, e): RunningCovariance(width, name=f"blocks.{L}.mlp.experts.{e}", gram_dtype=gram_dtype)
        for L in chosen
        for e in range(n_experts[L])
    }
    hidden_stats: dict[Key, RunningCovariance] = {}
    if hidden:
        hidden_stats = {
            (L, e): RunningCovariance(
                int(cast(Tensor, m.down_proj).shape[2]),
                name=f"blocks.{L}.mlp.experts.{e} hidden",
                gram_dtype=gram_dtype,
            )
            for L, m in modules.items()
            for e in range(n_experts[L])
        }
    routing_weight = dict.fromkeys(stats, 0.0)
    top_k: dict[int, int] = {}
    current: dict[str, Tensor] = {}

    def make_hook(layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            a, index, weights = _routing_args(args, kwargs)
            keep = current["mask"].reshape(-1).to(a.device)
            if (
                a.dim() != 2
                or a.shape[0] != keep.numel()
                or index.shape != weights.shape
                or index.shape[0] != a.shape[0]
            ):
                raise RwasymError(
                    f"blocks.{layer}.mlp: the experts were called with hidden_states {tuple(a.shape)}, indices "
                    f"{tuple(index.shape)} and weights {tuple(weights.shape)} for a batch of {keep.numel()} tokens; "
                    "expected (tokens, d), (tokens, k), (tokens, k)"
                )
            top_k[layer] = int(index.shape[1])
            wide = a.dtype == torch.float64 or gram_dtype == torch.float64
            for e in range(n_experts[layer]):
                rows, w = _route(a.detach(), index, weights.detach(), keep, e)
                if rows.shape[0] == 0:
                    continue
                routing_weight[(layer, e)] += float(w.sum())
                given = w if weighting == "routing" else None
                stats[(layer, e)].add(rows, weights=given)
                if hidden:
                    h = expert_hidden(module, e, rows, torch.float64 if wide else torch.float32)
                    hidden_stats[(layer, e)].add(h, weights=given)

        return hook

    stop = max(chosen) + 1
    handles = [m.register_forward_pre_hook(make_hook(L), with_kwargs=True) for L, m in modules.items()]
    seen = 0
    bar = tqdm(total=max_tokens, desc="routed capture", unit="tok", disable=quiet(progress))
    try:
        with torch.no_grad():
            for tokens, mask in _as_batches(data, batch_size, model):
                kept, kwargs = _kept_tokens(tokens, mask, model, max_tokens, seen, exclude_positions, exclude_tokens)
                n = int(kept.sum())
                if n == 0:
                    if max_tokens is not None and seen >= max_tokens:
                        break
                    continue
                seen += n
                current["mask"] = kept
                model.bridge(tokens.to(model.device), stop_at_layer=stop if stop <= model.n_layers else None, **kwargs)
                bar.update(n)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    _require_captured(seen)
    return RoutedStats(
        stats=stats,
        routing_weight=routing_weight,
        top_k=top_k,
        n_experts=n_experts,
        n_tokens=seen,
        weighting=weighting,
        hidden=hidden_stats,
        model=model,
    )
