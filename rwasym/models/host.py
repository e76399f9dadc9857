"""Host layouts: how the Hugging Face (or native) model stores each studied matrix — the one owner.

A studied matrix W is always handled in `nn.Linear` layout (n_out × n_in, y = W a). Its *host* is
the module whose ``weight`` the model saves; `HostLayout` says how W sits in that weight:

- transposed: GPT-2 ``Conv1D`` stores W as (n_in, n_out); ``nn.Linear`` as (n_out, n_in).
- fused rows: W_Q, W_K, W_V of a fused qkv host (GPT-2 ``c_attn``, GPT-NeoX / Falcon / Bloom
  ``query_key_value``, Phi-3 ``qkv_proj``), and W_gate, W_in of a fused gate-up host (Phi-3
  ``gate_up_proj``: [gate | up]), are rows of one fused weight F (nn.Linear layout after the
  Conv1D transpose): W = F[rows]. The rows are read off the bridge's own split
  (``split_qkv_matrix`` / ``split_gate_up_matrix``) applied to an index probe Pᵢⱼ = i (stride 0
  along columns, so free), which yields GPT-2's concatenation ``[q; k; v]``, GPT-NeoX's per-head
  interleaving ``[h, (q, k, v), d_head]`` and Phi-3's halves without guessing any of them.

- experts: W_gate, W_in, W_out of expert e of a mixture-of-experts MLP (transformers 5 ``MixtralExperts``,
  ``OlmoeExperts``, ``Qwen2MoeExperts``) are slices of two 3-D parameters of the experts module, one
  axis more than a fused weight: ``gate_up_proj`` (E, 2·d_mlp, d) holds W_gate,e = rows 0 … d_mlp − 1 and
  W_in,e = rows d_mlp … 2·d_mlp − 1 of ``gate_up_proj[e]`` (the forward's ``linear(x, gate_up_proj[e]).chunk(2)``
  is (gate, up)), and ``down_proj`` (E, d, d_mlp) holds W_out,e = ``down_proj[e]``, all in nn.Linear layout.
  The forward pass computes with these parameters themselves (no split copy), so a write is a write of the slice.

The bridge's forward pass uses split copies of fused weights (``HostLayout.linear``); the fused
parameter is what ``save_pretrained`` writes, so `sync_fused` copies the split copies back before
saving. `host_module_names` gives each matrix's module name in the Hugging Face tree (what PEFT
adapters and safetensors keys use). One description serves loaded models (`rwasym.models.Model`),
LoRA splits (`rwasym.models.lora`) and weightless checkpoint skeletons
(`rwasym.models.checkpoint`).
"""

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from ..errors import RwasymError

if TYPE_CHECKING:  # transformers is imported lazily
    from transformers import PreTrainedModel

__all__ = [
    "HostLayout",
    "clean_key",
    "expert_layout",
    "experts_module",
    "fused_gate_up_rows",
    "fused_qkv_rows",
    "host_layouts",
    "host_linear",
    "host_module_names",
    "index_probe",
    "is_transposed",
    "read_matrix",
    "save_hf",
    "sync_fused",
]

_QKV = ("W_Q", "W_K", "W_V")
_GATE_UP = ("W_gate", "W_in")  # the bridge's split returns (gate, up)


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored (n_in, n_out)); False for ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def host_linear(bridge: nn.Module, component: str) -> nn.Module:
    """The Hugging Face (or native) linear module a bridge component wraps."""
    module = bridge.get_submodule(component)
    host = getattr(module, "original_component", None)
    if host is None or not hasattr(host, "weight"):
        raise RwasymError(f"bridge component {component!r} wraps no linear layer with a weight")
    return host


def clean_key(key: str) -> str:
    """A bridge state-dict key with the bridge's ``._original_component`` hops removed."""
    return key.replace("._original_component", "")


def index_probe(weight: Tensor, transposed: bool) -> nn.Parameter:
    """Pᵢⱼ = i in nn.Linear layout (row index of the host output), expanded with stride 0."""
    rows = weight.shape[1] if transposed else weight.shape[0]
    idx = torch.arange(rows, dtype=torch.float32, device="cpu")
    p = idx[None, :].expand(weight.shape) if transposed else idx[:, None].expand(weight.shape)
    return nn.Parameter(p, requires_grad=False)


