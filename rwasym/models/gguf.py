"""GGUF files as model sources: de-quantize once into a clean Hugging Face folder, cached by content.

`rwasym.load("model.gguf")` calls `dequantize`: transformers reads the file
(``from_pretrained(folder, gguf_file=name)``, needs the ``gguf`` package) and de-quantizes every
tensor to float32; the weights are copied into a fresh model whose config carries no GGUF
``quantization_config`` (transformers refuses to ``save_pretrained`` a model loaded from GGUF) and
saved with the tokenizer as safetensors under ``<cache>/gguf/<sha256[:16]>-<dtype>/``, with
``rwasym-gguf.json`` recording the file that was converted, its hash, architecture and tensor
types (`rwasym.load` reports the path it was given: identical files share the cache). The folder
is written beside its final place and renamed into it, so an interrupted conversion leaves
nothing half-written; a second load of the same file (any path) reuses it.

The result is the de-quantized *quantized* model: its weights equal the GGUF file's tensors
exactly, not the original float checkpoint (``Model.provenance["gguf"]`` and its repr say so).
Refused with `RwasymError`: a missing or non-GGUF file, a corrupt or truncated one, an architecture
or tensor type transformers / gguf cannot de-quantize, and a file lacking tensors the config implies
(transformers would initialise those randomly and only warn).
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import RwasymError
from .cache import cache_root

__all__ = ["GGUF_MAGIC", "PROVENANCE_FILE", "dequantize", "file_sha256", "is_gguf", "provenance", "read_header"]

GGUF_MAGIC = b"GGUF"
PROVENANCE_FILE = "rwasym-gguf.json"
_FORMAT = "rwasym-gguf/1"
_FIX = (
    "pass a GGUF file that transformers can de-quantize (llama, mistral, qwen2, gemma, phi3, ... with "
    "F32/F16/Q4_0/Q4_1/Q8_0/K-quants), or convert the original checkpoint to a Hugging Face folder"
)


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a ``*.gguf`` path or an existing file that starts with the GGUF magic bytes."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):  # the packed-weights path of newer transformers
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    return archs


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # a malformed field reads as missing; the loader reports what it needs
        return None


def read_header(path: str | os.PathLike) -> dict:
    """The GGUF header (memory-mapped; no tensor data is read): architecture, sizes, tensor types,
    tokenizer facts. Raises RwasymError for files that cannot be de-quantized."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RwasymError(f"no such GGUF file {str(path)!r}; pass an existing .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise RwasymError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "pass a .gguf file, or a Hugging Face folder / hub name"
        )
    try:
        import gguf
    except ImportError:
        raise RwasymError(
            "reading GGUF files needs the gguf package: pip install 'rwasym[real]' (or pip install gguf)"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # truncated / corrupt files raise ValueError, IndexError, struct.error, ...
        raise RwasymError(
            f"{str(path)!r} is a corrupt or truncated GGUF file ({type(err).__name__}: {err}); "
            "download or convert it again"
        ) from None
    arch = _field(reader, "general.architecture")
    supported = _supported_architectures()
    if arch not in supported:
        raise RwasymError(
            f"{str(path)!r} holds a GGUF {arch!r} model, which transformers cannot de-quantize "
            f"(it reads {', '.join(sorted(supported))}); {_FIX}"
        )
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    readable = {"F32", "F16", "BF16"} | {q.name for q in getattr(gguf.quants, "_type_traits", {})}
    bad = sorted(set(types) - readable)
    if bad:
        raise RwasymError(f"{str(path)!r} holds tensor types the gguf package cannot de-quantize: {bad}; {_FIX}")
    names = {t.name for t in reader.tensors}
    return dict(
        architecture=arch,
        name=_field(reader, "general.name"),
        block_count=_field(reader, f"{arch}.block_count"),
        embedding_length=_field(reader, f"{arch}.embedding_length"),
        head_count=_field(reader, f"{arch}.attention.head_count"),
        head_count_kv=_field(reader, f"{arch}.attention.head_count_kv"),
        context_length=_field(reader, f"{arch}.context_length"),
        tensor_types=types,
        n_tensors=len(reader.tensors),
        tie_word_embeddings="output.weight" not in names,
        has_chat_template="tokenizer.chat_template" in reader.fields,
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """A local file must never reach for the hub."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dense_copy(model: Any, dtype: torch.dtype) -> Any:
    """A fresh ``type(model)`` with the same weights and a config without ``quantization_config``."""
    from transformers.initialization import no_init_weights

    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = type(model.config).from_dict(cfg)
    config.dtype = dtype
    with no_init_weights():
        fresh = type(model)(config).to(dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RwasymError(
            f"copying the de-quantized {type(model).__name__} into a plain one left missing {missing[:5]} "
            f"and unexpected {unexpected[:5]} weights; {_FIX}"
        )
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def _convert(path: Path, header: dict, out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    with _offline():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            # with output_loading_info=True from_pretrained returns (model, info); its annotation says model only
            model, info = AutoModelForCausalLM.from_pretrained(  # pyright: ignore[reportGeneralTypeIssues]
                str(path.parent),
                gguf_file=path.name,
                dtype=dtype,
                output_loading_info=True,
                quantization_config=GgufConfig(dequantize=True),
            )  # no packed GGUF modules left behind
        except (ValueError, NotImplementedError, OSError, KeyError) as err:
            raise RwasymError(
                f"transformers cannot de-quantize {str(path)!r} ({type(err).__name__}: {err}); {_FIX}"
            ) from None
    missing = [
        k for k in info.get("missing_keys", []) if not (k.endswith("lm_head.weight") and header["tie_word_embeddings"])
    ]
    if missing:  # transformers initialises these randomly and only warns
        raise RwasymError(
            f"{str(path)!r} lacks the tensors of {len(missing)} parameters its header implies (e.g. "
            f"{sorted(missing)[:3]}); the file is incomplete: convert it again"
        )
    for name, p in model.named_parameters():
        if p.is_meta or not p.is_floating_point() or not bool(torch.isfinite(p).all()):
            raise RwasymError(
                f"parameter {name} of {str(path)!r} is not a finite float tensor after de-quantization; {_FIX}"
            )
    if header.get("context_length") and getattr(tokenizer, "model_max_length", 0) > 10**9:
        tokenizer.model_max_length = int(header["context_length"])  # GGUF stores none; the default is 1e30
    fresh = _dense_copy(model, dtype)
    del model
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dequantize(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The cached Hugging Face folder of a GGUF file, converting it on first use (module docstring).

    cache_dir: the rwasym cache root (default ``$RWASYM_CACHE`` or ``~/.cache/rwasym``); the folder
    is ``<cache_dir>/gguf/<sha256[:16]>-<dtype>``. Returns the folder.
    """
    path = Path(path).expanduser().resolve()
    header = read_header(path)
    digest = file_sha256(path)
    dtype_name = str(dtype).replace("torch.", "")
    folder = cache_root(cache_dir) / "gguf" / f"{digest[:16]}-{dtype_name}"
    record = folder / PROVENANCE_FILE
    if record.exists():
        try:
            if json.loads(record.read_text()).get("sha256") == digest:
                return folder
        except json.JSONDecodeError:
            pass
        raise RwasymError(
            f"the GGUF cache folder {str(folder)!r} does not belong to {str(path)!r} (its "
            f"{PROVENANCE_FILE} is corrupt or names another file); delete the folder and load again"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _convert(path, header, tmp, dtype)
        provenance = dict(
            format=_FORMAT,
            source=str(path),
            sha256=digest,
            dtype=dtype_name,
            quantized=True,
            **{k: header[k] for k in ("architecture", "name", "tensor_types", "block_count")},
        )
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first
            if not record.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def provenance(folder: str | os.PathLike) -> dict | None:
    """The ``rwasym-gguf.json`` record of a folder `dequantize` wrote, else None."""
    record = Path(folder) / PROVENANCE_FILE
    return json.loads(record.read_text()) if record.exists() else None
