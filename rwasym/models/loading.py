"""Loading and saving models: hub names, Hugging Face folders, rwasym native checkpoints.

`load` turns anything a user points at into an rwasym `Model` (raw weights, no folding: weight
processing would mix norm changes into ΔW); `load_pair` builds a command's (base, tuned) pair;
`save_model` / `load_native` write and read native models (``rwasym.json`` + safetensors; nothing
is unpickled).
"""

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RwasymError
from . import gguf
from .host import clean_key
from .registry import Model

__all__ = ["load", "load_native", "load_pair", "native_config", "read_meta", "save_model"]

NATIVE_FORMAT = "rwasym-native/1"
META_FILE = "rwasym.json"
_WEIGHTS_FILE = "model.safetensors"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bridge_classes():
    """(TransformerBridge, TransformerBridgeConfig), with the native and transformers sources registered."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  registers boot_native
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401  boot_transformers
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge, TransformerBridgeConfig


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in _SUPPORTED_DTYPES:
        raise RwasymError(f"unsupported dtype {dtype}; use one of {', '.join(map(str, _SUPPORTED_DTYPES))}")


def load(
    source: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tokenizer: Any = None,
    adapter: Any = None,
    **boot_kwargs: Any,
) -> Model:
    """Load a model as an rwasym `Model`.

    adapter: a PEFT LoRA adapter folder (or `rwasym.models.lora.read_adapter`'s result): returns a fresh
    load of the base (a `Model` loaded from a folder is reloaded from it in its dtype; an in-memory
    one is deep-copied) with ΔW = scale · B A merged into its weights and the factored deltas in
    ``model.adapter`` (`rwasym.models.lora`); the base passed in is left untouched.

    source: a `Model` (returned as is); a `TransformerBridge`; a `TransformerBridgeConfig` or dict
    (a native tiny model, `TransformerBridge.boot_native`); a folder written by `save_model`; a
    ``.gguf`` file (de-quantized once into a cached Hugging Face folder, `rwasym.models.gguf`; the
    model's ``provenance["gguf"]`` records the quantized source); or a Hugging Face hub name /
    local folder (`TransformerBridge.boot_transformers`, extra keyword arguments such as
    ``device_map="auto"`` are passed through). ``NAME@REVISION`` (e.g.
    ``EleutherAI/pythia-160m@step1000``) loads that hub revision (branch, tag or commit; the
    checkpoint series of Pythia / OLMo) and records it in ``provenance["revision"]``; a local path
    containing "@" stays a path. Raw weights, no folding.
    """
    _check_dtype(dtype)
    if adapter is not None:
        from .lora import merge_adapter

        if isinstance(source, Model) and isinstance(source.source, (str, os.PathLike)):  # reload: base stays base
            dtype, device, source = dtype or source.dtype, str(source.device), source.source
        elif isinstance(source, (Model, bridge_classes()[0])):
            try:
                source = copy.deepcopy(source.bridge if isinstance(source, Model) else source)
            except RuntimeError as err:  # e.g. tensors cached by a forward pass with autograd on
                raise RwasymError(
                    f"cannot copy the in-memory base to apply the adapter to ({err}); save it "
                    "(rwasym.save_model / Model.save_pretrained) and pass the folder"
                ) from None
            if dtype is not None:
                source.original_model.to(dtype=dtype)
        return merge_adapter(load(source, dtype=dtype, device=device, tokenizer=tokenizer, **boot_kwargs), adapter)
    if isinstance(source, Model):
        return source
    TransformerBridge, TransformerBridgeConfig = bridge_classes()
    if isinstance(source, TransformerBridge):
        bridge = source
    elif isinstance(source, (TransformerBridgeConfig, dict)):
        # boot_native is attached by setattr in transformer_lens.model_bridge.sources.native (undeclared on the class)
        bridge = TransformerBridge.boot_native(  # pyright: ignore[reportAttributeAccessIssue]
            source, tokenizer=tokenizer, device=device, dtype=dtype
        )
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if gguf.is_gguf(path):
            folder = gguf.dequantize(path)
            model = load(folder, dtype=dtype, device=device, tokenizer=tokenizer, **boot_kwargs)
            model.source = str(source)  # the cache is keyed by content: name the file actually given
            model.provenance["gguf"] = {**model.provenance["gguf"], "source": str(path.resolve())}
            return model
        if not path.exists() and (path.is_absolute() or str(source).startswith((".", "~"))):
            raise RwasymError(f"no such folder {str(source)!r}; pass an existing checkpoint folder or a hub name")
        if (path / META_FILE).exists():
            return load_native(path, dtype=dtype, device=device)
        if path.exists() and path.is_dir() and not (path / "config.json").exists():
            raise RwasymError(
                f"folder {str(path)!r} holds neither an rwasym checkpoint ({META_FILE}) nor a "
                "Hugging Face model (config.json); point at a folder written by save_model, "
                "save_pretrained, or a hub name"
            )
        if path.is_dir():
            _check_config(path / "config.json")
        kwargs = dict(boot_kwargs)
        if "device_map" not in kwargs:
            kwargs["device"] = device
        name, revision = split_revision(source)
        if revision is not None:
            kwargs["revision"] = revision
        try:
            bridge = TransformerBridge.boot_transformers(
                name, dtype=dtype or torch.float32, tokenizer=tokenizer, **kwargs
            )
        except OSError as err:  # not on the hub / not in the offline cache / no such revision
            raise RwasymError(
                f"cannot load {str(source)!r} ({err}); pass an existing folder, a hub name (NAME or "
                "NAME@REVISION) that is downloaded or reachable, or a .gguf file"
            ) from None
        except ValueError as err:  # transformers: an unknown model_type, an architecture it cannot build
            if isinstance(err, RwasymError):
                raise
            raise RwasymError(
                f"cannot build a model from {str(source)!r} ({err}); fix its config.json (model_type and "
                "architectures must name a transformers architecture that TransformerLens supports)"
            ) from None
    else:
        raise RwasymError(
            f"cannot load a model from a {type(source).__name__}; pass a hub name or folder, a "
            "TransformerBridge, a TransformerBridgeConfig/dict, or an rwasym.Model"
        )
    bridge.eval()  # dropout off: every rwasym measurement is deterministic
    model = Model(bridge, source=source if isinstance(source, (str, os.PathLike)) else None)
    if isinstance(source, (str, os.PathLike)):  # a folder de-quantized from GGUF; a hub revision
        found = dict(gguf=gguf.provenance(Path(source).expanduser()), revision=split_revision(source)[1])
        if tokenizer is None and getattr(bridge, "tokenizer", None) is not None:
            model.tokenizer_source = split_revision(source)
        model.provenance.update({k: v for k, v in found.items() if v is not None})
    return model


def _check_config(path: Path) -> None:
    """A checkpoint folder's config.json is a JSON object naming its ``model_type`` (transformers' own error for
    either is a bare ValueError deep in AutoConfig)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RwasymError(f"cannot read {str(path)!r} ({err}); fix the JSON or re-save the model") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise RwasymError(
            f'{str(path)!r} names no model_type; add the architecture\'s model_type (e.g. "llama", "gpt2") '
            "to config.json, or re-save the model with save_pretrained"
        )


def split_revision(source: str | os.PathLike) -> tuple[str, str | None]:
    """``"org/name@step1000"`` → ("org/name", "step1000"); an existing local path, or a name without
    "@", → (source, None)."""
    text = os.fspath(source)
    if "@" not in text or Path(text).expanduser().exists():
        return text, None
    name, _, revision = text.rpartition("@")
    if not name or not revision:
        raise RwasymError(f"{text!r}: write a hub revision as NAME@REVISION, e.g. EleutherAI/pythia-160m@step1000")
    return name, revision


def native_config(**overrides: Any) -> Any:
    """A `TransformerBridgeConfig` for a small native model (LN, GELU, learned positions)."""
    _, TransformerBridgeConfig = bridge_classes()
    fields: dict[str, Any] = dict(
        d_model=128,
        d_head=32,
        n_heads=4,
        n_layers=2,
        n_ctx=64,
        d_vocab=512,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    fields.update(overrides)
    return TransformerBridgeConfig(**fields)


def _jsonable_config(cfg: Any) -> dict:
    """The config as JSON values; a field that cannot be written is dropped with a warning naming it
    (the reloaded model then uses that field's default)."""
    out, dropped = {}, []
    for key, value in cfg.to_dict().items():
        if key == "device":
            continue
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif hasattr(value, "item") and not isinstance(value, torch.Tensor):
            value = value.item()  # numpy scalars
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            dropped.append(f"{key} ({type(value).__name__})")
            continue
        out[key] = value
    if dropped:
        import warnings

        warnings.warn(
            f"rwasym: the saved config leaves out {', '.join(dropped)}: not JSON-serialisable; the "
            "reloaded model uses their defaults",
            stacklevel=3,
        )
    return out


def save_model(model: Model | nn.Module, folder: str | os.PathLike, meta: dict | None = None) -> Path:
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
        state[clean_key(key)] = value.detach().cpu().contiguous()
    save_file(state, str(folder / _WEIGHTS_FILE))
    record = {"format": NATIVE_FORMAT, "config": _jsonable_config(model.cfg), "meta": meta or {}}
    (folder / META_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return folder


def read_meta(folder: str | os.PathLike) -> dict:
    """The ``rwasym.json`` record of a saved native model (format, config, meta)."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise RwasymError(f"{str(path)!r} does not exist; is {str(folder)!r} an rwasym checkpoint folder?")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RwasymError(f"{str(path)!r} is corrupt ({err}); re-save the checkpoint") from None
    if record.get("format") != NATIVE_FORMAT:
        raise RwasymError(f"{str(path)!r} has format {record.get('format')!r}, expected {NATIVE_FORMAT!r}")
    return record


def load_native(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str = "cpu") -> Model:
    """Load a folder written by `save_model` (safetensors only: nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    TransformerBridge, TransformerBridgeConfig = bridge_classes()
    folder = Path(folder)
    record = read_meta(folder)
    cfg_dict = dict(record["config"])
    if isinstance(cfg_dict.get("dtype"), str):
        cfg_dict["dtype"] = getattr(torch, cfg_dict["dtype"])
    cfg_dict["init_weights"] = False  # weights come from the file
    # boot_native is attached by setattr in transformer_lens.model_bridge.sources.native (undeclared on the class)
    bridge = TransformerBridge.boot_native(  # pyright: ignore[reportAttributeAccessIssue]
        TransformerBridgeConfig.from_dict(cfg_dict), device=device
    )
    weights = folder / _WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise RwasymError(
            f"cannot read {str(weights)!r} ({err}); the checkpoint folder is incomplete or corrupt"
        ) from None
    loaded = set()
    with torch.no_grad():
        for key, param in bridge.original_model.state_dict().items():
            clean = clean_key(key)
            if clean in state:
                param.copy_(state[clean])
                loaded.add(param.data_ptr())
            elif param.data_ptr() not in loaded:
                raise RwasymError(
                    f"{str(weights)!r} lacks tensor {clean!r}; the checkpoint does not match its {META_FILE}"
                )
    if dtype is not None:
        bridge.original_model.to(dtype=dtype)
    bridge.eval()
    model = Model(bridge, source=str(folder))
    model.meta = record.get("meta", {})
    return model


def is_checkpoint_folder(source: Any) -> bool:
    """True when ``source`` is a local Hugging Face checkpoint folder that can be streamed:
    a directory with ``config.json`` and ``model.safetensors`` (or its sharded index)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source).expanduser()
    return (
        path.is_dir()
        and (path / "config.json").exists()
        and ((path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists())
    )


# what a streamed read needs from a hub snapshot: weights as safetensors, the config and the tokenizer
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


def checkpoint_folder(source: Any) -> Path | None:
    """A local Hugging Face checkpoint folder for ``source`` (`is_checkpoint_folder`), or None.

    A folder is itself; a hub name (``org/name`` or ``org/name@revision``) is its snapshot in huggingface_hub's
    cache: fetched with ``snapshot_download`` (config, safetensors and tokenizer files only, never ``*.bin``)
    when the hub is reachable, else read from the cache (``local_files_only``), so a name that was downloaded
    once streams offline. Anything else (a GGUF file, a native model, a name that is in no cache) is None."""
    if is_checkpoint_folder(source):
        return Path(source).expanduser()
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    if Path(text).expanduser().exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    name, revision = split_revision(text)
    for local_only in (False, True):
        try:
            path = snapshot_download(
                name, revision=revision, allow_patterns=_SNAPSHOT_FILES, local_files_only=local_only
            )
        except Exception:  # noqa: BLE001 — no network, no such repository, gated: try the cache, then give up
            continue
        if isinstance(path, str) and is_checkpoint_folder(path):
            return Path(path)
    return None


def load_pair(
    base: Any, tuned: Any = None, tuned_adapter: Any = None, command: str = "this command", *, stream: bool = False
) -> tuple[Model, Any]:
    """(base, tuned) Models for a command: ``tuned`` is a full checkpoint, or ``tuned_adapter`` a PEFT
    LoRA adapter folder applied to ``base`` (exactly one of them). With ``stream=True`` a tuned
    Hugging Face checkpoint folder is returned as its path, unloaded, for the commands that read
    it a matrix at a time (`rwasym.models.checkpoint.is_checkpoint_folder`)."""
    if (tuned is None) == (tuned_adapter is None):
        raise RwasymError(
            f"{command} needs exactly one tuned side: --tuned (a full checkpoint) or --tuned-adapter "
            "(a PEFT LoRA adapter folder applied to --base)"
        )
    base = load(base)
    if tuned_adapter is not None:
        return base, load(base, adapter=tuned_adapter)
    return base, tuned if stream and is_checkpoint_folder(tuned) else load(tuned)
