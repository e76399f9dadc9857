"""The adapter: the matrix registry and weight read/write of one TransformerBridge.

A studied matrix is always returned in `nn.Linear` layout, W ∈ R^{n_out × n_in} acting as
y = W a, whatever the host stores (GPT-2 `Conv1D` is transposed; fused QKV and gate-up hosts are
read through the bridge's split linears, which are the ones the bridge's forward pass uses; GQA K/V
have `n_key_value_heads` heads). How each matrix is stored in the Hugging Face model (transpose,
fused rows, module names, syncing and saving) is `rwasym.models.host`'s, read here through
`Model.host_layout`.

Registry names use TransformerLens vocabulary: ``blocks.{L}.attn.W_Q|W_K|W_V|W_O`` and
``blocks.{L}.mlp.W_in|W_gate|W_out``. Each matrix is defined by the linear map it feeds: its input
hook is that linear's ``hook_in`` (after the layer norm for Q/K/V/W_in/W_gate) and its output hook
that linear's ``hook_out`` — never a compatibility alias (see TL #1317, #1639).

Mixture-of-experts MLPs (Mixtral, OLMoE, Qwen2-MoE; `_moe_specs`) give ``blocks.{L}.mlp.W_router``
(the router, E × d_model, read side), ``blocks.{L}.mlp.experts.{e}.W_in|W_gate|W_out`` per expert
(slices of the experts' fused 3-D parameters, `rwasym.models.host.expert_layout`) and, where the block
has one (Qwen2-MoE), ``blocks.{L}.mlp.shared.W_in|W_gate|W_out`` (plain linears). An expert has no hook
of its own: its ``hook_in`` / ``hook_out`` are the MLP block's input and output hooks, between which it
acts on the tokens routed to it (see `MatrixSpec`).

Hook tensors of attention linears may arrive per-head shaped ``(..., n_heads, d_head)``; use
`flatten_site` to view them as ``(..., n)`` before doing linear algebra.
"""

import contextlib
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import RwasymError
from ..math.checks import require_finite
from .heads import head_slice
from .host import (
    HostLayout,
    experts_module,
    host_layouts,
    host_linear,
    host_module_names,
    is_transposed,
    save_hf,
    sync_fused,
)

if TYPE_CHECKING:  # transformer_lens is imported lazily (`rwasym.models.loading.bridge_classes`)
    from transformer_lens.model_bridge import TransformerBridge

_ATTN_KINDS = {"W_Q": "q", "W_K": "k", "W_V": "v", "W_O": "o"}
_MLP_KINDS = {"W_in": "in", "W_gate": "gate", "W_out": "out"}
KINDS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out", "W_router")
READ_KINDS = frozenset({"W_Q", "W_K", "W_V", "W_in", "W_gate", "W_router"})


@dataclass(frozen=True)
class MatrixSpec:
    """One studied matrix: W (n_out × n_in), y = W a.

    side: "read" (input space studied: W_Q/W_K/W_V/W_in/W_gate/W_router) or "write" (output space is the
    residual stream: W_O/W_out). n_heads: heads the matrix is split into (n_key_value_heads for
    W_K/W_V under GQA), 0 for MLP matrices. head_axis: "out" when heads index rows (Q/K/V),
    "in" when they index columns (O), None for MLP.

    expert: the expert index e of ``blocks.L.mlp.experts.e.*`` in a mixture-of-experts MLP, None for every
    other matrix (dense ones, the router, a shared expert). An expert matrix acts only on the tokens the
    router sends to it, and no hook carries its own input or output: its ``hook_in`` is the MLP block's
    input hook (``blocks.L.mlp.hook_in``: the tensor whose routed rows W_gate,e and W_in,e read; W_out,e
    reads h = act(W_gate,e a) ⊙ (W_in,e a) of those rows) and its ``hook_out`` the MLP block's output hook
    (``blocks.L.mlp.hook_out``, where its routing-weighted output w_{t,e} · W_out,e h is summed in).
    ``component`` is the MoE block (``blocks.L.mlp``). ``Model.input_hook`` refuses expert matrices: their
    statistics are routed (per expert, over its routed tokens: not built yet), not the whole site's.
    """

    name: str
    layer: int
    kind: str
    side: str
    n_out: int
    n_in: int
    n_heads: int
    d_head: int | None
    hook_in: str
    hook_out: str
    component: str
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def head_axis(self) -> str | None:
        if self.kind in ("W_Q", "W_K", "W_V"):
            return "out"
        return "in" if self.kind == "W_O" else None

    def to_dict(self) -> dict:
        """The fields as a dict; ``expert`` only where it is set, so a dense matrix's dict (and every hash
        of it, e.g. a sweep's header) is what it was before experts existed."""
        out = asdict(self)
        if out["expert"] is None:
            del out["expert"]
        return out


