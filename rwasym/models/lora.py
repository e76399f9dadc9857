"""PEFT LoRA adapters as the tuned side: ΔW kept in factored form, ΔW = scale · B A.

A LoRA adapter stores, for each targeted linear, A ∈ R^{r × n_in} (``lora_A.weight``) and
B ∈ R^{n_out × r} (``lora_B.weight``), and adds ΔW = scale · B A to the base weight, with
scale = lora_alpha / r, or lora_alpha / √r under rsLoRA (``use_rslora``); ``rank_pattern`` /
``alpha_pattern`` override r and alpha per module (matched like peft's ``get_pattern_key``).
A and B are always in `nn.Linear` layout (y = W a), whatever the host stores: with
``fan_in_fan_out`` (GPT-2 Conv1D) peft only transposes B A when it merges into the stored weight.

Fused QKV hosts (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) carry one adapter for q, k and v:
A is shared and B's rows are stacked like the host's fused weight; `lora_deltas` takes W_Q, W_K and
W_V's rows of B (`rwasym.models.host.HostLayout.rows`), so each gets its own `LowRankDelta`; a
fused gate-up host (Phi-3 ``gate_up_proj``) is split into W_gate and W_in the same way.

The factored type itself, and why nothing downstream forms the n_out × n_in matrix, is
`rwasym.math.lowrank.LowRankDelta`. Matrices an adapter leaves alone get a rank-0 `LowRankDelta`
(B is n_out × 0, A is 0 × n_in): ‖ΔW‖_F = 0, so one type covers every matrix.
"""

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import RwasymError
from ..math.lowrank import LowRankDelta
from .registry import MatrixSpec, Model

__all__ = ["LoraAdapter", "adapter_deltas", "lora_deltas", "merge_adapter", "read_adapter"]

