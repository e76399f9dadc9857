"""TRL as an oracle for rwasym's alignment losses, and the TRL backend (`rwasym.train.trl_backend`).

The loss mapping checked here (TRL 1.16 ``DPOTrainer._compute_loss``; TRL has no ``rpo_alpha``):
rwasym dpo ↔ ``loss_type=["sigmoid"]``; sft ↔ ``["sft"]``; graded L_λ = λ·L_DPO + (1 − λ)·L_CE(chosen)
↔ ``["sigmoid", "sft"]`` with ``loss_weights=[λ, 1 − λ]``. TRL sums each loss's batch mean times its
weight; its "sft" term is the token mean −Σ log π / #chosen tokens over the batch, as `sft_loss` is;
sequence log-probs are Σ over completion tokens (prompt unscored, summed, not averaged).
"""

import json

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is the oracle here: install rwasym[hf] (trl, peft, datasets)")
pytest.importorskip("peft", reason="the LoRA path needs peft: install rwasym[hf]")

import rwasym  # noqa: E402
from rwasym.app.cli import main  # noqa: E402
from rwasym.data.pairs import PreferencePairs  # noqa: E402
from rwasym.errors import RwasymError  # noqa: E402
from rwasym.objectives import (  # noqa: E402
    alignment_loss,
    dpo_loss,
    preference_accuracy,
    sequence_logprobs,
    sft_loss,
)
from rwasym.studies.language import LanguageConfig, PairConfig, corpus, make_pairs  # noqa: E402
from rwasym.testing import build_hf_model  # noqa: E402
from rwasym.train import AlignConfig, TrainConfig, align, pretrain  # noqa: E402
from rwasym.train.trl_backend import (  # noqa: E402
    _trainer_class,
    align_trl,
    gpt2_to_native_state,
    native_to_gpt2,
    pairs_to_examples,
    trl_loss_settings,
)

