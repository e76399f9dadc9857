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


def test_metrics_match_hand_written_oracles(pair):
    base, tuned = pair
    pairs = _pairs(ragged=True)
    text = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    seen = {}

    def mean_logit(logits, batch):
        seen["shapes"] = (tuple(logits.shape), tuple(batch.shape))
        return float(logits.double().mean())

    beta = 0.3
    ev = Evaluator(base, tuned, pairs, text=text, beta=beta, metrics=[mean_logit])
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


@pytest.mark.parametrize("case", ["multi", "single", "ragged", "text"])
def test_fast_path_equals_the_naive_loop(pair, case):
    base, tuned = pair
    pairs = {
        "multi": _pairs(),
        "single": _pairs(chosen=1, rejected=1),
        "ragged": _pairs(chosen=4, rejected=4, ragged=True),
        "text": _pairs(),
    }[case]
    text = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(3)) if case == "text" else None
    ev = Evaluator(base, tuned, pairs, text=text, metrics={"top": lambda l, b: float(l.max())})
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
