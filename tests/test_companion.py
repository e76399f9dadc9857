"""Model-level companion analyses against direct recomputation."""

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.analyses.companion import (
    geometry,
    lifecycle_from_checkpoints,
    post_training_report,
    reconstruction_experiment,
)
from rwasym.math.spectra import lifecycle, rankme
from rwasym.math.svd import post_training_svd
from rwasym.testing import perturb


@pytest.fixture(scope="module")
def pair(native_cfg):
    return rwasym.load(native_cfg), perturb(rwasym.load(native_cfg), 0.05, seed=4, every_parameter=True)


def test_post_training_report_matches_direct(pair):
    base, tuned = pair
    rep = post_training_report(base, tuned, k=4)
    row = next(r for r in rep["rows"] if r["matrix"] == "blocks.1.mlp.W_out")
    direct = post_training_svd(base.weight("blocks.1.mlp.W_out"), tuned.weight("blocks.1.mlp.W_out"), 4)
    assert row["consistency"] == pytest.approx(direct.consistency, rel=1e-12)
    kinds = rep["by_kind"]
    sel = [r["ratio_mean"] for r in rep["rows"] if r["kind"] == "W_Q"]
    assert kinds["W_Q"]["ratio_mean"] == pytest.approx(sum(sel) / len(sel))


def test_reconstruction_tuned_mode_reproduces_tuned_and_restores(pair):
    base, tuned = pair
    tokens = torch.randint(0, 64, (2, 8))

    def logits_sum(m):
        with torch.no_grad():
            return float(m.bridge(tokens).double().square().sum())

    before = tuned.state_fingerprint()
    rows = {r["mode"]: r["metric"] for r in reconstruction_experiment(base, tuned, logits_sum)}
    assert rows["tuned"] == pytest.approx(rows["tuned_as_is"], rel=1e-5)
    assert rows["break_consistency"] != pytest.approx(rows["tuned_as_is"], rel=1e-3)
    assert all(torch.equal(before[n], t) for n, t in tuned.state_fingerprint().items())
    with pytest.raises(RwasymError, match="unknown rebuild mode"):
        reconstruction_experiment(base, tuned, logits_sum, modes=["nope"])


def test_geometry_rankme_matches_cached_activations(pair):
    base, tuned = pair
    tokens = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    rows = geometry({"base": base, "tuned": tuned}, tokens, layers=[1])
    assert [(r["checkpoint"], r["layer"]) for r in rows] == [("base", 1), ("tuned", 1)]
    _, cache = base.bridge.run_with_cache(tokens)
    Z = cache["blocks.1.hook_out"].reshape(-1, 32).double()
    assert rows[0]["rankme"] == pytest.approx(rankme(Z), rel=1e-8)


def test_lifecycle_from_checkpoint_folders(pair, tmp_path):
    base, tuned = pair
    rwasym.save_model(base, tmp_path / "step_000000", meta={"step": 0})
    rwasym.save_model(tuned, tmp_path / "step_000010", meta={"step": 10})
    lc = lifecycle_from_checkpoints(tmp_path, top_k=3)
    direct = lifecycle(
        {
            0: {s.name: base.weight(s.name) for s in base.matrices()},
            10: {s.name: tuned.weight(s.name) for s in tuned.matrices()},
        },
        top_k=3,
    )
    assert lc.to_rows() == direct.to_rows()
    with pytest.raises(RwasymError, match="no checkpoint folders"):
        lifecycle_from_checkpoints(tmp_path / "nothing")