@torch.no_grad()
def norm_scale(module: nn.Module, d: int) -> Float[Tensor, " d"]:
    """The diagonal scale γ_eff (float64) a norm module applies at unit RMS, from two calls:
    γ_eff,i = (N(x)_i − N(−x)_i) / (2 x_i), x zero-mean with entries ±1 (rescaled to unit RMS)."""
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat((d + 1) // 2)[:d]
    probes = (
        [sign]
        if d % 2 == 0
        else [torch.cat([sign[: d - 1], sign.new_zeros(1)]), torch.cat([sign.new_zeros(1), sign[: d - 1]])]
    )
    gamma = torch.zeros(d, dtype=torch.float64)
    for x in probes:
        x = x * (d / float(x.square().sum())) ** 0.5  # unit RMS
        xs = torch.stack([x, -x]).to(device, dtype)[:, None, :]  # (2, 1, d): two positions of one token
        out = module(xs)
        out = (out[0] if isinstance(out, tuple) else out).to("cpu", torch.float64)[:, 0, :]
        nonzero = x != 0
        gamma[nonzero] = ((out[0] - out[1]) / (2 * x))[nonzero]
    if not torch.isfinite(gamma).all():
        raise RwasymError(f"the norm {type(module).__name__} gives a non-finite scale; check its weights")
    return gamma


def _is_mixture_of_experts(mlp: nn.Module) -> bool:
    """A TransformerBridge MoE block (Mixtral, OLMoE, Qwen-MoE): a router instead of a gate projection."""
    return (
        "MoE" in type(mlp).__name__
        or "hook_router_scores" in mlp._modules
        or "Router" in type(mlp._modules.get("gate")).__name__
    )


def flatten_site(x: Tensor, n: int) -> Tensor:
    """View a hook tensor as (..., n): merges a trailing (n_heads, d_head) pair when present.

    A 4-D (batch, pos, n_heads, d_head) tensor with n_heads · d_head = n is always merged — also
    with one head (multi-query K/V: (batch, pos, 1, d_head), n = d_head), so the result is
    (batch, pos, n) whatever the head count; a (batch, pos, n) tensor is returned as is."""
    if x.dim() >= 4 and x.shape[-1] * x.shape[-2] == n:
        return x.flatten(-2)
    if x.shape[-1] == n:
        return x
    if x.dim() >= 2 and x.shape[-1] * x.shape[-2] == n:
        return x.flatten(-2)
    raise RwasymError(f"hook tensor of shape {tuple(x.shape)} cannot be viewed as (..., {n})")


class Model:
    """rwasym's view of one TransformerBridge: the matrix registry and weight read/write.

    Build it with `rwasym.load`. ``model.bridge`` is the TransformerBridge (call it for logits,
    use its hooks); everything architecture-specific is answered here.
    """

    meta: dict[str, Any]  # only on a model loaded from a native checkpoint (`rwasym.models.loading.load_native`)

    def __init__(self, bridge: nn.Module, source: Any = None, *, weightless: bool = False):
        # a TransformerBridge: the signature says nn.Module so that this module need not import TransformerLens
        self.bridge = cast("TransformerBridge", bridge)
        self.source = source
        self.cfg = self.bridge.cfg
        # what the registry leaves out, by reason (e.g. mixture-of-experts MLPs): warned at load
        self.unsupported: dict[str, list[str]] = {}
        self._specs = {spec.name: spec for spec in self._build_registry()}
        if self.unsupported.get("mixture-of-experts MLP"):
            warnings.warn(
                f"rwasym: {type(getattr(bridge, 'original_model', bridge)).__name__}'s MLPs are mixtures of experts; "
                "rwasym does not study expert matrices yet, so its registry holds the attention matrices "
                "(blocks.*.attn.*) only",
                stacklevel=2,
            )
        # where each matrix is stored (`rwasym.models.host`); a weightless (meta-device) skeleton's fused
        # rows are read off the bridge's split without comparing values
        self._layouts = host_layouts(bridge, self._specs.values(), check_values=not weightless)
        self.tokenizer_source: tuple | None = None  # (folder or hub name, revision) of the saved tokenizer
        self._tokenizer: Any = None
        self.provenance: dict = {}  # where the weights came from beyond `source` (e.g. "gguf": the quantized file)
        self.adapter: dict | None = None  # name → rwasym.math.lowrank.LowRankDelta when loaded with adapter=
        if not self._specs:
            raise RwasymError(
                f"found no attention or MLP linears in {type(bridge).__name__}; rwasym needs a "
                "TransformerBridge whose blocks expose attn.q/k/v/o and mlp.in/out"
            )

    # -- host layouts (rwasym.models.host) ------------------------------------------------------
    def host_layout(self, name: str) -> HostLayout:
        """Where matrix ``name`` is stored in the Hugging Face (or native) model: its host module,
        Conv1D transpose and, for a fused qkv or gate-up host, its rows (`rwasym.models.host.HostLayout`)."""
        return self._layouts[self.matrix(name).name]

    def sync_fused_qkv(self) -> int:
        """Copy the split q/k/v weights (and biases) the forward pass uses back into the host's
        fused qkv parameter, so ``original_model.save_pretrained`` saves what the bridge computes.

        Returns the number of layers synced; raises when a fused layer's rows are unknown.
        """
        return sync_fused(self.bridge, self._layouts, ("qkv",))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Save as a plain Hugging Face folder (config, safetensors, tokenizer when there is one).

        A native model is written as the exactly equivalent ``GPT2LMHeadModel`` (`native_to_gpt2`;
        GPT-2-shaped configs only, else RwasymError), so peft / TRL / transformers can use it.

        The bridge rewires the HF module tree (aliases, split q/k/v copies), so the host's own
        ``save_pretrained`` would write duplicated or stale tensors. This syncs the fused qkv
        parameters from the split copies, maps the bridge's state dict back to the HF names, loads
        it into a fresh instance of the HF class and saves that (`rwasym.models.host.save_hf`).
        """
        host = self.bridge.original_model
        if not hasattr(host, "save_pretrained"):  # a native model: exported as an exact GPT-2 when it is one
            folder = Path(folder)
            from .gpt2 import native_to_gpt2

            native_to_gpt2(self).save_pretrained(folder)
            return folder
        return save_hf(self.bridge, self._layouts, folder)

    def host_module_names(self) -> dict[str, str]:
        """Matrix name → qualified name of the nn.Module holding its weight in the Hugging Face model
        (``bridge.original_model``), e.g. ``model.layers.0.self_attn.q_proj`` — the names PEFT
        adapters use. W_Q/W_K/W_V of a fused layer all map to the fused host (GPT-2 ``c_attn``,
        NeoX ``query_key_value``), W_gate/W_in of a fused gate-up layer to it (Phi-3 ``gate_up_proj``).
        Found by identity among the module tree's aliases, keeping the
        name a fresh (meta-device) instance of the HF class has; non-HF hosts keep the first alias
        (`rwasym.models.host.host_module_names`).
        """
        return host_module_names(self.bridge, self._layouts)

    # -- registry -----------------------------------------------------------------------------
    def _build_registry(self) -> Iterator[MatrixSpec]:
        n_heads = int(self.cfg.n_heads)
        n_kv = int(getattr(self.cfg, "n_key_value_heads", None) or n_heads)
        d_head = int(self.cfg.d_head)
        for layer, block in enumerate(self.bridge.blocks):
            for group, kinds in (("attn", _ATTN_KINDS), ("mlp", _MLP_KINDS)):
                parent = getattr(block, group, None)
                if parent is None:
                    continue
                if group == "mlp" and _is_mixture_of_experts(parent):
                    # its "gate" is the router, not a gate projection, and the experts are slices of fused
                    # 3-D parameters; a layout rwasym does not know is left out (see `unsupported`)
                    if experts_module(self.bridge, f"blocks.{layer}.mlp") is None or "gate" not in parent._modules:
                        self.unsupported.setdefault("mixture-of-experts MLP", []).append(f"blocks.{layer}.mlp")
                    else:
                        yield from self._moe_specs(layer, parent)
                    continue
                for kind, sub in kinds.items():
                    if sub not in getattr(parent, "_modules", {}):
                        continue
                    component = f"blocks.{layer}.{group}.{sub}"
                    host = host_linear(self.bridge, component)
                    w = cast(Tensor, host.weight)  # torch types a module attribute as Tensor | Module
                    n_out, n_in = (w.shape[1], w.shape[0]) if is_transposed(host) else w.shape
                    heads = {"W_Q": n_heads, "W_O": n_heads, "W_K": n_kv, "W_V": n_kv}.get(kind, 0)
                    width = n_out if kind in ("W_Q", "W_K", "W_V") else n_in
                    if heads and heads * d_head != width:
                        raise RwasymError(
                            f"blocks.{layer}.{group}.{kind} has {width} head-axis units but the config says "
                            f"{heads} heads × d_head {d_head} = {heads * d_head}; fix n_heads / "
                            "n_key_value_heads / d_head in the bridge config"
                        )
                    yield MatrixSpec(
                        name=f"blocks.{layer}.{group}.{kind}",
                        layer=layer,
                        kind=kind,
                        side="read" if kind in READ_KINDS else "write",
                        n_out=int(n_out),
                        n_in=int(n_in),
                        n_heads=heads,
                        d_head=d_head if heads else None,
                        hook_in=f"{component}.hook_in",
                        hook_out=f"{component}.hook_out",
                        component=component,
                    )

    def _moe_specs(self, layer: int, mlp: nn.Module) -> Iterator[MatrixSpec]:
        """The matrices of a mixture-of-experts MLP: the router W_router (E × d_model: logits = W_router a of the
        MLP input a, read side; its hooks are the bridge router's own), every expert's W_in, W_gate (d_mlp ×
        d_model, read) and W_out (d_model × d_mlp, write) — slices of the fused 3-D parameters
        (`rwasym.models.host.expert_layout`), hooks the MLP block's (see `MatrixSpec`) — and a shared expert's
        W_in, W_gate, W_out (Qwen2-MoE ``shared_expert``: plain linears every token passes through, with their
        own hooks; its 1 × d_model sigmoid gate ``shared_expert_gate`` is not a studied matrix)."""
        prefix = f"blocks.{layer}.mlp"
        router = cast(Tensor, host_linear(self.bridge, f"{prefix}.gate").weight)
        n_experts, d_model = (int(n) for n in router.shape)
        experts = experts_module(self.bridge, prefix)
        assert experts is not None  # checked by the caller
        down = cast(Tensor, experts.down_proj)
        if tuple(down.shape[:2]) != (n_experts, d_model):
            raise RwasymError(
                f"{prefix}: the router has {n_experts} × {d_model} weights but the experts' down_proj is "
                f"{tuple(down.shape)}; the MoE block's router and experts disagree: check the model's config"
            )
        d_mlp = int(down.shape[2])
        yield self._spec(f"{prefix}.W_router", layer, "W_router", (n_experts, d_model), f"{prefix}.gate")
        shapes = {"W_in": (d_mlp, d_model), "W_gate": (d_mlp, d_model), "W_out": (d_model, d_mlp)}
        for e in range(n_experts):
            for kind, shape in shapes.items():
                yield MatrixSpec(
                    name=f"{prefix}.experts.{e}.{kind}",
                    layer=layer,
                    kind=kind,
                    side="read" if kind in READ_KINDS else "write",
                    n_out=shape[0],
                    n_in=shape[1],
                    n_heads=0,
                    d_head=None,
                    hook_in=f"{prefix}.hook_in",
                    hook_out=f"{prefix}.hook_out",
                    component=prefix,
                    expert=e,
                )
        shared = mlp._modules.get("shared_expert")
        if shared is not None:
            for kind, sub in _MLP_KINDS.items():
                if sub in shared._modules:
                    component = f"{prefix}.shared_expert.{sub}"
                    w = cast(Tensor, host_linear(self.bridge, component).weight)
                    yield self._spec(f"{prefix}.shared.{kind}", layer, kind, tuple(w.shape), component)

    @staticmethod
    def _spec(name: str, layer: int, kind: str, shape: tuple, component: str) -> MatrixSpec:
        """A headless matrix of an ``nn.Linear`` host with its own hooks (a router, a shared expert's linear)."""
        return MatrixSpec(
            name=name,
            layer=layer,
            kind=kind,
            side="read" if kind in READ_KINDS else "write",
            n_out=int(shape[0]),
            n_in=int(shape[1]),
            n_heads=0,
            d_head=None,
            hook_in=f"{component}.hook_in",
            hook_out=f"{component}.hook_out",
            component=component,
        )

    def matrices(self, pattern: str | Sequence[str] | None = None) -> list[MatrixSpec]:
        """The registry, in layer order.

        ``pattern``: a glob where ``*`` matches one dotted segment (``blocks.*.attn.W_Q``,
        ``blocks.0.*.*``), or a list of globs. A pattern matching nothing returns [].
        """
        specs = list(self._specs.values())
        if pattern is None:
            return specs
        return [s for s in specs if matches_pattern(s.name, pattern)]

    def unmatched(self, pattern: Any) -> RwasymError:
        """The error for a matrix pattern that selects nothing: the valid names, and what this model's
        registry leaves out and why (`unsupported`)."""
        left_out = "".join(
            f"; not studied ({why}): {', '.join(parts[:3])}{' ...' if len(parts) > 3 else ''}"
            for why, parts in self.unsupported.items()
        )
        return RwasymError(
            f"pattern {pattern!r} matches no matrix{left_out}; valid names: "
            f"{', '.join(s.name for s in self.matrices())}"
        )

    def matrix(self, name: str) -> MatrixSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise RwasymError(f"unknown matrix name {name!r}; valid names are: {', '.join(self._specs)}") from None

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(cast(Tensor, self.unembedding_host().weight).shape[0])

    @property
    def tokenizer(self) -> Any:
        """The model's own tokenizer, as saved with it (``AutoTokenizer.from_pretrained`` of the folder
        or hub name it was loaded from: what TRL or transformers users get), else the bridge's (None for
        native models without one). TransformerLens' bridge tokenizer adds a BOS to every text
        (``add_bos_token=True``); the saved one adds what the model's authors configured."""
        if self._tokenizer is None and self.tokenizer_source is not None:
            from transformers import AutoTokenizer

            name, revision = self.tokenizer_source
            self._tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        return self._tokenizer if self._tokenizer is not None else getattr(self.bridge, "tokenizer", None)

    @property
    def n_ctx(self) -> int | None:
        """The context length, when the config states one."""
        n = getattr(self.cfg, "n_ctx", None)
        return int(n) if n else None

    def weights_hash(self) -> str:
        """A short content hash (blake2b, 8 bytes) of every parameter and buffer of the wrapped
        module, tied tensors once: keys sweeps and capture checkpoints by weights, not by name."""
        import hashlib

        h, seen = hashlib.blake2b(digest_size=8), set()
        for key, t in sorted(self.bridge.original_model.state_dict().items()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def load_pairs(self, source: Any, *, chat_template: bool = False, max_length: int | None = None) -> Any:
        """Preference pairs for this model (`rwasym.data.load_pairs`): text (TRL format, strings or
        messages) is tokenized with the model's own tokenizer, ids are checked against its
        vocabulary and prompt + completion against its context (after TRL-style ``max_length``
        truncation, when given)."""
        from ..data.pairs import load_pairs

        return load_pairs(
            source,
            self.tokenizer,
            d_vocab=self.d_vocab,
            n_ctx=self.n_ctx,
            chat_template=chat_template,
            max_length=max_length,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.bridge.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def input_hook(self, name: str) -> str:
        """The canonical hook carrying the input of matrix ``name``.

        Q, K and V read one tensor (the attention input after ln1), and W_gate reads the W_in
        input; they share W_Q's / W_in's hook so a capture computes each covariance once.
        """
        spec = self.matrix(name)
        why = self.no_input_site(name)
        if why is not None:
            raise RwasymError(
                f"{name} has no input site whose every token it reads: {why}; "
                "per-expert routed statistics are not built yet (issue #33, phase 2): leave it out of matrices="
            )
        if spec.kind == "W_router" or spec.name.startswith(f"blocks.{spec.layer}.mlp.shared."):
            return f"blocks.{spec.layer}.mlp.hook_in"  # the MoE block's input (batch, pos, d), as the router reads it
        twin = {"W_K": "W_Q", "W_V": "W_Q", "W_gate": "W_in"}.get(spec.kind)
        if twin and getattr(self.cfg, "use_split_qkv_input", False) is False:
            group = "attn" if twin == "W_Q" else "mlp"
            return self._specs[f"blocks.{spec.layer}.{group}.{twin}"].hook_in
        return spec.hook_in

    def linear_hooks(self, name: str, what: str) -> tuple[str, str]:
        """(hook_in, hook_out) of matrix ``name``: the hooks carrying a and y = W a (+ b) of its own linear, for
        hooks that act on them (``what`` names the caller in the error). RwasymError for an expert matrix,
        whose hooks are the MoE block's (`MatrixSpec`: the expert acts on routed tokens between them)."""
        spec = self.matrix(name)
        if spec.expert is not None:
            raise RwasymError(
                f"{what} needs the hooks of {name}'s own linear, but an expert has none (it acts on the tokens "
                f"routed to it inside {spec.component}); edit it through its weights (Model.edit, "
                "mechanism='weight') instead"
            )
        return spec.hook_in, spec.hook_out

    def no_input_site(self, name: str) -> str | None:
        """Why matrix ``name`` has no (batch, pos)-shaped hook carrying its input for every token, or None
        when it has one (`input_hook`). Experts read only the tokens routed to them; a shared expert's W_out
        reads its hidden state, which the bridge carries only token-flattened ((batch·pos, d_mlp), no
        attention mask can select its rows)."""
        spec = self.matrix(name)
        if spec.expert is not None:
            return f"expert {spec.expert} of blocks.{spec.layer}.mlp reads only the tokens routed to it"
        if spec.name == f"blocks.{spec.layer}.mlp.shared.W_out":
            return "its input, the shared expert's hidden state, is carried only by a token-flattened hook"
        return None

    def residual_hooks(self) -> dict[str, str]:
        """``blocks.L.hook_resid_pre|mid|post`` → the bridge hook that carries it.

        resid_mid (between attention and MLP) exists only for sequential blocks.
        """
        out = {}
        parallel = bool(getattr(self.cfg, "parallel_attn_mlp", False))
        for layer, block in enumerate(self.bridge.blocks):
            out[f"blocks.{layer}.hook_resid_pre"] = f"blocks.{layer}.hook_in"
            if not parallel and "Parallel" not in type(block).__name__:
                if "ln2" in block._modules:
                    out[f"blocks.{layer}.hook_resid_mid"] = f"blocks.{layer}.ln2.hook_in"
                elif "mlp" in block._modules:  # no pre-MLP norm (OLMo 2): the MLP reads resid_mid itself
                    out[f"blocks.{layer}.hook_resid_mid"] = f"blocks.{layer}.mlp.hook_in"
            out[f"blocks.{layer}.hook_resid_post"] = f"blocks.{layer}.hook_out"
        return out

    # -- reading ------------------------------------------------------------------------------
    def host_parameter(self, name: str) -> nn.Parameter:
        """The parameter the forward pass really uses for ``name`` (host layout): for an expert matrix the
        whole fused 3-D parameter (``gate_up_proj`` or ``down_proj``) that holds it."""
        layout = self._layouts.get(name)
        if layout is not None and layout.expert is not None:
            return layout.parameter
        return cast(nn.Parameter, host_linear(self.bridge, self.matrix(name).component).weight)

    def host_tensor(self, name: str) -> Tensor:
        """The part of the host parameter the forward pass uses for ``name`` (a view, host layout): the
        parameter itself, or for an expert matrix its expert's slice ``gate_up_proj[e]`` (W_gate,e and
        W_in,e: both halves) or ``down_proj[e]``. What `edit` saves and restores, and `state_fingerprint` copies."""
        layout = self._layouts.get(name)
        if layout is not None and layout.expert is not None:
            return layout.parameter[layout.expert]
        return self.host_parameter(name)

    def weight(self, name: str) -> Float[Tensor, "n_out n_in"]:
        """A float64 CPU copy of the matrix in nn.Linear layout (n_out × n_in); an expert's is its slice of
        the fused 3-D parameter (`rwasym.models.host.expert_layout`)."""
        spec = self.matrix(name)
        if spec.expert is not None:
            layout = self._layouts[spec.name]
            return layout.matrix(layout.parameter.detach()).to("cpu", torch.float64, copy=True)
        host = host_linear(self.bridge, spec.component)
        w = cast(Tensor, host.weight).detach().to("cpu", torch.float64)
        return (w.T if is_transposed(host) else w).clone()

    def bias(self, name: str) -> Float[Tensor, " n_out"] | None:
        """The bias of matrix ``name`` (float64 copy), or None; experts have none (transformers 5)."""
        if self.matrix(name).expert is not None:
            return None
        host = host_linear(self.bridge, self.matrix(name).component)
        b = getattr(host, "bias", None)
        return None if b is None else b.detach().to("cpu", torch.float64).clone()

    def head_weight(self, name: str, head: int) -> Float[Tensor, "n_out n_in"]:
        """Per-head view: W_Q/K/V[h] = rows h·d_head:(h+1)·d_head (d_head × d_model);
        W_O[h] = columns h·d_head:(h+1)·d_head (d_model × d_head). GQA-aware for K/V."""
        return head_slice(self.matrix(name), self.weight(name), head)

    def unembedding_host(self) -> nn.Module:
        return host_linear(self.bridge, "unembed")

    def unembedding(self) -> Float[Tensor, "d_model d_vocab"]:
        """Effective unembedding diag(γ_eff) · W_U (d_model × vocab), float64.

        The logits read the residual stream only through the final norm, so its diagonal scale is
        folded in; its bias (if any) shifts the logits by a constant per token and is left out.
        γ_eff is measured on the norm module itself (`final_norm_scale`), so LayerNorm, RMSNorm and
        Gemma's RMSNorm (which multiplies by 1 + w) are all handled by what they compute, not by the
        name of a parameter. Convention: unembedding()ᵀ x = (logits(x) − logits(−x)) / 2 for a
        zero-mean, unit-RMS residual x (before any logit soft-capping).
        """
        w_u, gamma = self.unembedding_parts()
        w_u = w_u.to("cpu", torch.float64, copy=True)
        return w_u if gamma is None else w_u.mul_(gamma[:, None])  # in place: one float64 copy, the same values

    def unembedding_parts(self) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_model"] | None]:
        """(W_U as stored, oriented d_model × vocab: a view of the host weight, not a copy; γ_eff of the final
        norm or None): `unembedding` is diag(γ_eff)·W_U in float64. For readers that fold γ in chunk by chunk
        (`rwasym.math.subspaces.prediction_basis`'s ``row_scale``) instead of holding a float64 copy."""
        host = self.unembedding_host()
        w_u = cast(Tensor, host.weight).detach()
        return (w_u if is_transposed(host) else w_u.T), self.final_norm_scale()

    def post_norm_scale(self, name: str) -> Float[Tensor, " d_model"] | None:
        """γ_eff (`norm_scale`) of the norm a write matrix's sublayer output passes through before
        the residual add — OLMo 2 and Gemma 2/3 normalise the attention output (``ln1_post``) and
        the MLP output (``ln2_post``) — or None where the output is added as it is (pre-norm
        blocks) or for read matrices. What reaches the residual stream is then, per token,
        diag(γ_eff)·(W x)/rms(W x): the write side's change as the stream sees it is
        diag(γ_eff)·ΔW with the per-token RMS factored out."""
        spec = self.matrix(name)
        if spec.side != "write":
            return None
        block = self.bridge.blocks[spec.layer]
        norm = block._modules.get("ln1_post" if spec.kind == "W_O" else "ln2_post")
        module = getattr(norm, "original_component", None)
        return None if module is None else norm_scale(module, self.d_model)

    def final_norm_scale(self) -> Float[Tensor, " d_model"] | None:
        """γ_eff of the final norm N, measured: γ_eff,i = (N(x)_i − N(−x)_i) / (2 x_i) at a zero-mean,
        unit-RMS x of ±1 entries (odd d_model: two such probes, each with one zero entry). This is
        γ/√(1+ε) for LayerNorm and RMSNorm and (1 + w)/√(1+ε) for Gemma's RMSNorm, whatever the
        parameter is called; LayerNorm's bias cancels. None when the model has no final norm module."""
        ln = getattr(self.bridge, "ln_final", None)
        module = getattr(ln, "original_component", None)
        if module is None:
            return None
        return norm_scale(module, self.d_model)

    # -- writing ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_weight(self, name: str, value: Float[Tensor, "n_out n_in"]) -> None:
        """Write ``value`` (nn.Linear layout) into the host parameter the forward pass uses.

        Prefer the `edit` context manager, which restores the original bit-exactly.
        """
        spec = self.matrix(name)
        if tuple(value.shape) != spec.shape:
            raise RwasymError(
                f"{name} has shape (n_out, n_in) = {spec.shape}, got a value of shape "
                f"{tuple(value.shape)}; pass the matrix in nn.Linear layout (n_out × n_in)"
            )
        require_finite(value, f"the new value of {name}")
        if spec.expert is not None:  # W_gate,e / W_in,e: rows of gate_up_proj[e]; W_out,e: down_proj[e]
            layout = self._layouts[spec.name]
            target = layout.parameter[spec.expert]
            new = value.to(target.device, target.dtype)
            if layout.rows is None:
                target.copy_(new)
            else:
                target.index_copy_(0, layout.rows.to(target.device), new)
            return
        host = host_linear(self.bridge, spec.component)
        new = value.T if is_transposed(host) else value
        weight = cast(Tensor, host.weight)
        weight.copy_(new.to(weight.device, weight.dtype))

    @contextlib.contextmanager
    def edit(self, updates: Mapping[str, Tensor]) -> Iterator["Model"]:
        """Temporarily set several matrices; restores every host parameter bit-exactly on exit,
        also when the body raises."""
        saved = {name: self.host_tensor(name).detach().clone() for name in updates}
        try:
            for name, value in updates.items():
                self.set_weight(name, value)
            yield self
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self.host_tensor(name).copy_(original)

    @torch.no_grad()
    def self_check(self, tokens: Tensor | None = None, *, rtol: float = 1e-4) -> list[dict]:
        """The adapter's consistency check: for every registry matrix, the tensor at its input
        hook times Wᵀ (+ b) must equal the tensor at its output hook. Expert matrices of a
        mixture-of-experts MLP have no hooks of their own and are not checked (no row); the router and
        a shared expert's linears are.

        This proves the layout (no silent transpose), the head split and the hook names at once.
        Returns one row per matrix (max relative error); raises RwasymError listing the failures.
        """
        if tokens is None:
            g = torch.Generator().manual_seed(0)
            n_ctx = int(getattr(self.cfg, "n_ctx", 16) or 16)
            tokens = torch.randint(0, self.d_vocab, (2, min(16, n_ctx)), generator=g)
        try:
            _, cache = self.bridge.run_with_cache(tokens.to(self.device))
        except Exception as err:  # noqa: BLE001 — any failure of the forward is reported as ours
            raise RwasymError(
                f"self_check: the model's forward pass failed on tokens of shape {tuple(tokens.shape)} "
                f"({type(err).__name__}: {err}); check the model loads and runs on its own"
            ) from None
        rows, failures = [], []
        for spec in self.matrices():
            if spec.expert is not None:  # no hooks of its own (MatrixSpec): not checked here
                continue
            if spec.hook_in not in cache or spec.hook_out not in cache:
                failures.append(f"{spec.name}: hook {spec.hook_in} or {spec.hook_out} never fired")
                continue
            x_in, x_out = cache[spec.hook_in], cache[spec.hook_out]
            where = (
                f"{spec.name}: hook {spec.hook_in} {tuple(x_in.shape)} → {spec.hook_out} {tuple(x_out.shape)}, "
                f"W (n_out, n_in) = {spec.shape}"
            )
            try:
                a = flatten_site(x_in, spec.n_in).double()
                y = flatten_site(x_out, spec.n_out).double()
                b = self.bias(spec.name)
                pred = a @ self.weight(spec.name).T.to(a.device) + (0 if b is None else b.to(a.device))
                err = float((pred - y).norm() / y.norm().clamp_min(1e-30))
            except (RwasymError, RuntimeError, ValueError) as exc:  # shapes that do not fit together
                failures.append(f"{where}: {exc}")
                continue
            rows.append(dict(matrix=spec.name, relative_error=err))
            if not err <= rtol:
                failures.append(f"{where}: ‖hook_in·Wᵀ + b − hook_out‖/‖hook_out‖ = {err:.2e}")
        if failures:
            raise RwasymError(
                "adapter consistency check failed (wrong layout, head split or hook names):\n  " + "\n  ".join(failures)
            )
        return rows

    def state_fingerprint(self) -> dict[str, Tensor]:
        """Host-layout copies of every studied matrix (for bit-exact restore checks; an expert's slice of its
        fused parameter, `host_tensor`)."""
        return {n: self.host_tensor(n).detach().clone() for n in self._specs}

    def __repr__(self) -> str:
        label = self.source if self.source is not None else getattr(self.cfg, "model_name", None)
        gguf = self.provenance.get("gguf")
        quantized = (
            ""
            if gguf is None
            else f", de-quantized from a quantized GGUF file ({'/'.join(sorted(gguf.get('tensor_types', {})))})"
        )
        return (
            f"rwasym.Model({str(label)!r}: {self.n_layers} layers, d_model {self.d_model}, "
            f"{len(self._specs)} matrices{quantized})"
        )


def matches_pattern(name: str, pattern: str | Sequence[str]) -> bool:
    """Glob match of a registry name, ``*`` = one dotted segment; a list matches if any entry does."""
    if not isinstance(pattern, str):
        return any(matches_pattern(name, p) for p in pattern)
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$"
    return re.match(regex, name) is not None
