"""Planted ground truths for the causal test (issue #28): tuned models whose behaviour we built by hand.

A tiny HF Llama base whose input to blocks.1.mlp.W_out (down_proj) is made anisotropic (hidden unit 7's
up_proj row × 8, so the top input principal direction v₁ carries ~25× the mean variance, as real models'
outlier directions do). Its tuned copy differs only in W_out by a planted ΔW:

- **true** — ΔW = 0.5 d v₁ᵀ + 2 N̂: the behaviour is carried by the rank-1 part along v₁ (d = the residual
  direction γ ⊙ (W_U[a] − W_U[b]) raising token a over b; each pair prefers a or b by the sign of v₁·x at its
  answer position, so the push along v₁ raises every margin), beside a larger behaviour-free N̂ (4 random
  outer products, outputs ⊥ d, inputs ⊥ v₁, ‖N̂‖_F = 1).
- **bigger** — ΔW = 0.5 r v₁ᵀ, r a random output direction: the top direction carries no planted behaviour,
  only more gain. The pairs prefer each prompt's least likely next token over its most likely, so any edit
  that flattens the output raises the margin: a bigger edit "wins" for that reason alone.

The sweep edits W_out along the top PC (target) against 19 random and 19 orthogonal controls. Endpoints,
fixed before the run: the preference margin; per planted seed (1, 2, 3: each its own model, pairs and
collateral text), the stratified exact rank test of `summarize` over the three seeds.
- true, KL-matched: the target ranks first in every seed (p at its floor (1/39)³) at each budget.
- bigger, norm-matched (the old default): also at the floor — fooled, since the top PC's edit moves the
  model ≥ 10× more (KL to the base, against the controls' median) than its equal-norm controls.
- bigger, KL-matched: not a win (stratified p > 0.05) at each budget. Observed per seed: rank p 1.0 /
  0.385 / 0.974 at KL 0.003 and 0.897 / 0.026 / 0.949 at KL 0.01 (seed 2 ranked first once, as an
  exchangeable target does with chance 1/39).
"""

import copy
import shutil

import pytest
import torch

from rwasym.analyses.sweep import summarize, sweep
from rwasym.data.pairs import PreferencePairs
from rwasym.testing import build_hf_model

SEEDS = (1, 2, 3)
BUDGETS = (0.003, 0.01)
DIRECTIONS = "pca:1,random:19,orthogonal:19"


def _unit(x: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    if against is not None:
        x = x - (x @ against) * against
    return x / x.norm()


def _plant(root, case: str, seed: int) -> dict:
    """Save base and tuned (module docstring) under root; return the pairs and the collateral text."""
    hf = build_hf_model("llama", root / "base")
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[7] *= 8.0
    hf.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 96, (24, 6), generator=g)
    collateral = torch.randint(3, 96, (8, 24), generator=g)

    def hidden(tokens):  # the input of W_out (down_proj) and the logits
        box = []
        handle = hf.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: box.append(a[0]))
        with torch.no_grad():
            logits = hf(tokens).logits
        handle.remove()
        return box[0].double(), logits

    acts, _ = hidden(collateral)  # the sweep's frames come from the collateral text too (its default)
    vals, vecs = torch.linalg.eigh(torch.cov(acts.reshape(-1, acts.shape[-1]).T))
    v1 = vecs[:, -1]
    gamma = hf.model.norm.weight.detach().double()
    w_u = hf.lm_head.weight.detach().double()
    at_answer, logits = hidden(prompts)
    if case == "true":
        a, b = 10, 20
        d = _unit(gamma * (w_u[a] - w_u[b]))
        side = at_answer[:, -1] @ v1 > 0
        chosen, rejected = torch.where(side, a, b), torch.where(side, b, a)
        n = sum(
            _unit(torch.randn(32, generator=g, dtype=torch.float64), d)[:, None]
            * _unit(torch.randn(48, generator=g, dtype=torch.float64), v1)[None]
            for _ in range(4)
        )
        delta = 0.5 * d[:, None] * v1[None] + 2.0 * n / n.norm()
    else:
        rejected, chosen = logits[:, -1].argmax(-1), logits[:, -1].argmin(-1)
        delta = 0.5 * _unit(torch.randn(32, generator=g, dtype=torch.float64))[:, None] * v1[None]
    tuned = copy.deepcopy(hf)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(delta.float())
    shutil.copytree(root / "base", root / "tuned")  # the tokenizer files
    tuned.save_pretrained(root / "tuned")
    pairs = PreferencePairs(prompt=prompts, chosen=chosen[:, None], rejected=rejected[:, None])
    return dict(pairs=pairs, collateral=collateral, top_ratio=float(vals[-1] / vals.mean()))


@pytest.fixture(scope="module", params=["true", "bigger"])
def planted(request, tmp_path_factory, one_thread):
    """Per case: the rows of a KL-matched and a norm-matched sweep of each planted seed."""
    out = {"kl": [], "norm": [], "ratio": []}
    for seed in SEEDS:
        root = tmp_path_factory.mktemp(f"{request.param}{seed}")
        p = _plant(root, request.param, seed)
        out["ratio"].append(p["top_ratio"])
        common = dict(
            matrices="blocks.1.mlp.W_out",
            directions=DIRECTIONS,
            data=p["collateral"],
            collateral=p["collateral"],
            seed=seed,
            progress=False,
        )
        for match, kw in (("kl", dict(kl_budgets=BUDGETS)), ("norm", dict(alphas=(1.0,)))):
            rows = sweep(
                root / "base", root / "tuned", p["pairs"], out=root / f"{match}.jsonl", match=match, **common, **kw
            )
            out[match] += rows
    return request.param, out


def _verdict(rows, **where):
    """The stratified test of the target against all 38 controls on the margin, over the three seeds."""
    summary = summarize(rows, metrics=["margin"], primary="margin")
    (row,) = [r for r in summary.rows if r["control"] == "control" and all(r.get(k) == v for k, v in where.items())]
    assert row["n_seeds"] == 3 and row["n_strata"] == 3 and row["n_control"] == 3 * 38
    return row


def test_planted_directions(planted):
    case, out = planted
    assert all(ratio > 10 for ratio in out["ratio"])  # the top PC really is the high-gain direction
    kl_rows = [r for r in out["kl"] if r["direction"] != "ceiling"]
    assert all(r["budget_reached"] for r in kl_rows)  # every edit at its budget (5%): a fair comparison
    for budget in BUDGETS:
        row = _verdict(out["kl"], kl_budget=budget)
        if case == "true":  # the true direction ranks first in every seed
            assert row["at_floor"] and row["p_value"] == pytest.approx((1 / 39) ** 3)
            assert all(s["rank_p"] == pytest.approx(1 / 39) for s in row["strata"])
        else:  # a bigger but behaviour-free direction is not called a win at equal collateral KL
            assert row["p_value"] > 0.05, row
    norm = _verdict(out["norm"], alpha=1.0)
    targets = [r for r in out["norm"] if r["direction"] == "pca"]
    controls = [r for r in out["norm"] if r["direction"] in ("random", "orthogonal")]
    if case == "bigger":  # the old test is fooled: at equal ‖ΔW v vᵀ‖_F the top PC moves everything more
        assert norm["at_floor"]
        median = sorted(c["kl_base"] for c in controls)[len(controls) // 2]
        assert min(t["kl_base"] for t in targets) > 10 * median
