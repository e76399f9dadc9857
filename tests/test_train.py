import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rwasym
from rwasym.data.pairs import PreferencePairs
from rwasym.errors import RwasymError
from rwasym.objectives import (
    alignment_loss,
    dpo_loss,
    heldout_ce,
    mean_kl,
    pair_logprobs,
    preference_accuracy,
    sequence_logprobs,
    sft_loss,
)
from rwasym.studies.default_pair import default_pair
from rwasym.studies.language import LanguageConfig, PairConfig, corpus, make_pairs
from rwasym.testing import build_hf_model
from rwasym.train import AlignConfig, TrainConfig, align, log_spaced_steps, lr_at, pretrain

LANG = LanguageConfig(d_vocab=32, markov_rank=2, copy_prob=0.6, seed=2)
TINY = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=24, d_vocab=32, d_mlp=64, seed=1)
QUIET = dict(progress=False)


def tiny_model():
    return rwasym.load(rwasym.native_config(**TINY))


def params(model):
    return [p.detach().clone() for p in model.bridge.parameters()]


@pytest.fixture(scope="module")
def data():
    return corpus(256, 24, seed=0, config=LANG), corpus(32, 24, seed=1, config=LANG)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, data):
    """A tiny base pretrained once for the alignment tests (its final checkpoint folder)."""
    out = tmp_path_factory.mktemp("base")
    pretrain(
        tiny_model(), data[0], TrainConfig(steps=60, batch_size=32, warmup_steps=5, n_checkpoints=2), out=out, **QUIET
    )
    return out / "step_000060"


# ------------------------------------------------------------------------------ pure losses
def test_sequence_logprobs_matches_brute_force_loop():
    logits = torch.randn(3, 5, 7)
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 5):
            if mask[b, t]:
                expected[b] += logits[b, t - 1, tokens[b, t]] - torch.logsumexp(logits[b, t - 1], 0)
    torch.testing.assert_close(sequence_logprobs(logits, tokens, mask), expected)
    assert float(sft_loss(logits, tokens, mask)) == pytest.approx(-float(expected.sum()) / 6, rel=1e-6)
    with pytest.raises(RwasymError, match=r"mask\[:, 0\] must be False"):
        sequence_logprobs(logits, tokens, torch.ones(3, 5, dtype=torch.bool))


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.5]),
    )
    beta = 0.5
    by_hand = [
        -math.log(1 / (1 + math.exp(-beta * ((-1 + 2) - (-3 + 2))))),
        -math.log(1 / (1 + math.exp(-beta * ((-2 + 2) - (-1 + 2.5))))),
    ]
    assert float(dpo_loss(pc, pr, rc, rr, beta)) == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert float(dpo_loss(pc, pr, pc, pr, 0.1)) == pytest.approx(math.log(2), rel=1e-7)


def test_schedule_and_checkpoint_steps():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert log_spaced_steps(1000, 4) == [0, 1, 10, 100, 1000]


# -------------------------------------------------------------------------------- pretrain
def test_pretrain_lowers_loss_writes_log_and_round_trips(tmp_path, data):
    model = tiny_model()
    before = heldout_ce(model, data[1])
    cfg = TrainConfig(steps=30, batch_size=32, warmup_steps=3, n_checkpoints=3, log_every=5)
    result = pretrain(model, data[0], cfg, out=tmp_path, **QUIET)
    after = heldout_ce(model, data[1])
    assert after < before - 0.3 and before > math.log(32) - 0.5  # starts near uniform, learns
    assert [p.name for p in result.checkpoints] == [f"step_{s:06d}" for s in log_spaced_steps(30, 3)]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 6, 11, 16, 21, 26, 30] and set(records[0]) >= {"step", "loss", "lr"}
    loaded = rwasym.load(tmp_path / "step_000030")
    assert loaded.meta["step"] == 30 and loaded.meta["stage"] == "pretrain"
    x = data[1][:4]
    with torch.no_grad():
        assert torch.equal(loaded.bridge(x), model.bridge(x))