@dataclass(frozen=True, eq=False)
class HostLayout:
    """Where one studied matrix W (n_out × n_in, nn.Linear layout) is stored.

    module: the module whose ``weight`` is saved (the fused module for a fused host);
    transposed: ``module`` stores its weight as (n_in, n_out) (GPT-2 ``Conv1D``);
    rows: for a fused host, the int64 indices of W's rows in the fused weight in nn.Linear layout
    (after the transpose), else None (W is the whole weight);
    fused: ``"qkv"``, ``"gate_up"``, ``"experts"`` or None;
    linear: the linear the bridge's forward pass uses (``module`` itself unless fused: then the
    bridge's split copy; None for an expert, whose forward uses the 3-D parameter itself);
    expert: for an expert matrix, its index e along the first axis of the 3-D parameter, else None;
    param: the name of the parameter of ``module`` that stores W (``weight``; an expert's ``gate_up_proj``
    or ``down_proj``).
    """

    module: nn.Module
    transposed: bool
    rows: Tensor | None = None
    fused: str | None = None
    linear: nn.Module | None = None
    expert: int | None = None
    param: str = "weight"

    @property
    def parameter(self) -> nn.Parameter:
        """The stored parameter (``module.<param>``): the whole fused 3-D parameter for an expert."""
        return cast(nn.Parameter, getattr(self.module, self.param))

    def matrix(self, stored: Tensor) -> Tensor:
        """W from a tensor stored like ``module.<param>`` (the module's own, or a checkpoint's): see
        `read_matrix`."""
        return read_matrix(stored, transposed=self.transposed, rows=self.rows, expert=self.expert)


def read_matrix(stored: Tensor, *, transposed: bool, rows: Tensor | None = None, expert: int | None = None) -> Tensor:
    """W (nn.Linear layout) from its host's stored tensor T: T[expert] for an expert's 3-D parameter
    (a view), Tᵀ for Conv1D (a view), then W's ``rows`` of a fused weight (int64 indices; a copy)."""
    w = stored if expert is None else stored[expert]
    w = w.T if transposed else w
    return w if rows is None else w.index_select(0, rows.to(w.device))


_EXPERT_PARAMS = {"W_gate": ("gate_up_proj", 0), "W_in": ("gate_up_proj", 1), "W_out": ("down_proj", None)}