LANG = LanguageConfig(d_vocab=32, markov_rank=2, copy_prob=0.6, seed=2)
TINY = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=24, d_vocab=32, d_mlp=64, seed=1)
QUIET = dict(progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def ragged_pairs(n: int, vocab: int, seed: int = 0) -> PreferencePairs:
    """Pairs with prompts, chosen and rejected continuations of different lengths (right padded)."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for part, (lo, hi) in {"prompt": (2, 6), "chosen": (1, 4), "rejected": (1, 4)}.items():
        lengths = torch.randint(lo, hi + 1, (n,), generator=g)
        x = torch.randint(3, vocab, (n, hi), generator=g)
        mask = torch.arange(hi)[None, :] < lengths[:, None]
        parts[part], parts[f"{part}_mask"] = torch.where(mask, x, 0), mask
    return PreferencePairs(**parts)


def dpo_trainer(policy, reference, settings: dict, examples: list[dict], tmp_path, tokenizer):
    """A DPOTrainer on ``examples`` (pre-tokenized: TRL's own collator and loss code, no training)."""
    from datasets import Dataset

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        max_length=None,
        per_device_train_batch_size=len(examples),
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **settings,
    )
    return _trainer_class()(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(base folder, policy folder): a tiny GPT-2 and a perturbed copy (so policy ≠ reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("trl-hf")
    build_hf_model("gpt2", root / "base")
    policy = AutoModelForCausalLM.from_pretrained(root / "base")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    policy.save_pretrained(root / "policy")
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "policy")
    return root / "base", root / "policy"


# ------------------------------------------------------------------------------- loss oracles
def test_loss_settings_mapping():
    assert trl_loss_settings(AlignConfig(objective="dpo", beta=0.3)) == {
        "loss_type": ["sigmoid"],
        "loss_weights": [1.0],
        "beta": 0.3,
    }
    assert trl_loss_settings(AlignConfig(objective="graded", lam=0.25, beta=0.3)) == {
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [0.25, 0.75],
        "beta": 0.3,
    }
    assert trl_loss_settings(AlignConfig(objective="sft"))["loss_type"] == ["sft"]
    with pytest.raises(RwasymError, match="objective must be one of"):
        trl_loss_settings(AlignConfig(objective="ipo"))


def test_dpo_and_graded_losses_equal_trl_given_identical_logprobs(hf_pair, tmp_path):
    """TRL's loss code (_compute_loss) fed per-token log-probs from the same random logits as rwasym:
    its collator's packing and completion mask are rwasym's, and the losses agree to 1e-6."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import FusedCausalLMOutput

    pairs = ragged_pairs(6, 96)
    examples = pairs_to_examples(pairs)
    tok = AutoTokenizer.from_pretrained(hf_pair[0])
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    n, L = len(pairs), batch["input_ids"].shape[1]
    # rwasym's packing = TRL's: prompt + continuation, right padded; continuation = completion mask
    for i, which in enumerate(("chosen", "rejected")):
        tokens, mask = pairs.sequences(which)
        rows = slice(i * n, (i + 1) * n)
        width = tokens.shape[1]
        assert torch.equal(batch["completion_mask"][rows, :width].bool(), mask)
        assert not batch["completion_mask"][rows, width:].any()
        assert torch.equal(batch["input_ids"][rows, :width][mask], tokens[mask])
    g = torch.Generator().manual_seed(1)
    policy_logits, ref_logits = torch.randn(2 * n, L, 96, generator=g), torch.randn(2 * n, L, 96, generator=g)

    class Logits(torch.nn.Module):
        """Stands in for a model with TRL's fused LM head: per-token log-probs of the labels, 0 at -100."""

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, labels, fused_lm_head, **kwargs):
            assert fused_lm_head
            logp = torch.log_softmax(self.logits[:, :-1], -1)  # (2n, L-1, vocab)
            target = labels[:, 1:]
            picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0].masked_fill(target == -100, 0.0)
            zeros = torch.zeros_like(picked)
            return FusedCausalLMOutput(log_probs=picked, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    tokens = batch["input_ids"]
    mask = batch["completion_mask"].bool()
    pol = sequence_logprobs(policy_logits, tokens, mask)  # rwasym's scoring of the same rows, (2n,)
    ref = sequence_logprobs(ref_logits, tokens, mask)
    for settings in (
        trl_loss_settings(AlignConfig(objective="dpo", beta=0.7)),
        trl_loss_settings(AlignConfig(objective="graded", beta=0.7, lam=0.3)),
    ):
        trainer = dpo_trainer(
            AutoModelForCausalLM.from_pretrained(hf_pair[0]),
            AutoModelForCausalLM.from_pretrained(hf_pair[0]),
            settings,
            examples,
            tmp_path,
            tok,
        )
        trainer.ref_model = Logits(ref_logits)
        theirs = trainer.compute_loss(Logits(policy_logits), batch)
        ours = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], 0.7)
        if settings["loss_type"] == ["sigmoid", "sft"]:
            ours = 0.3 * ours + 0.7 * sft_loss(policy_logits[:n], tokens[:n], mask[:n])
        assert abs(float(theirs.detach()) - float(ours)) < 1e-6