_CONFIG_FILE = "adapter_config.json"
_SAFETENSORS_FILE = "adapter_model.safetensors"
_BIN_FILE = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = {  # config option → why merging B A into the weight would not reproduce the adapter
    "use_dora": "DoRA (use_dora) rescales each output column by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "target_parameters": "target_parameters adapts raw nn.Parameters (e.g. MoE experts), not linears",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "layer_replication changes the model's layer structure",
}
_MERGE_FIX = (
    "merge it into the base with peft (PeftModel.from_pretrained(base_hf, folder)"
    ".merge_and_unload().save_pretrained(merged)) and compare base with the merged folder as an "
    "ordinary tuned checkpoint"
)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A PEFT LoRA adapter as read from disk.

    modules: module name inside the base Hugging Face model (peft's ``base_model.model.`` prefix
    removed, e.g. ``model.layers.0.self_attn.q_proj``) → its ΔW = scale · B A in nn.Linear layout of
    the whole host (all fused rows for a fused QKV host). config: the adapter_config.json dict.
    """

    folder: Path
    config: dict
    modules: dict[str, LowRankDelta]

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_weights(folder: Path) -> dict[str, Tensor]:
    safetensors_path, bin_path = folder / _SAFETENSORS_FILE, folder / _BIN_FILE
    if safetensors_path.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path))
        except (SafetensorError, OSError) as err:
            raise RwasymError(
                f"cannot read {str(safetensors_path)!r} ({err}); re-save the adapter with PeftModel.save_pretrained"
            ) from None
    if bin_path.exists():
        try:
            return torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe pickles
            raise RwasymError(
                f"cannot read {str(bin_path)!r} with torch.load(weights_only=True) ({err}); "
                "re-save the adapter with PeftModel.save_pretrained(safe_serialization=True)"
            ) from None
    raise RwasymError(
        f"adapter folder {str(folder)!r} has no {_SAFETENSORS_FILE} (or {_BIN_FILE}); point at the "
        "folder written by PeftModel.save_pretrained"
    )


def read_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
    (a legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``; nothing else is
    unpickled). Returns the per-module factored deltas with their scale (see the module docstring).

    Raises RwasymError for a missing folder or config, a non-LoRA ``peft_type``, options whose
    merge is not B A (DoRA, lora_bias, ...) and weights other than lora_A / lora_B (biases,
    ``modules_to_save``, embedding adapters) — the message says how to merge such an adapter
    with peft and compare the merged checkpoint instead.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RwasymError(
            f"no such adapter folder {str(folder)!r}; pass the folder written by "
            f"PeftModel.save_pretrained (it holds {_CONFIG_FILE} and {_SAFETENSORS_FILE})"
        )
    config_path = folder / _CONFIG_FILE
    if not config_path.exists():
        raise RwasymError(
            f"{str(folder)!r} has no {_CONFIG_FILE}, so it is not a PEFT adapter folder; pass the "
            "folder written by PeftModel.save_pretrained, or pass a full checkpoint as tuned instead"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise RwasymError(f"{str(config_path)!r} is not valid JSON ({err}); re-save the adapter") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise RwasymError(
            f"{str(folder)!r} is a {config.get('peft_type')!r} adapter, but rwasym reads LoRA adapters "
            f"(peft_type 'LORA') only; {_MERGE_FIX}"
        )
    for option, why in _UNSUPPORTED.items():
        if config.get(option):
            raise RwasymError(
                f"{str(folder)!r} sets {option}={config[option]!r}, which rwasym does not support: "
                f"{why}, so ΔW is not scale · B A; {_MERGE_FIX}"
            )
    weights = _read_weights(folder)
    factors: dict[str, dict[str, Tensor]] = {}
    other = []
    for key, value in weights.items():
        match = _KEY.match(key)
        if match is None:
            other.append(key)
            continue
        factors.setdefault(match["module"], {})[match["which"]] = value
    if other:
        raise RwasymError(
            f"{str(folder)!r} stores weights besides lora_A / lora_B: {sorted(other)[:5]} "
            f"({len(other)} in all: trained biases, modules_to_save or embedding adapters), which "
            f"change the model outside scale · B A; {_MERGE_FIX}"
        )
    if not factors:
        raise RwasymError(f"{str(folder)!r} holds no lora_A / lora_B weights; is it an empty or foreign adapter?")
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            raise RwasymError(
                f"adapter module {module!r} has lora_{''.join(pair)} but not both lora_A and lora_B; "
                "the adapter file is incomplete, re-save it"
            )
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise RwasymError(
                f"adapter module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "rwasym reads linear LoRA (A: r × n_in, B: n_out × r) only (not conv or embedding "
                f"adapters); {_MERGE_FIX}"
            )
        r = int(a.shape[0])
        r_cfg = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", r)))
        if r_cfg != r:
            raise RwasymError(
                f"adapter module {module!r} has rank {r} in the weights but r = {r_cfg} in "
                f"{_CONFIG_FILE} (r / rank_pattern); the config does not belong to these weights"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module] = LowRankDelta(b, a, scale)
    return LoraAdapter(folder=folder, config=config, modules=modules)


def lora_deltas(base: Model, adapter: LoraAdapter | str | os.PathLike) -> dict[str, LowRankDelta]:
    """Every studied matrix of ``base`` → its factored ΔW under ``adapter`` (a folder or `read_adapter`).

    Adapter modules are matched to matrices by the host module's name in the Hugging Face model
    (`Model.host_module_names`); a fused QKV host's B is split into W_Q/W_K/W_V rows, a fused gate-up
    host's (Phi-3) into W_gate/W_in rows (`Model.host_layout`, `rwasym.models.host`). Matrices the
    adapter does not touch get a rank-0 `LowRankDelta`. Raises
    RwasymError when an adapter module matches no studied matrix (listing the valid module names)
    or its shape differs from the base's (a different base).
    """
    if not isinstance(adapter, LoraAdapter):
        adapter = read_adapter(adapter)
    hosts = base.host_module_names()
    by_host: dict[str, list[MatrixSpec]] = {}
    for name, host in hosts.items():
        by_host.setdefault(host, []).append(base.matrix(name))
    unmatched = [m for m in adapter.modules if m not in by_host]
    if unmatched:
        raise RwasymError(
            f"adapter modules {unmatched[:5]} ({len(unmatched)} in all) match no studied matrix of the base "
            f"{base!r}; rwasym reads adapters on attention and MLP linears, whose module names in this base are: "
            f"{', '.join(sorted(by_host))}. Check that the adapter belongs to this base, or merge other adapters "
            "with peft and compare the merged checkpoint"
        )
    out = {spec.name: LowRankDelta.zeros(*spec.shape) for spec in base.matrices()}
    for module, delta in adapter.modules.items():
        specs = by_host[module]
        fused = len(specs) > 1
        expect = (sum(s.n_out for s in specs), specs[0].n_in)
        if delta.shape != expect:
            raise RwasymError(
                f"adapter module {module!r} has ΔW of shape (n_out, n_in) = {delta.shape} but the base's "
                f"{'/'.join(s.name for s in specs)} {'stack to' if fused else 'is'} {expect}; the adapter was trained "
                f"on a different base (it names {adapter.base_model_name_or_path!r}): load that base"
            )
        layouts = [base.host_layout(spec.name) for spec in specs]
        if fused and any(layout.rows is None for layout in layouts):
            raise RwasymError(
                f"{module!r} is a fused host whose row layout rwasym could not read off the bridge's "
                f"split, so the adapter's B cannot be split into {'/'.join(s.name for s in specs)}"
            )
        for spec, layout in zip(specs, layouts):  # a fused host's B is split into each matrix's rows
            out[spec.name] = delta if layout.rows is None else delta.rows(layout.rows)
    return out


def merge_adapter(model: Model, adapter: LoraAdapter | str | os.PathLike) -> Model:
    """Add every ΔW of ``adapter`` into ``model``'s host weights in place (W ← W + scale · B A, rounded
    once to the model dtype), sync fused qkv parameters, and attach ``model.adapter`` (the
    factored deltas of `lora_deltas`). `rwasym.load(base, adapter=folder)` calls this on a fresh base."""
    if getattr(model, "adapter", None) is not None:
        raise RwasymError(
            f"{model!r} already carries an adapter; load a fresh base with rwasym.load(base, "
            "adapter=...) for each adapter"
        )
    deltas = lora_deltas(model, adapter)
    changed = [name for name, d in deltas.items() if d.rank]
    for name in changed:
        model.set_weight(name, model.weight(name) + deltas[name].materialize())
    if any(model.host_layout(n).fused == "qkv" for n in changed):
        model.sync_fused_qkv()
    model.adapter = deltas
    return model


def _rounding_bound(base: Model, tuned: Model, n_in: int) -> float:
    """Relative bound on ‖W_t x − W_b x − ΔW x‖ / (‖|W_t||x|‖ + ‖|W_b||x|‖) from rounding alone:
    one rounding of W_b + ΔW to the model dtype (eps), and float64 matvecs (n_in · eps64)."""
    eps = max(torch.finfo(base.dtype).eps, torch.finfo(tuned.dtype).eps)
    return 4.0 * (eps + n_in * torch.finfo(torch.float64).eps)


def adapter_deltas(base: Model, tuned: Model, pattern: str | Sequence[str] | None = None) -> dict[str, LowRankDelta]:
    """The factored deltas attached to ``tuned`` (loaded with an adapter), after checking that
    ``base`` is the adapter's base: for a seeded Gaussian x per matrix,
    ‖W_t x − W_b x − ΔW x‖ must stay within the rounding bound of `_rounding_bound`. O(n_out n_in)
    per matrix for the check, nothing materialised. `weight_deltas` calls this."""
    adapter = tuned.adapter
    if adapter is None:
        raise RwasymError(
            "adapter_deltas needs a tuned model loaded with an adapter (rwasym.load(base, adapter=...)); this "
            "one has none: compare the two models with rwasym.weight_deltas(base, tuned)"
        )
    generator = torch.Generator().manual_seed(0)
    out = {}
    for spec in base.matrices(pattern):
        delta = adapter[spec.name]
        x = torch.randn(spec.n_in, dtype=torch.float64, generator=generator)
        w_t, w_b = tuned.weight(spec.name), base.weight(spec.name)
        err = float((w_t @ x - w_b @ x - delta.matvec(x)).norm())
        scale = float((w_t.abs() @ x.abs()).norm() + (w_b.abs() @ x.abs()).norm())
        if not err <= _rounding_bound(base, tuned, spec.n_in) * scale:
            raise RwasymError(
                f"base is not the base the adapter was loaded on: at {spec.name}, ‖W_tuned x − W_base x − ΔW x‖ = "
                f"{err:.3g} for a random x, beyond rounding ({_rounding_bound(base, tuned, spec.n_in) * scale:.3g}). "
                "Pass the same base as in rwasym.load(base, adapter=...) (and do not edit either model), or "
                "compare two full checkpoints"
            )
        out[spec.name] = delta
    return out
