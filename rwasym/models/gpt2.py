"""Exact conversion between GPT-2-shaped native models and Hugging Face ``GPT2LMHeadModel``.

`native_to_gpt2` lets peft / TRL / transformers use a native model (`Model.save_pretrained`);
`gpt2_to_native_state` maps back. Conv1D weights are stored (n_in, n_out); ``c_attn`` stacks
[W_Q; W_K; W_V] along the output axis.
"""

from typing import Any

import torch
from torch import Tensor

from ..errors import RwasymError
from .host import clean_key

__all__ = ["gpt2_to_native_state", "native_to_gpt2"]

_ACTS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


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
        raise RwasymError(
            "this native model cannot be converted to Hugging Face GPT-2, which cannot express "
            f"{'; '.join(problems)}; keep it native (rwasym.save_model) and, for alignment, use the "
            "built-in backend (rwasym.align, --backend builtin)."
        )


def native_to_gpt2(model: Any) -> Any:
    """An exact ``GPT2LMHeadModel`` copy of a GPT-2-shaped native model (untied head, no dropout).

    Conv1D weights are stored (n_in, n_out), so every nn.Linear weight is transposed; ``c_attn``
    stacks [W_Q; W_K; W_V] along the output axis.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    _check_gpt2_shaped(cfg)
    state = {clean_key(k): v.detach() for k, v in model.bridge.original_model.state_dict().items()}
    if "head.bias" in state and bool(state["head.bias"].any()):
        raise RwasymError(
            "the native unembedding has a non-zero bias, which GPT-2's lm_head lacks; use the built-in backend."
        )
    d_mlp = int(cfg.d_mlp or 4 * cfg.d_model)
    hf_cfg = GPT2Config(
        vocab_size=cfg.d_vocab,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=d_mlp,
        activation_function=_ACTS[(cfg.act_fn or "gelu").lower()],
        layer_norm_epsilon=float(cfg.eps),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf_cfg._attn_implementation = "eager"
    gpt2 = {
        "transformer.wte.weight": state["tok_embed.weight"],
        "transformer.wpe.weight": state["pos.weight"],
        "transformer.ln_f.weight": state["ln_out.weight"],
        "transformer.ln_f.bias": state["ln_out.bias"],
        "lm_head.weight": state["head.weight"],
    }
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
    out = {
        "tok_embed.weight": s["transformer.wte.weight"],
        "pos.weight": s["transformer.wpe.weight"],
        "ln_out.weight": s["transformer.ln_f.weight"],
        "ln_out.bias": s["transformer.ln_f.bias"],
        "head.weight": s["lm_head.weight"],
    }
    for i in range(n_layers):
        h, L = f"transformer.h.{i}", f"layers.{i}"
        for a, b in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{L}.{b}.weight"], out[f"{L}.{b}.bias"] = s[f"{h}.{a}.weight"], s[f"{h}.{a}.bias"]
        for x, w, bias in zip("qkv", s[f"{h}.attn.c_attn.weight"].T.chunk(3), s[f"{h}.attn.c_attn.bias"].chunk(3)):
            out[f"{L}.attn.{x}.weight"], out[f"{L}.attn.{x}.bias"] = w, bias
        for a, b in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc_in"), ("mlp.c_proj", "mlp.fc_out")):
            out[f"{L}.{b}.weight"], out[f"{L}.{b}.bias"] = s[f"{h}.{a}.weight"].T, s[f"{h}.{a}.bias"]
    return out
