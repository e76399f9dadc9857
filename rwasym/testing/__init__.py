"""Builders for tiny randomly initialised models, used by the tests, notebooks and benchmarks.

No weights are downloaded: Hugging Face models are built from configs, saved to a folder and
loaded back by path — exactly the code path a user takes with a real checkpoint folder.
"""

from pathlib import Path
from typing import Union

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


def build_hf_model(arch: str, folder: Union[str, Path], *, seed: int = 0, vocab_size: int = 96):
    """Build a tiny random Hugging Face model of `arch` and save it (with a tokenizer) to `folder`.

    gpt2: Conv1D layout, fused QKV. llama: 4 query heads, 2 KV heads (GQA), gated MLP.
    neox: fused QKV with per-head interleaving, parallel attention + MLP. Non-square MLPs.
    Returns the HF model in eval mode (eager attention, for a like-for-like comparison).
    """
    from transformers import (
        GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, **common))
    elif arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, **common))
    else:
        raise ValueError(f"unknown test architecture {arch!r}; choose from {HF_ARCHS}")
    # Random init leaves norms at γ=1, β=0; perturb them so folding γ is actually tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.save_pretrained(folder)
    _word_tokenizer(vocab_size).save_pretrained(folder)
    return model.eval()