def test_pretrain_is_deterministic(data):
    cfg = TrainConfig(steps=8, batch_size=16, warmup_steps=2)
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model()
        pretrain(model, data[0], TrainConfig(**{**cfg.__dict__, "seed": seed}), **QUIET)
        runs.append(params(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_pretrain_input_errors():
    model = tiny_model()
    with pytest.raises(RwasymError, match=r"vocabulary is d_vocab=32"):
        pretrain(model, torch.full((4, 8), 40), TrainConfig(steps=1), **QUIET)
    with pytest.raises(RwasymError, match="n_ctx=24"):
        pretrain(model, torch.zeros(4, 30, dtype=torch.long), TrainConfig(steps=1), **QUIET)


# ---------------------------------------------------------------------------------- align
def test_dpo_raises_preference_accuracy(base_dir, data, tmp_path):
    pairs = make_pairs(PairConfig(n_per_rule=300, rules=("class",), prompt_len=12, class_top=6), LANG)
    train, held = pairs.split(0.25, seed=0)
    base, policy = rwasym.load(base_dir), rwasym.load(base_dir)
    before = preference_accuracy(policy, None, held)
    cfg = AlignConfig(beta=0.5, steps=25, batch_size=32, lr=3e-3, warmup_steps=2, checkpoint_every=10)
    result = align(policy, base, train, cfg, out=tmp_path, **QUIET)
    after = preference_accuracy(policy, None, held)
    assert after > max(0.75, before + 0.15)
    assert preference_accuracy(policy, base, held) > 0.75  # implicit reward margins
    assert preference_accuracy(base, base, held) == 0.0  # the reference's margins are all zero
    assert [p.name for p in result.checkpoints] == ["step_000000", "step_000010", "step_000020", "step_000025"]
    assert {"margin", "reward_acc"} <= set(result.history[-1])
    assert mean_kl(base, rwasym.load(base_dir), data[1]) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(policy, base, data[1]) > 1e-3


@pytest.mark.parametrize("cont_len", [1, 2])
def test_graded_objective_endpoints_match_sft_and_dpo_gradients(base_dir, cont_len):
    pairs = make_pairs(PairConfig(n_per_rule=8, prompt_len=10, cont_len=cont_len, seed=5), LANG)
    policy, ref = rwasym.load(base_dir), rwasym.load(base_dir)
    with torch.no_grad():  # move the policy off the reference so the DPO gradient is generic
        for p in policy.bridge.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def grads(cfg):
        policy.bridge.zero_grad(set_to_none=True)
        alignment_loss(policy, pairs, cfg, reference=ref).backward()
        return [p.grad.clone() for p in policy.bridge.parameters()]

    for lam, other in ((0.0, AlignConfig(objective="sft")), (1.0, AlignConfig(objective="dpo", beta=0.3))):
        graded = grads(AlignConfig(objective="graded", lam=lam, beta=0.3))
        for g, h in zip(graded, grads(other)):
            torch.testing.assert_close(g, h, rtol=0, atol=0)  # λ·0 terms add exact zeros: bit for bit
    half = alignment_loss(policy, pairs, AlignConfig(objective="graded", lam=0.5, beta=0.3), reference=ref)
    ends = [
        alignment_loss(policy, pairs, c, reference=ref) for c in (AlignConfig(objective="sft"), AlignConfig(beta=0.3))
    ]
    assert half.item() == pytest.approx(0.5 * ends[0].item() + 0.5 * ends[1].item(), rel=1e-5)


def test_graded_lambda_one_run_is_the_dpo_run_bit_for_bit(base_dir):
    """The README's built-in check, and what lets the real-model graded experiment reuse each seed's
    DPO run as its λ = 1 run: L_1 = 1·L_DPO + 0·L_CE trains to the same weights as DPO, bit for bit
    (and λ = 0.999 does not, so the comparison can fail)."""
    pairs = make_pairs(PairConfig(n_per_rule=24, prompt_len=10, seed=3), LANG)
    cfg = AlignConfig(beta=0.3, steps=4, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=0)
    runs = {}
    for name, c in (
        ("dpo", cfg),
        ("graded1", replace(cfg, objective="graded", lam=1.0)),
        ("graded0999", replace(cfg, objective="graded", lam=0.999)),
    ):
        policy = rwasym.load(base_dir)
        align(policy, rwasym.load(base_dir), pairs, c, **QUIET)
        runs[name] = params(policy)
    assert all(torch.equal(a, b) for a, b in zip(runs["dpo"], runs["graded1"]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["dpo"], runs["graded0999"]))


def test_single_token_fast_path_matches_sequence_logprobs(base_dir):
    pairs = make_pairs(PairConfig(n_per_rule=6, prompt_len=10, seed=2), LANG)
    model = rwasym.load(base_dir)
    pc, pr = pair_logprobs(model, pairs)
    for which, got in (("chosen", pc), ("rejected", pr)):
        tokens, mask = pairs.sequences(which)
        with torch.no_grad():
            torch.testing.assert_close(got, sequence_logprobs(model.bridge(tokens), tokens, mask))


def test_align_errors(base_dir):
    pairs = make_pairs(PairConfig(n_per_rule=4, prompt_len=10), LANG)
    model = rwasym.load(base_dir)
    with pytest.raises(RwasymError, match="needs a frozen reference"):
        align(model, None, pairs, AlignConfig(steps=1), **QUIET)
    with pytest.raises(RwasymError, match="objective must be one of"):
        align(model, model, pairs, AlignConfig(objective="ppo"), **QUIET)
    with pytest.raises(RwasymError, match="0 <= lam <= 1"):
        align(model, rwasym.load(base_dir), pairs, AlignConfig(objective="graded", lam=2.0), **QUIET)
    with pytest.raises(RwasymError, match="separate frozen copy"):
        align(model, model, pairs, AlignConfig(steps=1), **QUIET)
    big = PreferencePairs(pairs.prompt, pairs.chosen + 40, pairs.rejected)
    with pytest.raises(RwasymError, match="d_vocab=32"):
        align(model, rwasym.load(base_dir), big, AlignConfig(objective="sft", steps=1), **QUIET)


def test_sft_run_and_heldout_ce(base_dir, data):
    pairs = make_pairs(PairConfig(n_per_rule=40, prompt_len=10, cont_len=2), LANG)
    model = rwasym.load(base_dir)
    before = alignment_loss(model, pairs, AlignConfig(objective="sft")).item()
    align(model, None, pairs, AlignConfig(objective="sft", steps=10, batch_size=40, lr=3e-3, warmup_steps=1), **QUIET)
    assert alignment_loss(model, pairs, AlignConfig(objective="sft")).item() < before
    x = data[1]
    with torch.no_grad():
        manual = F.cross_entropy(model.bridge(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()
    assert heldout_ce(model, x, batch_size=7) == pytest.approx(manual, rel=1e-5)


# --------------------------------------------------------------------------- Hugging Face
def test_trains_a_hugging_face_gpt2(tmp_path):
    build_hf_model("gpt2", tmp_path / "hf")
    model = rwasym.load(tmp_path / "hf")
    tokens = torch.arange(3, 19).repeat(24, 2)  # (24, 32) a periodic, learnable corpus
    before = heldout_ce(model, tokens)
    result = pretrain(
        model,
        tokens,
        TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=1, n_checkpoints=1),
        out=tmp_path / "run",
        **QUIET,
    )
    assert heldout_ce(model, tokens) < before - 0.2
    loaded = rwasym.load(result.checkpoints[-1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.bridge(tokens[:2]), model.bridge(tokens[:2]))
    ref = rwasym.load(tmp_path / "hf")
    pairs = PreferencePairs(tokens[:16, :8], tokens[:16, 8:9], tokens[:16, 9:10])
    align(model, ref, pairs, AlignConfig(steps=3, batch_size=8, warmup_steps=1), **QUIET)
    assert mean_kl(model, ref, tokens[:4]) > 0


# ---------------------------------------------------------------------------- default pair
def test_default_pair_quick_builds_and_caches(tmp_path):
    base, tuned, info = default_pair(cache_dir=tmp_path, quick=True, progress=False)
    assert not info["cached"] and info["folder"].startswith(str(tmp_path))
    assert set(info["preference_accuracy"]) == {"induction", "class"}
    assert info["entropy"]["per_token"] < info["entropy"]["unigram"]
    assert base.d_vocab == 512 and base.n_layers == 2 and base.d_model == 128
    base2, tuned2, info2 = default_pair(cache_dir=tmp_path, quick=True, progress=False)
    assert info2["cached"] and info2["hash"] == info["hash"]
    assert all(torch.equal(a, b) for a, b in zip(params(tuned), params(tuned2)))
    assert not all(torch.equal(a, b) for a, b in zip(params(base), params(tuned)))


def test_gradient_accumulation_gives_the_same_update(base_dir):
    """batch_size 8 in one pass versus split into 2 and 4 micro-batches: the same DPO step (per-pair
    mean loss), to float32 rounding; the update itself is far larger than that."""
    pairs = make_pairs(replace(PairConfig(), n_per_rule=8, prompt_len=6, cont_len=2), LANG)
    cfg = replace(AlignConfig(), objective="dpo", steps=2, batch_size=8, warmup_steps=1, checkpoint_every=0)
    start = rwasym.load(base_dir).weight("blocks.0.attn.W_Q")
    after = {}
    for accum in (1, 2, 4):
        model, ref = rwasym.load(base_dir), rwasym.load(base_dir)
        result = align(model, ref, pairs, replace(cfg, grad_accum=accum), progress=False)
        after[accum] = (model.weight("blocks.0.attn.W_Q"), result.final_loss)
    moved = float((after[1][0] - start).abs().max())
    assert moved > 1e-4
    for accum in (2, 4):
        assert float((after[accum][0] - after[1][0]).abs().max()) <= 1e-3 * moved
        assert after[accum][1] == pytest.approx(after[1][1], rel=1e-5)
    with pytest.raises(RwasymError, match="grad_accum must be >= 1 and divide batch_size"):
        align(rwasym.load(base_dir), rwasym.load(base_dir), pairs, replace(cfg, grad_accum=3), progress=False)


# plain SGD (no clipping) on a small DPO set: the updates are exactly −Σ η g, so U_t = ΔW_t
SGD_PAIRS = replace(PairConfig(), n_per_rule=8, prompt_len=6, cont_len=2)
SGD_ALIGN = replace(AlignConfig(), objective="dpo", batch_size=8, grad_clip=0.0, optimizer="sgd", lr=0.5)


def test_sgd_step_is_the_hand_written_update_and_explains_its_delta(base_dir):
    """optimizer="sgd" (issue #29): one step equals W − η g written by hand (bit-exact: g from autograd on the
    same batch, η the schedule's), and with no momentum, weight decay or clipping cos(ΔW_t, −Σ_s η_s g_s) = 1 for
    every matrix over several steps (an exact identity), while AdamW's update is not its gradients' sum."""
    from rwasym.objectives import all_scores, objective_value, pack_pairs
    from rwasym.train.loops import UpdateTracker, _batches

    pairs = make_pairs(SGD_PAIRS, LANG)
    cfg = replace(SGD_ALIGN, steps=1, warmup_steps=2, checkpoint_every=0)
    model, ref = rwasym.load(base_dir), rwasym.load(base_dir)
    hand = rwasym.load(base_dir)
    align(model, ref, pairs, cfg, progress=False)
    # by hand: the same first batch, the same loss, W ← W − η g with η = lr_at(0) (warmup: lr · 1/2)
    packed = pack_pairs(hand, pairs)
    scores = all_scores(ref, packed)
    idx = next(_batches(len(pairs), cfg.batch_size, cfg.steps, cfg.seed))
    torch.manual_seed(cfg.seed)
    loss, _ = objective_value(hand, packed.take(idx), (scores[0][idx], scores[1][idx]), cfg)
    loss.backward()
    eta = lr_at(0, cfg)
    assert eta == 0.25
    with torch.no_grad():
        for p_hand, p_model in zip(hand.bridge.parameters(), model.bridge.parameters()):
            want = p_hand - eta * p_hand.grad if p_hand.grad is not None else p_hand
            assert torch.equal(want, p_model)
    # several SGD steps: ΔW_t = −Σ η_s g_s exactly
    sgd = align(rwasym.load(base_dir), ref, pairs, replace(cfg, steps=4, log_every=1, track_updates=True), **QUIET)
    cos = [v for k, v in sgd.history[-1].items() if k.startswith("update_cos/")]
    assert len(cos) == 6 and all(abs(c - 1.0) < 1e-9 for c in cos), sgd.history[-1]
    adam = replace(cfg, steps=4, log_every=1, track_updates=True, optimizer="adamw", lr=1e-3)
    adamw = align(rwasym.load(base_dir), ref, pairs, adam, **QUIET)
    assert all(v < 0.99 for k, v in adamw.history[-1].items() if k.startswith("update_cos/"))
    tracker = UpdateTracker(rwasym.load(base_dir))
    assert all(math.isnan(v) for v in tracker.cosines().values())  # nothing moved yet
    with pytest.raises(RwasymError, match="optimizer must be"):
        align(rwasym.load(base_dir), ref, pairs, replace(cfg, optimizer="lion"), **QUIET)


def test_trajectory_reports_the_update_sum_beside_delta(base_dir, data, tmp_path):
    """track_updates saves U_t = −Σ η g beside each checkpoint; the trajectory probes it against the same subspaces.
    Under plain SGD (no clipping, no decay) U_t = ΔW_t up to the float32 file, so r(U_t) = r(ΔW_t) and cos = 1."""
    from rwasym.studies.experiments import trajectory
    from rwasym.train import read_update_sum

    pairs = make_pairs(SGD_PAIRS, LANG)
    cfg = replace(SGD_ALIGN, steps=4, warmup_steps=1, checkpoint_every=2, track_updates=True)
    align(rwasym.load(base_dir), rwasym.load(base_dir), pairs, cfg, out=tmp_path / "run", **QUIET)
    saved = read_update_sum(tmp_path / "run" / "step_000004")
    assert saved is not None and len(saved) == len(rwasym.load(base_dir).matrices())
    rows = trajectory(rwasym.load(base_dir), tmp_path / "run", data[1][:8], k=4, null_samples=0)
    kinds = [r for r in rows if r["kind"] != "summary"]
    assert {r["step"] for r in kinds} == {2, 4} and len(kinds) == 12
    for r in kinds:
        assert r["update_cos"] == pytest.approx(1.0, abs=1e-6), r
        assert r["r_activation_update"] == pytest.approx(r["r_activation"], rel=1e-4), r
        assert r["r_prediction_update"] == pytest.approx(r["r_prediction"], rel=1e-4), r
    with pytest.raises(RwasymError, match="delta='given'"):
        rwasym.probe(rwasym.load(base_dir), None, data[1][:8], deltas=saved)


# ------------------------------------------------- issue #30: frozen non-matrices, padding, shuffled targets
def test_padded_ce_counts_only_real_targets_and_shuffling_keeps_the_target_multiset():
    from rwasym.objectives import next_token_ce, shuffled_targets

    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 32, (4, 12), generator=g)
    lengths = [12, 7, 9, 3]  # right padding with id 0
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    with torch.no_grad():
        logits = model.bridge(tokens).double()
        # the oracle: each row's real prefix by hand, token-weighted over the batch
        total = sum(F.cross_entropy(logits[i, : n - 1], tokens[i, 1:n], reduction="sum") for i, n in enumerate(lengths))
        expected = float(total) / sum(n - 1 for n in lengths)
        assert float(next_token_ce(model, tokens, pad_id=0)) == pytest.approx(expected, rel=1e-6)
        assert float(next_token_ce(model, tokens)) != pytest.approx(expected, rel=1e-3)  # pads counted: differs
        targets, valid = tokens[:, 1:], tokens[:, 1:] != 0
        shuffled = shuffled_targets(targets, valid, torch.Generator().manual_seed(5))
        assert torch.equal(shuffled[~valid], targets[~valid])  # padding stays where it is
        assert sorted(shuffled[valid].tolist()) == sorted(targets[valid].tolist())
        assert not torch.equal(shuffled, targets)
        by_hand = F.cross_entropy(logits[:, :-1][valid], shuffled[valid])
        got = next_token_ce(model, tokens, pad_id=0, shuffle=torch.Generator().manual_seed(5))
        assert float(got) == pytest.approx(float(by_hand), rel=1e-6)


def test_training_matrices_only_leaves_embeddings_and_norms_bit_identical(tmp_path):
    from rwasym.train.loops import hash_record

    build_hf_model("llama", tmp_path / "hf")
    model = rwasym.load(tmp_path / "hf")
    before = {n: p.detach().clone() for n, p in model.bridge.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.bridge.named_parameters()}
    tokens = torch.arange(3, 19).repeat(16, 2)
    tokens[:8, 20:] = 0
    cfg = TrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, train="matrices", pad_id=0, shuffle_targets=True)
    pretrain(model, tokens, cfg, **QUIET)
    matrices = {n for n in before if n.endswith("_proj._original_component.weight") and ".layers." in n}
    assert len(matrices) == 2 * 7
    for name, p in model.bridge.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in matrices), name  # embeddings, norms, lm_head: untouched; every matrix moved
        assert p.requires_grad == flags[name]  # the flags are given back
    ref = rwasym.load(tmp_path / "hf")
    pairs = PreferencePairs(tokens[:8, :8], tokens[:8, 8:10], tokens[8:16, 8:10])
    align(model, ref, pairs, AlignConfig(steps=2, batch_size=8, warmup_steps=1, train="matrices"), **QUIET)
    for name, p in model.bridge.named_parameters():
        assert (name in matrices) or torch.equal(p.detach(), before[name]), name
    # the new fields at their defaults do not change a cache key
    assert not {"train", "pad_id", "shuffle_targets"} & set(hash_record(TrainConfig()))
    assert hash_record(cfg)["train"] == "matrices"
    with pytest.raises(RwasymError, match="train must be 'all' or 'matrices'"):
        pretrain(model, tokens, TrainConfig(steps=1, train="embeddings"), **QUIET)


def test_scoring_batches_fit_the_logit_budget_and_do_not_change_scores(base_dir):
    from rwasym.objectives import LOGIT_BUDGET, scoring_batch

    assert scoring_batch(1000, 64, 262144) == 8 and scoring_batch(1000, 64, 49152) == 42
    assert scoring_batch(10, 8, 32) == 10 and scoring_batch(1000, 8, 32) == 256 and scoring_batch(5, 8, 32, 2) == 2
    assert 2 * 64 * 262144 * scoring_batch(1000, 64, 262144) <= LOGIT_BUDGET
    pairs = make_pairs(PairConfig(n_per_rule=20, prompt_len=10, cont_len=2), LANG)
    model = rwasym.load(base_dir)
    whole = pair_logprobs(model, pairs)
    for part, ref in zip(pair_logprobs(model, pairs, batch_size=7), whole):
        torch.testing.assert_close(part, ref, rtol=1e-6, atol=1e-6)
