"""The architecture families rwasym is tested on: tiny random-init configs and the support table.

`FAMILIES` is the one table: each `Family` builds a tiny Hugging Face model of its architecture
(2 layers, d_model 32, 4 query heads, vocab 96, eager attention, every 1-D parameter — norms,
biases — perturbed by 0.1·N(0, 1) so that no norm is at its identity init), names the Hugging
Face modules an independent oracle needs (the attention input projection, the attention output
projection, the final norm) and states rwasym's support. ``tests/test_families.py`` runs every
row; the docs' support table (docs/families.md) is `support_table()` of the same rows, checked by
tests/test_docs.py, so the two cannot drift.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "Family", "build_family", "support_table"]


@dataclass(frozen=True)
class Family:
    """One architecture family of the support table.

    layers: the Hugging Face path of the decoder layers; q_input: the module (relative to a layer)
    whose input is W_Q's (q_proj, or the fused qkv projection); o_proj: the attention output
    projection (relative to a layer); conv1d: GPT-2-style Conv1D layout (weight = Wᵀ);
    final_norm: the final norm's path; write: the write matrix whose probe row the oracle
    recomputes (``W_out`` against resid_post; ``W_O`` against resid_mid where the MLP is a mixture
    of experts, whose probe rows are not built yet); resid_mid_input: the module (relative to a layer)
    whose input is resid_mid, where the oracle also recomputes W_O's row; post_norm: the scale rule of the
    post-sublayer norms (``w``: γ = weight, OLMo 2; ``1+w``: Gemma), for the oracle of diag(γ_post_eff)·ΔW.
    """

    name: str
    label: str
    make: Callable[[dict, dict], Any]
    layers: str
    q_input: str
    o_proj: str
    final_norm: str
    status: str = "supported"
    notes: str = ""
    conv1d: bool = False
    write: str = "W_out"
    resid_mid_input: str = ""
    post_norm: str = ""  # post-sublayer norms (post_attention_ / post_feedforward_layernorm): "w" or "1+w" scale


def _t():
    import transformers

    return transformers


_LLAMA = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)
_POST_NORM = (
    "post-sublayer norms (attention / MLP outputs are normalised before the residual add): "
    "probe rows of W_O / W_out measure diag(γ_post)·ΔW (`post_norm='raw'`: the raw ΔW); "
    "rank-1 edits and closed_form_u still use the raw ΔW"
)
_MOE = (
    "mixture of experts: the router (`blocks.L.mlp.W_router`) and every expert's W_gate / W_in / W_out "
    "(`blocks.L.mlp.experts.e.*`, slices of the fused 3-D expert parameters) are read, edited and restored "
    "exactly through their weights; probe rows of experts read their routed statistics (loaded models only); "
    "expert gradients, hook edits (so sweeps of experts) and checkpoint streaming are not built yet (experts read "
    "only their routed tokens)"
)
_MQA = "one key/value head (multi-query)"


def _llama_like(config: str, model: str, **extra):
    return lambda common, llama: getattr(_t(), model)(getattr(_t(), config)(**llama, **extra, **common))


FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2",
        "GPT-2",
        lambda c, l: _t().GPT2LMHeadModel(
            _t().GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, **c)
        ),
        "transformer.h",
        "attn.c_attn",
        "attn.c_proj",
        "transformer.ln_f",
        conv1d=True,
        notes="Conv1D layout, fused c_attn",
    ),
    Family(
        "gptj",
        "GPT-J",
        lambda c, l: _t().GPTJForCausalLM(
            _t().GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, rotary_dim=4, **c)
        ),
        "transformer.h",
        "attn.q_proj",
        "attn.out_proj",
        "transformer.ln_f",
        notes="parallel attention + MLP",
    ),
    Family(
        "gpt_neox",
        "GPT-NeoX / Pythia",
        lambda c, l: _t().GPTNeoXForCausalLM(
            _t().GPTNeoXConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=64,
                **c,
            )
        ),
        "gpt_neox.layers",
        "attention.query_key_value",
        "attention.dense",
        "gpt_neox.final_layer_norm",
        notes="fused qkv interleaved per head, parallel attention + MLP",
    ),
    Family(
        "llama",
        "Llama",
        _llama_like("LlamaConfig", "LlamaForCausalLM"),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="GQA, gated MLP",
        resid_mid_input="post_attention_layernorm",
    ),
    Family(
        "mistral",
        "Mistral",
        _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=64),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="GQA",
    ),
    Family(
        "qwen2",
        "Qwen2 / Qwen2.5",
        _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="GQA, qkv biases",
    ),
    Family(
        "qwen3",
        "Qwen3",
        _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="q/k norms",
    ),
    Family(
        "gemma",
        "Gemma",
        _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=8),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="RMSNorm scales by 1 + w (measured, `Model.final_norm_scale`)",
    ),
    Family(
        "gemma2",
        "Gemma 2",
        _llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes="logit soft-capping, sliding window 4 < sequence; " + _POST_NORM,
        resid_mid_input="pre_feedforward_layernorm",
        post_norm="1+w",
    ),
    Family(
        "gemma3",
        "Gemma 3 (text)",
        lambda c, l: _t().Gemma3ForCausalLM(
            _t().Gemma3TextConfig(
                **{**l, "num_key_value_heads": 1},
                head_dim=8,
                query_pre_attn_scalar=8,
                sliding_window=4,
                layer_types=["sliding_attention", "full_attention"],
                **c,
            )
        ),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes=f"{_MQA}, sliding window; " + _POST_NORM,
        resid_mid_input="pre_feedforward_layernorm",
        post_norm="1+w",
    ),
    Family(
        "olmo",
        "OLMo",
        _llama_like("OlmoConfig", "OlmoForCausalLM"),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="parameter-free LayerNorm",
    ),
    Family(
        "olmo2",
        "OLMo 2",
        _llama_like("Olmo2Config", "Olmo2ForCausalLM"),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes="no pre-norms (resid_mid is the MLP input); " + _POST_NORM,
        resid_mid_input="mlp",
        post_norm="w",
    ),
    Family(
        "phi3",
        "Phi-3",
        _llama_like("Phi3Config", "Phi3ForCausalLM"),
        "model.layers",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "model.norm",
        notes="fused qkv and gate_up projections (LoRA adapters on either are split per matrix)",
    ),
    Family(
        "falcon",
        "Falcon",
        lambda c, l: _t().FalconForCausalLM(
            _t().FalconConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                ffn_hidden_size=64,
                new_decoder_architecture=False,
                multi_query=True,
                **c,
            )
        ),
        "transformer.h",
        "self_attention.query_key_value",
        "self_attention.dense",
        "transformer.ln_f",
        status="supported (see notes)",
        notes=f"{_MQA}, fused qkv, parallel attention + MLP; a copy.deepcopy of the "
        "loaded model ignores edits of W_O, W_in and W_out (TransformerBridge): load it again instead of copying",
    ),
    Family(
        "gpt_bigcode",
        "GPT-BigCode / StarCoder",
        lambda c, l: _t().GPTBigCodeForCausalLM(
            _t().GPTBigCodeConfig(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64, multi_query=True, **c)
        ),
        "transformer.h",
        "attn.c_attn",
        "attn.c_proj",
        "transformer.ln_f",
        notes=f"{_MQA}, fused c_attn",
    ),
    Family(
        "mixtral",
        "Mixtral",
        _llama_like("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes=_MOE,
        write="W_O",
        resid_mid_input="post_attention_layernorm",
    ),
    Family(
        "olmoe",
        "OLMoE",
        _llama_like("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes=_MOE,
        write="W_O",
        resid_mid_input="post_attention_layernorm",
    ),
    Family(
        "qwen2_moe",
        "Qwen2-MoE",
        _llama_like(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "model.layers",
        "self_attn.q_proj",
        "self_attn.o_proj",
        "model.norm",
        status="supported (see notes)",
        notes=_MOE + "; the shared expert's W_gate / W_in / W_out are `blocks.L.mlp.shared.*`",
        write="W_O",
        resid_mid_input="post_attention_layernorm",
    ),
    Family(
        "bloom",
        "Bloom",
        lambda c, l: _t().BloomForCausalLM(_t().BloomConfig(n_layer=2, hidden_size=32, n_head=4, **c)),
        "transformer.h",
        "self_attention.query_key_value",
        "self_attention.dense",
        "transformer.ln_f",
        notes="ALiBi, fused qkv interleaved per head",
    ),
)


def build_family(family: Family | str, folder: str | Path, *, seed: int = 0, vocab_size: int = 96):
    """Build the tiny random-init model of ``family``, perturb its 1-D parameters, save it with a
    word-level tokenizer to ``folder`` and return the Hugging Face model in eval mode."""
    from . import perturb_and_save

    fam = family if isinstance(family, Family) else {f.name: f for f in FAMILIES}[family]
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="eager")
    return perturb_and_save(fam.make(common, dict(_LLAMA)), folder, vocab_size)


def support_table() -> str:
    """The support table of docs/families.md (Markdown), generated from `FAMILIES`."""
    lines = ["| family | status | notes |", "|---|---|---|"]
    lines += [f"| {f.label} | {f.status} | {f.notes} |" for f in FAMILIES]
    return "\n".join(lines)
