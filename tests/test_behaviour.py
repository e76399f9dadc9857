"""Behavioural metrics against hand-written oracles, and the fast batched path against the naive loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

import rwasym
from rwasym import RwasymError
from rwasym.analyses import behaviour
from rwasym.analyses.behaviour import Evaluator, as_eval_set
from rwasym.data.pairs import PreferencePairs
from rwasym.testing import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(model, scale=0.05, seed=0):
    return perturb(copy.deepcopy(model), scale, seed)


@pytest.fixture(scope="module")
def pair(native_cfg):
    base = rwasym.load(native_cfg)
    return base, _perturbed(base)


def _pairs(n=6, prompt=8, chosen=3, rejected=3, vocab=64, seed=0, ragged=False):
    """Pairs; ragged: prompts of two lengths, chosen right-padded, rejected kept shorter (≤ 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        prompt=torch.randint(3, vocab, (n, prompt), generator=g),
        chosen=torch.randint(3, vocab, (n, chosen), generator=g),
        rejected=torch.randint(3, vocab, (n, rejected), generator=g),
    )
    if ragged:  # right-padded responses and prompts of different lengths
        kw["prompt_mask"] = torch.arange(prompt)[None, :] < torch.tensor([prompt, prompt - 2] * (n // 2))[:, None]
        kw["chosen_mask"] = torch.arange(chosen)[None, :] < torch.tensor([chosen, 1] * (n // 2))[:, None]
        kw["rejected_mask"] = torch.arange(rejected)[None, :] < torch.tensor([2, 1] * (n // 2))[:, None]
    return PreferencePairs(**kw)


def _oracle_logps(model, pairs, which):
    """Σ log p(response token) from a full forward, written independently of rwasym.analyses.behaviour."""
    out = []
    for i in range(len(pairs)):
        plen = len(pairs.prompt[i]) if pairs.prompt_mask is None else int(pairs.prompt_mask[i].sum())
        resp = getattr(pairs, which)[i]
        mask = getattr(pairs, f"{which}_mask")
        resp = resp if mask is None else resp[mask[i]]
        seq = torch.cat([pairs.prompt[i, :plen], resp])[None]
        with torch.no_grad():
            logp = model.bridge(seq)[0].double().log_softmax(-1)
        out.append(sum(float(logp[plen - 1 + j, int(t)]) for j, t in enumerate(resp)))
    return torch.tensor(out, dtype=torch.float64)


# the default budget (everything in one chunk, references kept whole) and the smallest (one row per chunk,
# references recomputed from the final hidden state): the chunked path of a 262k vocabulary, on a small model
BUDGETS = {"whole": {}, "chunked": dict(logit_bytes=1, reference_bytes=0)}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_metrics_match_hand_written_oracles(pair, budget):
    base, tuned = pair
    pairs = _pairs(ragged=True)
    text = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    seen = {}

    def mean_logit(logits, batch):
        seen["shapes"] = (tuple(logits.shape), tuple(batch.shape))
        return float(logits.double().mean())

    beta = 0.3
    ev = Evaluator(base, tuned, pairs, text=text, beta=beta, metrics=[mean_logit], **BUDGETS[budget])
    assert {r.mode for r in ev._ref_text.values()} == {"whole" if budget == "whole" else "hidden"}
    edited = _perturbed(base, scale=0.1, seed=7)
    got = ev.measure(edited)
    pc, pr = _oracle_logps(edited, pairs, "chosen"), _oracle_logps(edited, pairs, "rejected")
    rc, rr = _oracle_logps(base, pairs, "chosen"), _oracle_logps(base, pairs, "rejected")
    margins = beta * ((pc - rc) - (pr - rr))
    assert got["margin"] == pytest.approx(float(margins.mean()), abs=1e-6)
    assert got["reward_accuracy"] == float((margins > 0).double().mean())
    assert got["accuracy"] == float((pc > pr).double().mean())
    with torch.no_grad():
        logits = edited.bridge(text).double()
        ref_b, ref_t = base.bridge(text).double(), tuned.bridge(text).double()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 64), text[:, 1:].reshape(-1))
    assert got["ce"] == pytest.approx(float(ce), abs=1e-6)
    for name, ref in (("kl_base", ref_b), ("kl_tuned", ref_t)):
        kl = F.kl_div(ref[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1), log_target=True, reduction="none")
        assert got[name] == pytest.approx(float(kl.sum(-1).mean()), abs=1e-7)  # KL(edited ‖ ref)
    assert got["mean_logit"] == pytest.approx(float(logits.mean()), abs=1e-6)
    assert seen["shapes"] == ((3, 9, 64), (3, 9))
    # references and gap fractions: the tuned model recovers (transplant) the whole gap
    assert ev.reference["base"]["margin"] == 0 and ev.reference["base"]["kl_base"] == pytest.approx(0, abs=1e-12)
    gaps = ev.gap_fractions(ev.measure(tuned), "transplant")
    assert gaps["gap_margin"] == pytest.approx(1.0) and gaps["gap_ce"] == pytest.approx(1.0)
    assert ev.gap_fractions(ev.measure(base), "ablate")["gap_margin"] == pytest.approx(1.0)
    assert "gap_kl_base" not in gaps


@pytest.mark.parametrize("case", ["multi", "single", "ragged", "text", "text-chunked"])
def test_fast_path_equals_the_naive_loop(pair, case):
    base, tuned = pair
    pairs = {
        "multi": _pairs(),
        "single": _pairs(chosen=1, rejected=1),
        "ragged": _pairs(chosen=4, rejected=4, ragged=True),
        "text": _pairs(),
        "text-chunked": _pairs(chosen=4, rejected=4, ragged=True),
    }[case]
    text = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(3)) if "text" in case else None
    budget = BUDGETS["chunked" if case.endswith("chunked") else "whole"]
    ev = Evaluator(base, tuned, pairs, text=text, metrics={"top": lambda l, b: float(l.max())}, **budget)
    g = torch.Generator().manual_seed(2)
    for host, name in ((base, "blocks.1.attn.W_V"), (tuned, "blocks.0.attn.W_O"), (base, "blocks.1.mlp.W_out")):
        spec = host.matrix(name)
        U = torch.randn(3, spec.n_out, dtype=torch.float64, generator=g)
        V = torch.randn(3, spec.n_in, dtype=torch.float64, generator=g)
        fast = ev.measure_edits(host, name, U, V)
        for e in range(3):
            naive_model = copy.deepcopy(host)  # the naive loop: copy, write the weight, full forward
            naive_model.set_weight(name, naive_model.weight(name) + torch.outer(U[e], V[e]))
            naive = ev.measure(naive_model)
            assert fast[e].keys() == naive.keys()
            for key in naive:
                assert fast[e][key] == pytest.approx(naive[key], abs=2e-6), (name, e, key)
    assert any(r.reuse for r in ev._runners.values())  # the layer-1 edits used the cached prefix


def test_fast_path_on_a_gqa_hf_model_and_fallback(hf_folder, monkeypatch):
    base = rwasym.load(hf_folder["llama"][0])
    tuned = _perturbed(base, scale=0.02)
    pairs = _pairs(vocab=96)
    spec = base.matrix("blocks.1.attn.W_K")
    g = torch.Generator().manual_seed(4)
    U = torch.randn(2, spec.n_out, dtype=torch.float64, generator=g)
    V = torch.randn(2, spec.n_in, dtype=torch.float64, generator=g)

    def naive(e):
        m = copy.deepcopy(base)
        m.set_weight(spec.name, m.weight(spec.name) + torch.outer(U[e], V[e]))
        return ev.measure(m)

    ev = Evaluator(base, tuned, pairs)
    fast = ev.measure_edits(base, spec.name, U, V)
    assert next(iter(ev._runners.values())).reuse
    for e in range(2):
        assert fast[e] == pytest.approx(naive(e), abs=2e-6)

    def unsupported(*args, **kwargs):
        raise behaviour._PrefixUnsupported("simulated")

    monkeypatch.setattr(behaviour, "_expand", unsupported)
    ev = Evaluator(base, tuned, pairs)
    with pytest.warns(UserWarning, match="falling back to full forward passes"):
        fast = ev.measure_edits(base, spec.name, U, V)
    assert not next(iter(ev._runners.values())).reuse
    assert fast[1] == pytest.approx(naive(1), abs=2e-6)


def test_eval_set_inputs_and_errors(pair, tmp_path):
    base, tuned = pair
    pairs = _pairs()
    pairs.save(tmp_path / "pairs.safetensors")
    a = as_eval_set(tmp_path / "pairs.safetensors")
    b = as_eval_set({"prompt": pairs.prompt, "chosen": pairs.chosen, "rejected": pairs.rejected}, max_pairs=4)
    assert torch.equal(a.chosen[:4], b.chosen) and b.chosen.shape == (4, 11)
    assert torch.equal(a.text, a.chosen)  # default text: prompt + chosen
    lines = [
        f'{{"prompt": {p.tolist()}, "chosen": {c.tolist()}, "rejected": {r.tolist()}}}'
        for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    assert torch.equal(as_eval_set(tmp_path / "pairs.jsonl").rejected, a.rejected)
    with pytest.raises(RwasymError, match="need prompt, chosen and rejected"):
        as_eval_set({"prompt": pairs.prompt})
    with pytest.raises(RwasymError, match=r"token ids must lie in \[0, 64\)"):
        Evaluator(base, tuned, _pairs(vocab=100, seed=3))
    with pytest.raises(RwasymError, match="mode must be one of"):
        Evaluator(base, tuned, pairs).gap_fractions({}, "swap")


def _hand_collateral(edited, host, tokens):
    """Mean per-token KL(edited ‖ host) and the CE change on ``tokens`` (every position but the last), by hand."""
    with torch.no_grad():
        lp = edited.bridge(tokens).double().log_softmax(-1)[:, :-1]
        lh = host.bridge(tokens).double().log_softmax(-1)[:, :-1]
    kl = F.kl_div(lh, lp, log_target=True, reduction="none").sum(-1).mean()
    nll = lambda logp: -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).mean()  # noqa: E731
    return float(kl), float(nll(lp) - nll(lh))


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_collateral_cost_and_ceiling_match_a_hand_computation(pair, budget):
    """iter_collateral (batched edits, cached prefix) and measure_weights equal KL / ΔCE written by hand on a
    copy carrying the edit, whether the evaluation runs whole or one row per chunk with recomputed references."""
    base, tuned = pair
    collateral = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(9))
    ev = Evaluator(base, tuned, _pairs(), collateral=collateral, **BUDGETS[budget])
    g = torch.Generator().manual_seed(1)
    name = "blocks.1.mlp.W_out"
    spec = base.matrix(name)
    edits = [
        {name: (torch.randn(1, spec.n_out, generator=g), torch.randn(1, spec.n_in, generator=g))} for _ in range(3)
    ]
    for host in (base, tuned):
        got = list(ev.iter_collateral(host, edits))
        for e, edit in enumerate(edits):
            U, V = edit[name]
            edited = copy.deepcopy(host)
            edited.set_weight(name, edited.weight(name) + (U.T.double() @ V.double()))
            kl, dce = _hand_collateral(edited, host, collateral)
            assert got[e]["collateral_kl"] == pytest.approx(kl, rel=1e-5, abs=1e-9)
            assert got[e]["collateral_dce"] == pytest.approx(dce, abs=1e-6)
    ceiling = ev.measure_weights(base, tuned, [name])
    donor = copy.deepcopy(base)
    donor.set_weight(name, tuned.weight(name))
    kl, dce = _hand_collateral(donor, base, collateral)
    assert ceiling["collateral_kl"] == pytest.approx(kl, rel=1e-5) and ceiling["collateral_dce"] == pytest.approx(
        dce, abs=1e-6
    )
    assert ceiling["margin"] == pytest.approx(ev.measure(donor)["margin"], abs=1e-9)


def test_reference_modes_agree(pair, monkeypatch):
    """A reference kept whole, recomputed from the final hidden state, or (where the unembedding does not
    reproduce the forward's logits) recomputed by plain forwards serves the same log-probabilities."""
    base, _ = pair
    tokens = torch.randint(3, 64, (5, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, 5:] = False
    whole = behaviour._Reference(base, tokens, mask, step=2)
    hidden = behaviour._Reference(base, tokens, mask, step=2, keep=0)
    assert (whole.mode, hidden.mode) == ("whole", "hidden") and hidden.kept.shape == (5, 6, base.cfg.d_model)
    plain = behaviour._forward  # a forward whose logits are not the unembedding's (a soft cap after it, say)
    monkeypatch.setattr(
        behaviour, "_forward", lambda *a, **kw: (lambda lg, h: (30 * torch.tanh(lg / 30), h))(*plain(*a, **kw))
    )
    forward = behaviour._Reference(base, tokens, mask, step=2, keep=0)
    monkeypatch.undo()
    assert forward.mode == "forward" and forward.kept is None
    for rows in (slice(0, 2), slice(2, 5)):
        assert torch.allclose(hidden.logp(rows), whole.logp(rows), atol=1e-6)
        assert torch.allclose(forward.logp(rows), whole.logp(rows), atol=1e-6)


def test_rows_per_chunk():
    # 262,144 tokens × 64 positions, 4 edits, 2 references: 1,040 bytes an entry → one row per GiB
    assert behaviour.rows_per_chunk(100, 64, 262_144, 4, 2) == 1
    assert behaviour.rows_per_chunk(100, 64, 49_152, 4, 2) == 1024**3 // (64 * 49_152 * 48)
    assert behaviour.rows_per_chunk(3, 8, 64, 1, 0) == 3 and behaviour.rows_per_chunk(9, 8, 64, 1, 0, budget=0) == 1


def test_without_text_metrics_only_the_responses_are_scored(pair):
    """text_metrics=False: no text stream, no ce / kl_*; the margin and accuracies still equal the hand-written
    oracle (plain path) and the naive loop (fast path: pair streams with response-only unembedding)."""
    base, tuned = pair
    pairs = _pairs(chosen=4, rejected=4, ragged=True)
    ev = Evaluator(base, tuned, pairs, beta=0.3, text_metrics=False, logit_bytes=1)
    assert not any(st.text for st in ev.streams) and all(st.select is not None for st in ev.streams)
    edited = _perturbed(base, scale=0.1, seed=7)
    got = ev.measure(edited)
    assert set(got) == {"margin", "reward_accuracy", "accuracy"}
    pc, pr = _oracle_logps(edited, pairs, "chosen"), _oracle_logps(edited, pairs, "rejected")
    rc, rr = _oracle_logps(base, pairs, "chosen"), _oracle_logps(base, pairs, "rejected")
    assert got["margin"] == pytest.approx(float((0.3 * ((pc - rc) - (pr - rr))).mean()), abs=1e-6)
    assert got["accuracy"] == float((pc > pr).double().mean())
    name = "blocks.1.attn.W_V"
    spec = base.matrix(name)
    g = torch.Generator().manual_seed(3)
    U = torch.randn(2, spec.n_out, dtype=torch.float64, generator=g)
    V = torch.randn(2, spec.n_in, dtype=torch.float64, generator=g)
    fast = ev.measure_edits(base, name, U, V)
    for e in range(2):
        naive = copy.deepcopy(base)
        naive.set_weight(name, naive.weight(name) + torch.outer(U[e], V[e]))
        assert fast[e] == pytest.approx(ev.measure(naive), abs=2e-6)
    with pytest.raises(RwasymError, match="keep text_metrics"):
        Evaluator(base, tuned, pairs, text_metrics=False, metrics=[lambda logits, batch: 0.0])
