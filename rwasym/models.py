"""The adapter: every piece of architecture knowledge rwasym has lives here.

A studied matrix is always returned in `nn.Linear` layout, W ∈ R^{n_out × n_in} acting as
y = W a, whatever the host stores (GPT-2 `Conv1D` is transposed; fused QKV hosts are read through
the bridge's split q/k/v linears, which are the ones the bridge's forward pass uses; GQA K/V have
`n_key_value_heads` heads).

Registry names use TransformerLens vocabulary: ``blocks.{L}.attn.W_Q|W_K|W_V|W_O`` and
``blocks.{L}.mlp.W_in|W_gate|W_out``. Each matrix is defined by the linear map it feeds: its input
hook is that linear's ``hook_in`` (after the layer norm for Q/K/V/W_in/W_gate) and its output hook
that linear's ``hook_out`` — never a compatibility alias (see TL #1317, #1639).

Hook tensors of attention linears may arrive per-head shaped ``(..., n_heads, d_head)``; use
`flatten_site` to view them as ``(..., n)`` before doing linear algebra.
"""

import contextlib
import copy
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .errors import RwasymError

_ATTN_KINDS = {"W_Q": "q", "W_K": "k", "W_V": "v", "W_O": "o"}
_MLP_KINDS = {"W_in": "in", "W_gate": "gate", "W_out": "out"}
KINDS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")
READ_KINDS = frozenset({"W_Q", "W_K", "W_V", "W_in", "W_gate"})
NATIVE_FORMAT = "rwasym-native/1"
_META_FILE = "rwasym.json"
_WEIGHTS_FILE = "model.safetensors"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class MatrixSpec:
    """One studied matrix: W (n_out × n_in), y = W a.

    side: "read" (input space studied: W_Q/W_K/W_V/W_in/W_gate) or "write" (output space is the
    residual stream: W_O/W_out). n_heads: heads the matrix is split into (n_key_value_heads for
    W_K/W_V under GQA), 0 for MLP matrices. head_axis: "out" when heads index rows (Q/K/V),
    "in" when they index columns (O), None for MLP.
    """

    name: str
    layer: int
    kind: str
    side: str
    n_out: int
    n_in: int
    n_heads: int
    d_head: Optional[int]
    hook_in: str
    hook_out: str
    component: str

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def head_axis(self) -> Optional[str]:
        if self.kind in ("W_Q", "W_K", "W_V"):
            return "out"
        return "in" if self.kind == "W_O" else None

    def to_dict(self) -> dict:
        return asdict(self)


def flatten_site(x: Tensor, n: int) -> Tensor:
    """View a hook tensor as (..., n): merges a trailing (n_heads, d_head) pair when present."""
    if x.shape[-1] == n:
        return x
    if x.dim() >= 2 and x.shape[-1] * x.shape[-2] == n:
        return x.flatten(-2)
    raise RwasymError(f"hook tensor of shape {tuple(x.shape)} cannot be viewed as (..., {n})")


def _is_transposed(module: nn.Module) -> bool:
    # GPT-2 style Conv1D stores weight as (n_in, n_out); nn.Linear as (n_out, n_in).
    return type(module).__name__ == "Conv1D"


def _host_linear(bridge: nn.Module, component: str) -> nn.Module:
    module = bridge.get_submodule(component)
    host = getattr(module, "original_component", None)
    if host is None or not hasattr(host, "weight"):
        raise RwasymError(f"bridge component {component!r} wraps no linear layer with a weight")
    return host