@pytest.mark.parametrize(
    "objective,lam", [("dpo", 0.5), ("graded", 0.0), ("graded", 0.3), ("graded", 1.0), ("sft", 0.5)]
)
def test_alignment_loss_equals_trl_forward(hf_pair, tmp_path, objective, lam):
    """End to end: TRL computes log-probs itself (its fused LM head on the HF model); rwasym scores
    the same pairs through the TransformerBridge of the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, policy_dir = hf_pair
    pairs = ragged_pairs(8, 96, seed=1)
    examples = pairs_to_examples(pairs)
    cfg = AlignConfig(objective=objective, lam=lam, beta=0.4)
    trainer = dpo_trainer(
        AutoModelForCausalLM.from_pretrained(policy_dir),
        AutoModelForCausalLM.from_pretrained(base),
        trl_loss_settings(cfg),
        examples,
        tmp_path,
        AutoTokenizer.from_pretrained(base),
    )
    trainer.model.eval()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    ours = alignment_loss(rwasym.load(policy_dir), pairs, cfg, rwasym.load(base))
    assert abs(float(theirs.detach()) - float(ours.detach())) < 1e-6


# ------------------------------------------------------------------------------- conversions
def test_native_to_gpt2_is_exact_and_invertible():
    model = rwasym.load(rwasym.native_config(**TINY))
    gpt2 = native_to_gpt2(model)
    x = torch.randint(0, 32, (3, 20))
    torch.testing.assert_close(gpt2(x).logits, model.bridge(x), atol=2e-5, rtol=1e-5)
    state = gpt2_to_native_state(gpt2, 2)
    from rwasym.models.host import clean_key

    for key, value in model.bridge.original_model.state_dict().items():
        if clean_key(key) in state:
            assert torch.equal(state[clean_key(key)], value)
    with pytest.raises(RwasymError, match="cannot express.*grouped-query"):
        native_to_gpt2(rwasym.load(rwasym.native_config(**{**TINY, "n_key_value_heads": 2})))


# ------------------------------------------------------------------------------- the backend
@pytest.fixture(scope="module")
def native_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl-native")
    model = rwasym.load(rwasym.native_config(**TINY))
    pretrain(
        model,
        corpus(256, 24, seed=0, config=LANG),
        TrainConfig(steps=30, batch_size=32, warmup_steps=5, n_checkpoints=2),
        out=out / "pre",
        **QUIET,
    )
    pairs = make_pairs(PairConfig(n_per_rule=40, prompt_len=8, cont_len=1, seed=0), LANG)
    return out / "pre" / "step_000030", pairs


@pytest.mark.parametrize("objective,rtol", [("graded", 1e-4), ("sft", 1e-4), ("dpo", 1e-3)])
def test_align_trl_reproduces_builtin_trajectory(native_base, tmp_path, objective, rtol):
    """Same base, batches, optimizer and schedule: TRL's run logs what the built-in loop logs, in the
    same layout. (DPO drifts ~1e-5 by step 3: Adam amplifies float noise in parameters whose exact
    gradient is 0, such as the key biases; the CE term of graded dominates that noise.)"""
    base, pairs = native_base
    cfg = AlignConfig(
        objective=objective,
        beta=0.5,
        lam=0.5,
        steps=8,
        batch_size=16,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=2,
    )
    ours = align(rwasym.load(base), rwasym.load(base), pairs, cfg, out=tmp_path / "builtin", **QUIET)
    theirs = align_trl(base, pairs, cfg, tmp_path / "trl", **QUIET)
    assert [r["step"] for r in theirs.history] == [r["step"] for r in ours.history] == [1, 3, 5, 7, 8]
    for a, b in zip(ours.history, theirs.history):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-6), key
    logged = [json.loads(line) for line in (tmp_path / "trl" / "log.jsonl").read_text().splitlines()]
    assert logged == theirs.history
    names = sorted(p.name for p in (tmp_path / "builtin").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "trl").iterdir() if p.name != "trl.json")
    assert [p.name for p in theirs.checkpoints] == ["step_000000", "step_000004", "step_000008"]
    meta = rwasym.load(theirs.checkpoints[-1]).meta
    assert set(meta) == set(rwasym.load(ours.checkpoints[-1]).meta) == {"stage", "step", "loss", "config"}
    assert meta["step"] == 8 and meta["loss"] == pytest.approx(ours.final_loss, rel=rtol)
    start, end = rwasym.load(theirs.checkpoints[0]), rwasym.load(theirs.checkpoints[-1])
    assert all(torch.equal(p, q) for p, q in zip(start.bridge.parameters(), rwasym.load(base).bridge.parameters()))
    assert theirs.history[-1]["loss"] < theirs.history[0]["loss"]
    assert preference_accuracy(end, None, pairs) > preference_accuracy(start, None, pairs)
    if objective != "sft":
        assert preference_accuracy(end, start, pairs) > 0.6  # the implicit reward prefers chosen on the train pairs


def test_align_trl_lora_saves_adapter_folders(hf_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = hf_pair[0]
    pairs = ragged_pairs(32, 96, seed=2)
    cfg = AlignConfig(
        objective="dpo", beta=0.5, steps=6, batch_size=16, lr=1e-2, warmup_steps=1, checkpoint_every=3, log_every=1
    )
    result = align_trl(
        base,
        pairs,
        cfg,
        tmp_path / "lora",
        lora={"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"]},
        **QUIET,
    )
    assert [p.name for p in result.checkpoints] == ["step_000000", "step_000003", "step_000006"]
    last = result.checkpoints[-1]
    assert {"adapter_config.json", "adapter_model.safetensors", "rwasym-train.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "rwasym-train.json").read_text())["step"] == 6
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), last).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tuned, ref = rwasym.load(tmp_path / "merged"), rwasym.load(base)
    changed = {name.split(".")[-1] for name, d in rwasym.weight_deltas(ref, tuned).items() if bool(d.any())}
    assert changed == {"W_Q", "W_K", "W_V", "W_in"}  # c_attn and c_fc were adapted; c_proj (W_O, W_out) was not
    assert preference_accuracy(tuned, ref, pairs) > 0.5
    via = rwasym.load(base, adapter=last)  # rwasym's own reader of the step folder = peft's merge
    x = torch.randint(0, 96, (2, 8))
    torch.testing.assert_close(via.bridge(x), tuned.bridge(x), atol=1e-5, rtol=1e-5)


def test_align_trl_lora_on_native_base_saves_merged_native_checkpoints(native_base, tmp_path):
    base, pairs = native_base
    cfg = AlignConfig(objective="dpo", beta=0.5, steps=4, batch_size=16, lr=5e-3, warmup_steps=1, checkpoint_every=0)
    result = align_trl(base, pairs, cfg, tmp_path / "out", lora={"r": 2, "target_modules": ["c_attn"]}, **QUIET)
    start, end, ref = (rwasym.load(p) for p in (*result.checkpoints, base))
    assert [p.name for p in result.checkpoints] == ["step_000000", "step_000004"]
    assert not any(bool(d.any()) for d in rwasym.weight_deltas(ref, start).values())
    changed = {name.split(".")[-1] for name, d in rwasym.weight_deltas(ref, end).items() if bool(d.any())}
    assert changed == {"W_Q", "W_K", "W_V"}  # the adapter on c_attn, merged into the native q/k/v weights


def test_align_trl_errors(native_base, tmp_path):
    base, pairs = native_base
    with pytest.raises(RwasymError, match="neither"):
        align_trl(tmp_path, pairs, AlignConfig(steps=1), tmp_path / "x", **QUIET)
    wide = PreferencePairs(pairs.prompt[:4] + 40, pairs.chosen[:4], pairs.rejected[:4])
    with pytest.raises(RwasymError, match="vocabulary is 32"):
        align_trl(base, wide, AlignConfig(steps=1), tmp_path / "y", **QUIET)


def test_cli_backend_trl(native_base, tmp_path, capsys):
    base, pairs = native_base
    pairs.save(tmp_path / "pairs.safetensors")
    assert (
        main(
            [
                "train",
                "align",
                "--base",
                str(base),
                "--backend",
                "trl",
                "--steps",
                "3",
                "--beta",
                "0.5",
                "--pairs",
                str(tmp_path / "pairs.safetensors"),
                "--out",
                str(tmp_path / "ali"),
                "--quiet",
            ]
        )
        == 0
    )
    tuned = rwasym.load(tmp_path / "ali" / "step_000003")
    assert tuned.meta["step"] == 3
    assert sum(float(d.norm()) for d in rwasym.weight_deltas(rwasym.load(base), tuned).values()) > 0
    assert json.loads((tmp_path / "ali" / "trl.json").read_text())["loss_type"] == ["sigmoid"]
    assert main(["train", "pretrain", "--backend", "trl", "--out", str(tmp_path / "p"), "--steps", "1"]) == 2
    assert "align only" in capsys.readouterr().err