def experts_module(bridge: nn.Module, mlp_component: str) -> nn.Module | None:
    """The Hugging Face experts module (``MixtralExperts`` …) of a mixture-of-experts MLP bridge, holding the
    3-D parameters ``gate_up_proj`` (E, 2·d_mlp, d) and ``down_proj`` (E, d, d_mlp); None when the block
    stores its experts otherwise (e.g. a ModuleList of per-expert linears)."""
    mlp = bridge.get_submodule(mlp_component)
    experts = getattr(getattr(mlp, "original_component", mlp), "experts", None)
    experts = getattr(experts, "original_component", experts)  # Qwen2-MoE: the bridge wraps the experts module
    if experts is None:
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return None
    if gate_up.dim() != 3 or down.dim() != 3 or getattr(experts, "is_transposed", False):
        return None
    n, two_h, d = gate_up.shape
    if two_h % 2 or tuple(down.shape) != (n, d, two_h // 2):
        return None
    return experts


def expert_layout(bridge: nn.Module, mlp_component: str, kind: str, expert: int) -> HostLayout:
    """`HostLayout` of W_gate / W_in / W_out of ``expert`` in the experts module of ``mlp_component``
    (`experts_module`): W_gate,e = rows 0 … d_mlp − 1 of gate_up_proj[e], W_in,e = rows d_mlp … 2·d_mlp − 1,
    W_out,e = down_proj[e]."""
    experts = experts_module(bridge, mlp_component)
    if experts is None or kind not in _EXPERT_PARAMS:
        raise RwasymError(
            f"{mlp_component}: no fused 3-D expert parameters (gate_up_proj, down_proj) holding {kind} of expert "
            f"{expert}; rwasym reads experts stored as transformers 5 does"
        )
    param, half = _EXPERT_PARAMS[kind]
    rows = None
    if half is not None:
        d_mlp = cast(Tensor, experts.down_proj).shape[2]
        rows = torch.arange(half * d_mlp, (half + 1) * d_mlp, dtype=torch.long)
    return HostLayout(experts, False, rows, "experts", None, expert, param)


def _rows_of_split(fused: nn.Module, split: Callable[[], tuple], where: str, what: str) -> list[Tensor]:
    """Row indices (int64) of each part the bridge's ``split`` makes of ``fused``'s weight, read by
    running the split on an index probe in place of the weight (restored afterwards)."""
    original = fused._parameters["weight"]
    assert original is not None  # a host linear (`host_linear`, `_gate_up_host`) has a weight
    fused._parameters["weight"] = index_probe(original, is_transposed(fused))
    try:
        with torch.device("meta"):  # the split's nn.Linear shells allocate nothing
            parts = split()
    finally:
        fused._parameters["weight"] = original
    rows = []
    for part in parts:
        w = part.weight.detach()
        col = w[:, 0] if not w.is_meta else None
        if col is None or not torch.equal(w, col[:, None].expand_as(w)) or not torch.equal(col, col.round()):
            raise RwasymError(
                f"{where}: the bridge's split of the fused {what} weight does not select its rows, so rwasym "
                f"cannot map {', '.join(_QKV if what == 'qkv' else _GATE_UP)} to it; compare the checkpoints "
                "with rwasym.weight_deltas(rwasym.load(base), rwasym.load(tuned)) instead"
            )
        rows.append(col.to(torch.long))
    return rows


@torch.no_grad()
def fused_qkv_rows(bridge: nn.Module, attn_component: str) -> list[Tensor]:
    """Row indices (rows_q, rows_k, rows_v; int64) of W_Q, W_K, W_V inside the fused qkv host weight
    of ``attn_component`` (nn.Linear layout), read off the bridge's own split of an index probe."""
    attn = bridge.get_submodule(attn_component)
    fused = host_linear(bridge, f"{attn_component}.qkv")
    split: Callable[..., tuple] | None = getattr(attn, "split_qkv_matrix", None)
    if not callable(split):
        raise RwasymError(
            f"{attn_component} has a fused qkv host but no split_qkv_matrix, so rwasym cannot tell "
            "which rows are W_Q, W_K, W_V; compare with rwasym.weight_deltas(rwasym.load(base), "
            "rwasym.load(tuned)) instead"
        )
    return _rows_of_split(fused, lambda: split(attn.original_component), attn_component, "qkv")


def _gate_up_host(bridge: nn.Module, mlp_component: str) -> nn.Module | None:
    """The fused gate-up module (Phi-3 ``gate_up_proj``) an MLP bridge splits into gate and in, or None."""
    mlp = bridge.get_submodule(mlp_component)
    modules = getattr(mlp, "_modules", {})
    if "gate" not in modules or "in" not in modules:
        return None
    fused = getattr(getattr(mlp, "original_component", None), getattr(mlp, "fused_attr", "gate_up_proj"), None)
    return fused if isinstance(fused, nn.Linear) else None


@torch.no_grad()
def fused_gate_up_rows(bridge: nn.Module, mlp_component: str) -> list[Tensor]:
    """Row indices (rows_gate, rows_in; int64) of W_gate and W_in inside the fused gate-up host weight
    of ``mlp_component`` (Phi-3 ``gate_up_proj``, nn.Linear layout: [gate | up]), read off the
    bridge's own ``split_gate_up_matrix`` of an index probe."""
    mlp = bridge.get_submodule(mlp_component)
    fused = _gate_up_host(bridge, mlp_component)
    split: Callable[..., tuple] | None = getattr(mlp, "split_gate_up_matrix", None)
    if fused is None or not callable(split):
        raise RwasymError(
            f"{mlp_component} has no fused gate-up host with a split_gate_up_matrix, so rwasym cannot tell "
            "which rows are W_gate, W_in; compare with rwasym.weight_deltas(rwasym.load(base), "
            "rwasym.load(tuned)) instead"
        )
    return _rows_of_split(fused, lambda: split(mlp.original_component), mlp_component, "gate-up")


def _linear_layout(module: nn.Module) -> Tensor:
    w = cast(Tensor, module.weight).detach()  # torch types a module attribute as Tensor | Module
    return w.T if is_transposed(module) else w


def _fused_parts(bridge: nn.Module, group: str, check_values: bool) -> tuple[str, nn.Module, dict] | None:
    """(kind, fused module, {matrix kind: rows}) of the fused host of ``group`` (``blocks.L.attn`` or
    ``blocks.L.mlp``), or None where there is none, its rows cannot be read or (``check_values``)
    the fused weight's rows differ from the bridge's split copies."""
    parent = bridge.get_submodule(group)
    modules = getattr(parent, "_modules", {})
    if group.endswith(".attn") and "qkv" in modules and "q" in modules:
        kind, kinds, subs, read = "qkv", _QKV, "qkv", fused_qkv_rows
        fused = host_linear(bridge, f"{group}.qkv")
    elif group.endswith(".mlp") and (gate_up := _gate_up_host(bridge, group)) is not None:
        kind, kinds, subs, read = "gate_up", _GATE_UP, ("gate", "in"), fused_gate_up_rows
        fused = gate_up
    else:
        return None
    try:
        rows = read(bridge, group)
    except RwasymError:
        return None
    if len(rows) != len(kinds):
        return None
    if check_values:
        w = _linear_layout(fused)
        for r, sub in zip(rows, subs):
            p = _linear_layout(host_linear(bridge, f"{group}.{sub}"))
            if p.shape != (len(r), w.shape[1]) or not torch.equal(w[r], p):
                return None
    return kind, fused, dict(zip(kinds, rows))


def host_layouts(bridge: nn.Module, specs: Iterable, *, check_values: bool = True) -> dict[str, HostLayout]:
    """Matrix name → `HostLayout` for every spec (`rwasym.models.MatrixSpec`: name, kind, component).

    Fused hosts are detected once per block (`fused_qkv_rows`, `fused_gate_up_rows`); with
    ``check_values`` (loaded models) a fused layout is kept only where the fused weight's rows equal
    the bridge's split copies exactly. ``check_values=False`` for weightless (meta-device) skeletons,
    whose values cannot be compared. A matrix whose fused host is not recognised keeps the layout of
    its split copy (which is then no module of the Hugging Face tree: it has no module name)."""
    out, groups = {}, {}
    for spec in specs:
        if getattr(spec, "expert", None) is not None:  # a slice of the experts' 3-D parameters
            out[spec.name] = expert_layout(bridge, spec.component, spec.kind, spec.expert)
            continue
        linear = host_linear(bridge, spec.component)
        group = spec.component.rsplit(".", 1)[0]
        if group not in groups:
            groups[group] = _fused_parts(bridge, group, check_values)
        fused = groups[group]
        if fused is not None and spec.kind in fused[2]:
            kind, module, rows = fused
            out[spec.name] = HostLayout(module, is_transposed(module), rows[spec.kind], kind, linear)
        else:
            out[spec.name] = HostLayout(linear, is_transposed(linear), None, None, linear)
    return out


def _unknown_fused(bridge: nn.Module, layouts: Mapping[str, HostLayout]) -> list[str]:
    """Fused qkv blocks of ``bridge`` without a fused layout (their rows could not be read)."""
    missing = []
    blocks = cast(Iterable[nn.Module], bridge.blocks)  # torch types a module attribute as Tensor | Module
    for layer, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if attn is None or "qkv" not in attn._modules:
            continue
        layout = layouts.get(f"blocks.{layer}.attn.W_Q")
        if layout is None or layout.fused != "qkv":
            missing.append(f"blocks.{layer}.attn")
    return missing


@torch.no_grad()
def sync_fused(
    bridge: nn.Module, layouts: Mapping[str, HostLayout], kinds: tuple[str, ...] = ("qkv", "gate_up")
) -> int:
    """Copy the split weights (and biases) the forward pass uses back into each fused host parameter of
    ``kinds``, so ``original_model.save_pretrained`` saves what the bridge computes.

    Returns the number of fused hosts synced; raises when a fused qkv layer's rows are unknown."""
    if "qkv" in kinds:
        missing = _unknown_fused(bridge, layouts)
        if missing:
            raise RwasymError(
                f"{missing[0]} has a fused qkv parameter whose row layout rwasym could not read off the "
                "bridge's split_qkv_matrix; saving it would drop changes to W_Q/W_K/W_V"
            )
    hosts: dict[int, list[HostLayout]] = {}
    for layout in layouts.values():
        if layout.fused in kinds:
            hosts.setdefault(id(layout.module), []).append(layout)
    for parts in hosts.values():
        fused = parts[0].module
        linears: list[nn.Module] = []
        for part in parts:
            assert part.linear is not None  # `host_layouts` gives every layout the linear the forward pass uses
            linears.append(part.linear)
        w = _linear_layout(fused).clone()
        for part, linear in zip(parts, linears):
            w[part.rows] = _linear_layout(linear).to(w.dtype)
        cast(Tensor, fused.weight).copy_(w.T if parts[0].transposed else w)
        fused_bias = getattr(fused, "bias", None)
        if fused_bias is not None and all(linear.bias is not None for linear in linears):
            b = fused_bias.clone()  # the split biases may be views of the fused one
            for part, linear in zip(parts, linears):
                b[part.rows] = cast(Tensor, linear.bias).to(b.dtype)
            fused_bias.copy_(b)
    return len(hosts)


def host_module_names(bridge: nn.Module, layouts: Mapping[str, HostLayout]) -> dict[str, str]:
    """Matrix name → qualified name of its host module in the Hugging Face model
    (``bridge.original_model``), e.g. ``model.layers.0.self_attn.q_proj`` — the names PEFT adapters
    and safetensors keys (``<name>.weight``) use. Fused matrices map to the fused host (GPT-2
    ``c_attn``, NeoX ``query_key_value``, Phi-3 ``gate_up_proj``). Found by identity among the module
    tree's aliases, keeping the name a fresh (meta-device) instance of the HF class has; non-HF hosts
    keep the first alias; a host outside the tree (an unrecognised split copy) has no name."""
    host = cast(nn.Module, bridge.original_model)  # torch types a module attribute as Tensor | Module
    aliases: dict[int, list[str]] = {}
    for qualified, module in host.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(clean_key(qualified))
    hf_names = None
    if hasattr(host, "config") and hasattr(host, "save_pretrained"):
        with torch.device("meta"):
            hf_names = {n for n, _ in type(host)(host.config).named_modules()}
    out = {}
    for name, layout in layouts.items():
        real = [n for n in aliases.get(id(layout.module), []) if hf_names is None or n in hf_names]
        if real:
            out[name] = real[0]
    return out


def save_hf(bridge: nn.Module, layouts: Mapping[str, HostLayout], folder: str | os.PathLike) -> Path:
    """Save a Hugging Face-hosted bridge as a plain Hugging Face folder (config, safetensors, tokenizer
    when there is one).

    The bridge rewires the HF module tree (aliases, split q/k/v copies), so the host's own
    ``save_pretrained`` would write duplicated or stale tensors. This syncs the fused parameters
    from the split copies (`sync_fused`), maps the bridge's state dict back to the HF names, loads it
    into a fresh instance of the HF class and saves that."""
    host = cast("PreTrainedModel", bridge.original_model)  # a Hugging Face-hosted bridge's host
    sync_fused(bridge, layouts)
    fresh = type(host)(host.config)
    wanted = fresh.state_dict()
    clean = {}
    for key, value in host.state_dict().items():
        name = clean_key(key)
        if name in wanted and name not in clean:
            clean[name] = value.detach().clone()
    missing = [k for k in wanted if k not in clean]
    if missing:
        raise RwasymError(f"cannot map the bridge back to {type(host).__name__}: missing {missing[:5]}")
    fresh.load_state_dict(clean, strict=True)
    folder = Path(folder)
    fresh.save_pretrained(folder)
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