class Model:
    """rwasym's view of one TransformerBridge: the matrix registry and weight read/write.

    Build it with `rwasym.load`. ``model.bridge`` is the TransformerBridge (call it for logits,
    use its hooks); everything architecture-specific is answered here.
    """

    def __init__(self, bridge: nn.Module, source: Any = None, *, detect_fused: bool = True):
        self.bridge = bridge
        self.source = source
        self.cfg = bridge.cfg
        self._specs = {spec.name: spec for spec in self._build_registry()}
        # detect_fused=False: a weightless (meta-device) skeleton, whose values cannot be compared
        self._fused_layouts = self._detect_fused_layouts() if detect_fused else {}
        self.adapter: Optional[dict] = None  # name → rwasym.lora.LowRankDelta when loaded with adapter=
        if not self._specs:
            raise RwasymError(
                f"found no attention or MLP linears in {type(bridge).__name__}; rwasym needs a "
                "TransformerBridge whose blocks expose attn.q/k/v/o and mlp.in/out"
            )

    # -- fused QKV hosts -----------------------------------------------------------------------
    def _detect_fused_layouts(self) -> dict[int, str]:
        """layer → how the host's fused qkv weight stacks q, k, v ("concat" rows [q; k; v] as in
        GPT-2's c_attn, or "interleaved" per head [h, (q, k, v), d_head] as in GPT-NeoX).

        The bridge's forward uses split q/k/v copies; the fused parameter is what
        ``save_pretrained`` writes, so `sync_fused_qkv` must know the layout. It is detected
        once, at load, by exact comparison while the two agree; undetectable layers are omitted.
        """
        layouts = {}
        for layer, block in enumerate(self.bridge.blocks):
            attn = getattr(block, "attn", None)
            if attn is None or "qkv" not in attn._modules or "q" not in attn._modules:
                continue
            fused = _host_linear(self.bridge, f"blocks.{layer}.attn.qkv")
            w = fused.weight.detach()
            w = w.T if _is_transposed(fused) else w
            parts = [_host_linear(self.bridge, f"blocks.{layer}.attn.{x}").weight.detach() for x in "qkv"]
            for layout in ("concat", "interleaved"):
                if w.shape == (sum(p.shape[0] for p in parts), parts[0].shape[1]) and \
                        torch.equal(_fuse(parts, layout, int(self.cfg.n_heads)), w):
                    layouts[layer] = layout
                    break
        return layouts

    @torch.no_grad()
    def sync_fused_qkv(self) -> int:
        """Copy the split q/k/v weights (and biases) the forward pass uses back into the host's
        fused qkv parameter, so ``original_model.save_pretrained`` saves what the bridge computes.

        Returns the number of layers synced; raises when a fused layer's layout is unknown.
        """
        synced = 0
        for layer, block in enumerate(self.bridge.blocks):
            attn = getattr(block, "attn", None)
            if attn is None or "qkv" not in attn._modules:
                continue
            layout = self._fused_layouts.get(layer)
            if layout is None:
                raise RwasymError(
                    f"blocks.{layer}.attn has a fused qkv parameter whose layout rwasym does not know; "
                    "saving it would drop changes to W_Q/W_K/W_V. Add the layout to rwasym.models._fuse"
                )
            fused = _host_linear(self.bridge, f"blocks.{layer}.attn.qkv")
            hosts = [_host_linear(self.bridge, f"blocks.{layer}.attn.{x}") for x in "qkv"]
            w = _fuse([h.weight for h in hosts], layout, int(self.cfg.n_heads))
            fused.weight.copy_(w.T if _is_transposed(fused) else w)
            if getattr(fused, "bias", None) is not None and all(h.bias is not None for h in hosts):
                b = _fuse([h.bias[:, None] for h in hosts], layout, int(self.cfg.n_heads))[:, 0]
                fused.bias.copy_(b)
            synced += 1
        return synced

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Save as a plain Hugging Face folder (config, safetensors, tokenizer when there is one).

        A native model is written as the exactly equivalent ``GPT2LMHeadModel`` (`native_to_gpt2`;
        GPT-2-shaped configs only, else RwasymError), so peft / TRL / transformers can use it.

        The bridge rewires the HF module tree (aliases, split q/k/v copies), so the host's own
        ``save_pretrained`` would write duplicated or stale tensors. This syncs the fused qkv
        parameter from the split copies (`sync_fused_qkv`), maps the bridge's state dict back to
        the HF names, loads it into a fresh instance of the HF class and saves that.
        """
        host = self.bridge.original_model
        if not hasattr(host, "save_pretrained"):  # a native model: exported as an exact GPT-2 when it is one
            folder = Path(folder)
            native_to_gpt2(self).save_pretrained(folder)
            return folder
        self.sync_fused_qkv()
        fresh = type(host)(host.config)
        wanted = fresh.state_dict()
        clean = {}
        for key, value in host.state_dict().items():
            name = _clean_key(key)
            if name in wanted and name not in clean:
                clean[name] = value.detach().clone()
        missing = [k for k in wanted if k not in clean]
        if missing:
            raise RwasymError(f"cannot map the bridge back to {type(host).__name__}: missing {missing[:5]}")
        fresh.load_state_dict(clean, strict=True)
        folder = Path(folder)
        fresh.save_pretrained(folder)
        tokenizer = getattr(self.bridge, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return folder

    def host_module_names(self) -> dict[str, str]:
        """Matrix name → qualified name of the nn.Module holding its weight in the Hugging Face model
        (``bridge.original_model``), e.g. ``model.layers.0.self_attn.q_proj`` — the names PEFT
        adapters use. W_Q/W_K/W_V of a fused layer all map to the fused host (GPT-2 ``c_attn``,
        NeoX ``query_key_value``). Found by identity among the module tree's aliases, keeping the
        name a fresh (meta-device) instance of the HF class has; non-HF hosts keep the first alias.
        """
        host = self.bridge.original_model
        aliases: dict[int, list[str]] = {}
        for qualified, module in host.named_modules(remove_duplicate=False):
            aliases.setdefault(id(module), []).append(_clean_key(qualified))
        hf_names = None
        if hasattr(host, "config") and hasattr(host, "save_pretrained"):
            with torch.device("meta"):
                hf_names = {n for n, _ in type(host)(host.config).named_modules()}
        out = {}
        for spec in self.matrices():
            component = spec.component
            if spec.kind in ("W_Q", "W_K", "W_V") and spec.layer in self._fused_layouts:
                component = f"blocks.{spec.layer}.attn.qkv"
            names = aliases.get(id(_host_linear(self.bridge, component)), [])
            real = [n for n in names if hf_names is None or n in hf_names]
            if real:
                out[spec.name] = real[0]
        return out

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
                for kind, sub in kinds.items():
                    if sub not in getattr(parent, "_modules", {}):
                        continue
                    component = f"blocks.{layer}.{group}.{sub}"
                    host = _host_linear(self.bridge, component)
                    w = host.weight
                    n_out, n_in = (w.shape[1], w.shape[0]) if _is_transposed(host) else w.shape
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

    def matrices(self, pattern: Union[str, Sequence[str], None] = None) -> list[MatrixSpec]:
        """The registry, in layer order.

        ``pattern``: a glob where ``*`` matches one dotted segment (``blocks.*.attn.W_Q``,
        ``blocks.0.*.*``), or a list of globs. A pattern matching nothing returns [].
        """
        specs = list(self._specs.values())
        if pattern is None:
            return specs
        return [s for s in specs if _matches(s.name, pattern)]

    def matrix(self, name: str) -> MatrixSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise RwasymError(
                f"unknown matrix name {name!r}; valid names are: {', '.join(self._specs)}"
            ) from None

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.unembedding_host().weight.shape[0])

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
        twin = {"W_K": "W_Q", "W_V": "W_Q", "W_gate": "W_in"}.get(spec.kind)
        if twin and getattr(self.cfg, "use_split_qkv_input", False) is False:
            group = "attn" if twin == "W_Q" else "mlp"
            return self._specs[f"blocks.{spec.layer}.{group}.{twin}"].hook_in
        return spec.hook_in

    def residual_hooks(self) -> dict[str, str]:
        """``blocks.L.hook_resid_pre|mid|post`` → the bridge hook that carries it.

        resid_mid (between attention and MLP) exists only for sequential blocks.
        """
        out = {}
        parallel = bool(getattr(self.cfg, "parallel_attn_mlp", False))
        for layer, block in enumerate(self.bridge.blocks):
            out[f"blocks.{layer}.hook_resid_pre"] = f"blocks.{layer}.hook_in"
            if not parallel and "ln2" in block._modules and "Parallel" not in type(block).__name__:
                out[f"blocks.{layer}.hook_resid_mid"] = f"blocks.{layer}.ln2.hook_in"
            out[f"blocks.{layer}.hook_resid_post"] = f"blocks.{layer}.hook_out"
        return out

    # -- reading ------------------------------------------------------------------------------
    def host_parameter(self, name: str) -> nn.Parameter:
        """The parameter the forward pass really uses for ``name`` (host layout)."""
        return _host_linear(self.bridge, self.matrix(name).component).weight

    def weight(self, name: str) -> Float[Tensor, "n_out n_in"]:
        """A float64 CPU copy of the matrix in nn.Linear layout (n_out × n_in)."""
        spec = self.matrix(name)
        host = _host_linear(self.bridge, spec.component)
        w = host.weight.detach().to("cpu", torch.float64)
        return (w.T if _is_transposed(host) else w).clone()

    def bias(self, name: str) -> Optional[Float[Tensor, " n_out"]]:
        host = _host_linear(self.bridge, self.matrix(name).component)
        b = getattr(host, "bias", None)
        return None if b is None else b.detach().to("cpu", torch.float64).clone()

    def head_weight(self, name: str, head: int) -> Float[Tensor, "n_out n_in"]:
        """Per-head view: W_Q/K/V[h] = rows h·d_head:(h+1)·d_head (d_head × d_model);
        W_O[h] = columns h·d_head:(h+1)·d_head (d_model × d_head). GQA-aware for K/V."""
        return head_slice(self.matrix(name), self.weight(name), head)

    def unembedding_host(self) -> nn.Module:
        return _host_linear(self.bridge, "unembed")

    def unembedding(self) -> Float[Tensor, "d_model d_vocab"]:
        """Effective unembedding diag(γ_final) · W_U (d_model × vocab), float64.

        The final norm's scale γ is folded in because the logits read the residual stream only
        through it; its bias (if any) shifts logits by a constant per token and is left out.
        Models without a final-norm scale (RMSPre/LNPre) use W_U alone.
        """
        host = self.unembedding_host()
        w_u = host.weight.detach().to("cpu", torch.float64)
        w_u = w_u if _is_transposed(host) else w_u.T  # (d_model, vocab)
        ln = getattr(self.bridge, "ln_final", None)
        gamma = getattr(getattr(ln, "original_component", None), "weight", None)
        if gamma is not None:
            w_u = gamma.detach().to("cpu", torch.float64)[:, None] * w_u
        return w_u

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
        _check_finite(value, f"the new value of {name}")
        host = _host_linear(self.bridge, spec.component)
        new = value.T if _is_transposed(host) else value
        host.weight.copy_(new.to(host.weight.device, host.weight.dtype))

    @contextlib.contextmanager
    def edit(self, updates: Mapping[str, Tensor]) -> Iterator["Model"]:
        """Temporarily set several matrices; restores every host parameter bit-exactly on exit,
        also when the body raises."""
        saved = {name: self.host_parameter(name).detach().clone() for name in updates}
        try:
            for name, value in updates.items():
                self.set_weight(name, value)
            yield self
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self.host_parameter(name).copy_(original)

    @torch.no_grad()
    def self_check(self, tokens: Optional[Tensor] = None, *, rtol: float = 1e-4) -> list[dict]:
        """The adapter's consistency check: for every registry matrix, the tensor at its input
        hook times Wᵀ (+ b) must equal the tensor at its output hook.

        This proves the layout (no silent transpose), the head split and the hook names at once.
        Returns one row per matrix (max relative error); raises RwasymError listing the failures.
        """
        if tokens is None:
            g = torch.Generator().manual_seed(0)
            n_ctx = int(getattr(self.cfg, "n_ctx", 16) or 16)
            tokens = torch.randint(0, self.d_vocab, (2, min(16, n_ctx)), generator=g)
        _, cache = self.bridge.run_with_cache(tokens.to(self.device))
        rows, failures = [], []
        for spec in self.matrices():
            if spec.hook_in not in cache or spec.hook_out not in cache:
                failures.append(f"{spec.name}: hook {spec.hook_in} or {spec.hook_out} never fired")
                continue
            a = flatten_site(cache[spec.hook_in], spec.n_in).double()
            y = flatten_site(cache[spec.hook_out], spec.n_out).double()
            b = self.bias(spec.name)
            pred = a @ self.weight(spec.name).T.to(a.device) + (0 if b is None else b.to(a.device))
            err = float((pred - y).norm() / y.norm().clamp_min(1e-30))
            rows.append(dict(matrix=spec.name, relative_error=err))
            if not err <= rtol:
                failures.append(f"{spec.name}: ‖hook_in·Wᵀ + b − hook_out‖/‖hook_out‖ = {err:.2e}")
        if failures:
            raise RwasymError(
                "adapter consistency check failed (wrong layout, head split or hook names):\n  "
                + "\n  ".join(failures)
            )
        return rows

    def state_fingerprint(self) -> dict[str, Tensor]:
        """Host-layout copies of every studied matrix (for bit-exact restore checks)."""
        return {n: self.host_parameter(n).detach().clone() for n in self._specs}

    def __repr__(self) -> str:
        label = self.source if self.source is not None else getattr(self.cfg, "model_name", None)
        return (
            f"rwasym.Model({str(label)!r}: {self.n_layers} layers, d_model {self.d_model}, "
            f"{len(self._specs)} matrices)"
        )


def head_slice(spec: MatrixSpec, w: Tensor, head: int) -> Tensor:
    """Slice head ``head`` out of a full matrix ``w`` laid out like ``spec``."""
    if spec.head_axis is None:
        raise RwasymError(f"{spec.name} is an MLP matrix and has no heads; pass head=None")
    if not 0 <= head < spec.n_heads:
        raise RwasymError(f"head {head} is out of range for {spec.name}: it has {spec.n_heads} heads")
    d = spec.d_head
    return w[head * d : (head + 1) * d] if spec.head_axis == "out" else w[:, head * d : (head + 1) * d]


def _fuse(parts: list[Tensor], layout: str, n_heads: int) -> Tensor:
    """Stack q, k, v (nn.Linear layout, rows = outputs) the way a fused host stores them."""
    if layout == "concat":
        return torch.cat(parts, dim=0)
    # interleaved: rows grouped per head as [h, (q, k, v), d_head]
    heads = [p.reshape(n_heads, -1, p.shape[-1]) for p in parts]  # (h, d_head, n_in) each
    return torch.stack(heads, dim=1).reshape(-1, parts[0].shape[-1])


def _matches(name: str, pattern: Union[str, list, tuple]) -> bool:
    if isinstance(pattern, (list, tuple)):
        return any(_matches(name, p) for p in pattern)
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$"
    return re.match(regex, name) is not None


def _check_finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise RwasymError(f"{what} contains NaN or Inf; check the checkpoint or the computation")


def weight_deltas(base: Model, tuned: Model, pattern: Union[str, Sequence[str], None] = None) -> dict[str, Any]:
    """ΔW = W_tuned − W_base (float64, nn.Linear layout) for every studied matrix.

    Raises RwasymError naming the first matrix whose name or shape differs. When ``tuned`` was
    loaded with a LoRA adapter (``load(base, adapter=...)``) and ``base`` was not, returns the
    attached factored deltas (`rwasym.lora.LowRankDelta`, rank 0 for untouched matrices) without
    materialising them, after checking ``base`` is the adapter's base (`rwasym.lora.adapter_deltas`).
    """
    check_same_architecture(base, tuned)
    if tuned.adapter is not None and base.adapter is None:
        from .lora import adapter_deltas

        return adapter_deltas(base, tuned, pattern)
    out = {}
    for spec in base.matrices(pattern):
        delta = tuned.weight(spec.name) - base.weight(spec.name)
        _check_finite(delta, f"ΔW of {spec.name}")
        out[spec.name] = delta
    return out


def check_same_architecture(base: Model, tuned: Model) -> None:
    a, b = base.matrices(), tuned.matrices()
    for sa, sb in zip(a, b):
        if sa.name != sb.name or sa.shape != sb.shape or sa.n_heads != sb.n_heads:
            raise RwasymError(
                f"base and tuned models differ at {sa.name}: base has {sa.name} {sa.shape} with "
                f"{sa.n_heads} heads, tuned has {sb.name} {sb.shape} with {sb.n_heads} heads; "
                "compare two checkpoints of one architecture"
            )
    if len(a) != len(b):
        longer, which = (a, "base") if len(a) > len(b) else (b, "tuned")
        first = longer[min(len(a), len(b))].name
        raise RwasymError(
            f"base has {len(a)} studied matrices and tuned has {len(b)}; the first unmatched one "
            f"is {first} (only in {which}); compare two checkpoints of one architecture"
        )
    if base.d_vocab != tuned.d_vocab:
        raise RwasymError(
            f"vocabulary sizes differ: base {base.d_vocab}, tuned {tuned.d_vocab}; compare two "
            "checkpoints of one architecture"
        )


_ACTS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


# -- native <-> Hugging Face GPT-2 (exact conversion of GPT-2-shaped native models) -------------
def _check_gpt2_shaped(cfg: Any) -> None:
    """Raise unless the native config is exactly representable as Hugging Face GPT-2."""
    problems = []
    if str(cfg.normalization_type).upper() != "LN" or getattr(cfg, "final_rms", False):
        problems.append(f"normalization_type={cfg.normalization_type!r} (needs 'LN')")
    if (getattr(cfg, "positional_embedding_type", None) or "standard") != "standard":
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r} (needs 'standard')")
    if getattr(cfg, "attn_only", False) or getattr(cfg, "gated_mlp", False):
        problems.append("attn_only / gated_mlp")
    if (cfg.act_fn or "gelu").lower() not in _ACTS:
        problems.append(f"act_fn={cfg.act_fn!r}")
    if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads) or cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append("grouped-query attention or n_heads·d_head != d_model")
    if getattr(cfg, "use_attn_scale", True) is False or float(getattr(cfg, "attn_scale", -1.0)) > 0:
        problems.append("a non-default attention scale")
    if max(float(getattr(cfg, "attn_scores_soft_cap", -1.0)), float(getattr(cfg, "output_logits_soft_cap", -1.0))) > 0:
        problems.append("logit soft-capping")
    if getattr(cfg, "d_vocab_out", -1) not in (-1, cfg.d_vocab) or getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append("d_vocab_out != d_vocab or non-causal attention")
    if problems:
        raise RwasymError("this native model cannot be converted to Hugging Face GPT-2, which cannot express "
                          f"{'; '.join(problems)}; keep it native (rwasym.save_model) and, for alignment, use the "
                          "built-in backend (rwasym.align, --backend builtin).")


def native_to_gpt2(model: Model) -> Any:
    """An exact ``GPT2LMHeadModel`` copy of a GPT-2-shaped native model (untied head, no dropout).

    Conv1D weights are stored (n_in, n_out), so every nn.Linear weight is transposed; ``c_attn``
    stacks [W_Q; W_K; W_V] along the output axis.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    _check_gpt2_shaped(cfg)
    state = {_clean_key(k): v.detach() for k, v in model.bridge.original_model.state_dict().items()}
    if "head.bias" in state and bool(state["head.bias"].any()):
        raise RwasymError("the native unembedding has a non-zero bias, which GPT-2's lm_head lacks; use the "
                          "built-in backend.")
    d_mlp = int(cfg.d_mlp or 4 * cfg.d_model)
    hf_cfg = GPT2Config(vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, n_inner=d_mlp, activation_function=_ACTS[(cfg.act_fn or "gelu").lower()],
                        layer_norm_epsilon=float(cfg.eps), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf_cfg._attn_implementation = "eager"
    gpt2 = {"transformer.wte.weight": state["tok_embed.weight"], "transformer.wpe.weight": state["pos.weight"],
            "transformer.ln_f.weight": state["ln_out.weight"], "transformer.ln_f.bias": state["ln_out.bias"],
            "lm_head.weight": state["head.weight"]}
    for i in range(cfg.n_layers):
        h, L = f"transformer.h.{i}", f"layers.{i}"
        for a, b in (("ln_1", "ln1"), ("ln_2", "ln2")):
            gpt2[f"{h}.{a}.weight"], gpt2[f"{h}.{a}.bias"] = state[f"{L}.{b}.weight"], state[f"{L}.{b}.bias"]
        qkv = torch.cat([state[f"{L}.attn.{x}.weight"] for x in "qkv"])  # (3·d_model, d_model)
        gpt2[f"{h}.attn.c_attn.weight"] = qkv.T
        gpt2[f"{h}.attn.c_attn.bias"] = torch.cat([state[f"{L}.attn.{x}.bias"] for x in "qkv"])
        for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            gpt2[f"{h}.{a}.weight"], gpt2[f"{h}.{a}.bias"] = state[f"{L}.{b}.weight"].T, state[f"{L}.{b}.bias"]
    hf = GPT2LMHeadModel(hf_cfg)
    hf.load_state_dict({k: v.clone().contiguous() for k, v in gpt2.items()}, strict=True)
    if hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr():
        raise RwasymError("transformers tied GPT-2's lm_head to its embedding; cannot represent the native head.")
    return hf.eval()


def gpt2_to_native_state(hf: Any, n_layers: int) -> dict[str, Tensor]:
    """The native state dict (clean names, as `rwasym.save_model` writes them) of a GPT-2 made by
    `native_to_gpt2` (the inverse mapping)."""
    s = {k: v.detach() for k, v in hf.state_dict().items()}
    out = {"tok_embed.weight": s["transformer.wte.weight"], "pos.weight": s["transformer.wpe.weight"],
           "ln_out.weight": s["transformer.ln_f.weight"], "ln_out.bias": s["transformer.ln_f.bias"],
           "head.weight": s["lm_head.weight"]}
    for i in range(n_layers):
        h, L = f"transformer.h.{i}", f"layers.{i}"
        for a, b in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{L}.{b}.weight"], out[f"{L}.{b}.bias"] = s[f"{h}.{a}.weight"], s[f"{h}.{a}.bias"]
        for x, w, bias in zip("qkv", s[f"{h}.attn.c_attn.weight"].T.chunk(3), s[f"{h}.attn.c_attn.bias"].chunk(3)):
            out[f"{L}.attn.{x}.weight"], out[f"{L}.attn.{x}.bias"] = w, bias
        for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            out[f"{L}.{b}.weight"], out[f"{L}.{b}.bias"] = s[f"{h}.{a}.weight"].T, s[f"{h}.{a}.bias"]
    return out


# -- loading and saving ---------------------------------------------------------------------------
def _bridge_classes():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    import transformer_lens.model_bridge.sources.native  # noqa: F401  registers boot_native
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  boot_transformers

    return TransformerBridge, TransformerBridgeConfig


def _check_dtype(dtype: Optional[torch.dtype]) -> None:
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        raise RwasymError(
            f"unsupported dtype {dtype}; use one of {', '.join(map(str, _SUPPORTED_DTYPES))}"
        )


def load(
    source: Any,
    *,
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    tokenizer: Any = None,
    adapter: Any = None,
    **boot_kwargs: Any,
) -> Model:
    """Load a model as an rwasym `Model`.

    adapter: a PEFT LoRA adapter folder (or `rwasym.lora.read_adapter`'s result): returns a fresh
    load of the base (a `Model` loaded from a folder is reloaded from it in its dtype; an in-memory
    one is deep-copied) with ΔW = scale · B A merged into its weights and the factored deltas in
    ``model.adapter`` (`rwasym.lora`); the base passed in is left untouched.

    source: a `Model` (returned as is); a `TransformerBridge`; a `TransformerBridgeConfig` or dict
    (a native tiny model, `TransformerBridge.boot_native`); a folder written by `save_model`; or
    a Hugging Face hub name / local folder (`TransformerBridge.boot_transformers`, extra keyword
    arguments such as ``device_map="auto"`` are passed through). Raw weights, no folding.
    """
    _check_dtype(dtype)
    if adapter is not None:
        from .lora import merge_adapter

        if isinstance(source, Model) and isinstance(source.source, (str, os.PathLike)):  # reload: base stays base
            dtype, device, source = dtype or source.dtype, str(source.device), source.source
        elif isinstance(source, (Model, _bridge_classes()[0])):
            try:
                source = copy.deepcopy(source.bridge if isinstance(source, Model) else source)
            except RuntimeError as err:  # e.g. tensors cached by a forward pass with autograd on
                raise RwasymError(f"cannot copy the in-memory base to apply the adapter to ({err}); save it "
                                  "(rwasym.save_model / Model.save_pretrained) and pass the folder") from None
            if dtype is not None:
                source.original_model.to(dtype=dtype)
        return merge_adapter(load(source, dtype=dtype, device=device, tokenizer=tokenizer, **boot_kwargs), adapter)
    if isinstance(source, Model):
        return source
    TransformerBridge, TransformerBridgeConfig = _bridge_classes()
    if isinstance(source, TransformerBridge):
        bridge = source
    elif isinstance(source, (TransformerBridgeConfig, dict)):
        bridge = TransformerBridge.boot_native(source, tokenizer=tokenizer, device=device, dtype=dtype)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists() and (path.is_absolute() or str(source).startswith((".", "~"))):
            raise RwasymError(
                f"no such folder {str(source)!r}; pass an existing checkpoint folder or a hub name"
            )
        if (path / _META_FILE).exists():
            return load_native(path, dtype=dtype, device=device)
        if path.exists() and path.is_dir() and not (path / "config.json").exists():
            raise RwasymError(
                f"folder {str(path)!r} holds neither an rwasym checkpoint ({_META_FILE}) nor a "
                "Hugging Face model (config.json); point at a folder written by save_model, "
                "save_pretrained, or a hub name"
            )
        kwargs = dict(boot_kwargs)
        if "device_map" not in kwargs:
            kwargs["device"] = device
        bridge = TransformerBridge.boot_transformers(
            str(source), dtype=dtype or torch.float32, tokenizer=tokenizer, **kwargs
        )
    else:
        raise RwasymError(
            f"cannot load a model from a {type(source).__name__}; pass a hub name or folder, a "
            "TransformerBridge, a TransformerBridgeConfig/dict, or an rwasym.Model"
        )
    bridge.eval()  # dropout off: every rwasym measurement is deterministic
    return Model(bridge, source=source if isinstance(source, (str, os.PathLike)) else None)


def native_config(**overrides: Any) -> Any:
    """A `TransformerBridgeConfig` for a small native model (LN, GELU, learned positions)."""
    _, TransformerBridgeConfig = _bridge_classes()
    fields = dict(
        d_model=128, d_head=32, n_heads=4, n_layers=2, n_ctx=64, d_vocab=512,
        act_fn="gelu", normalization_type="LN", seed=0,
    )
    fields.update(overrides)
    return TransformerBridgeConfig(**fields)


def _jsonable_config(cfg: Any) -> dict:
    out = {}
    for key, value in cfg.to_dict().items():
        if key == "device":
            continue
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif hasattr(value, "item") and not isinstance(value, torch.Tensor):
            value = value.item()  # numpy scalars
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def _clean_key(key: str) -> str:
    return key.replace("._original_component", "")


def save_model(model: Union[Model, nn.Module], folder: Union[str, os.PathLike], meta: Optional[dict] = None) -> Path:
    """Save a native model as ``rwasym.json`` (config + meta) and ``model.safetensors``.

    Loading the folder back with `rwasym.load(folder)` gives identical logits.
    """
    from safetensors.torch import save_file

    model = model if isinstance(model, Model) else Model(model)
    if getattr(model.cfg, "architecture", None) not in (None, "TransformerLensNative"):
        raise RwasymError(
            f"save_model writes native models only; this is a {model.cfg.architecture} bridge: "
            "save Hugging Face models with bridge.original_model.save_pretrained(folder)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, seen = {}, set()
    for key, value in model.bridge.original_model.state_dict().items():
        if value.data_ptr() in seen:  # the bridge aliases some modules under two names
            continue
        seen.add(value.data_ptr())
        state[_clean_key(key)] = value.detach().cpu().contiguous()
    save_file(state, str(folder / _WEIGHTS_FILE))
    record = {"format": NATIVE_FORMAT, "config": _jsonable_config(model.cfg), "meta": meta or {}}
    (folder / _META_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return folder


def read_meta(folder: Union[str, os.PathLike]) -> dict:
    """The ``rwasym.json`` record of a saved native model (format, config, meta)."""
    path = Path(folder) / _META_FILE
    if not path.exists():
        raise RwasymError(f"{str(path)!r} does not exist; is {str(folder)!r} an rwasym checkpoint folder?")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RwasymError(f"{str(path)!r} is corrupt ({err}); re-save the checkpoint") from None
    if record.get("format") != NATIVE_FORMAT:
        raise RwasymError(f"{str(path)!r} has format {record.get('format')!r}, expected {NATIVE_FORMAT!r}")
    return record


def load_native(folder: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device: str = "cpu") -> Model:
    """Load a folder written by `save_model` (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    TransformerBridge, TransformerBridgeConfig = _bridge_classes()
    folder = Path(folder)
    record = read_meta(folder)
    cfg_dict = dict(record["config"])
    if isinstance(cfg_dict.get("dtype"), str):
        cfg_dict["dtype"] = getattr(torch, cfg_dict["dtype"])
    cfg_dict["init_weights"] = False  # weights come from the file
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig.from_dict(cfg_dict), device=device)
    weights = folder / _WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise RwasymError(f"cannot read {str(weights)!r} ({err}); the checkpoint folder is incomplete or corrupt") from None
    loaded = set()
    with torch.no_grad():
        for key, param in bridge.original_model.state_dict().items():
            clean = _clean_key(key)
            if clean in state:
                param.copy_(state[clean])
                loaded.add(param.data_ptr())
            elif param.data_ptr() not in loaded:
                raise RwasymError(
                    f"{str(weights)!r} lacks tensor {clean!r}; the checkpoint does not match its {_META_FILE}"
                )
    if dtype is not None:
        bridge.original_model.to(dtype=dtype)
    bridge.eval()
    model = Model(bridge, source=str(folder))
    model.meta = record.get("meta", {})
    return model
