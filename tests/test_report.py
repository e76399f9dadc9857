"""Figures and tables show exactly the numbers of the result objects they are given."""

import math

import numpy as np
import pytest
import torch

import rwasym
from rwasym import report
from rwasym.math.spectra import lifecycle


@pytest.fixture(scope="module")
def probe_result(native_cfg):
    base, tuned = rwasym.load(native_cfg), rwasym.load(native_cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.bridge.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, 64, (8, 16), generator=g)
    return rwasym.probe(base, tuned, tokens, k=4, null_samples=20, heads=False, curve_null_samples=8)


def test_asymmetry_heatmap_shows_the_table(probe_result, tmp_path):
    fig = report.asymmetry_heatmap(probe_result, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 5000
    layers, kinds, grid = report.asymmetry_grid(probe_result.rows, "activation")
    assert kinds == ["W_Q", "W_K", "W_V", "W_in", "W_O", "W_out"] and layers == [0, 1]
    shown = fig.axes[0].images[0].get_array()
    expected = [
        [
            r["relative"]
            for k in kinds
            for r in probe_result.rows
            if r["layer"] == layer
            and r["kind"] == k
            and r["head"] is None
            and r["stream"] == "residual"
            and r["subspace"] == "activation"
        ]
        for layer in layers
    ]
    assert np.allclose(np.asarray(shown), np.asarray(expected))


def test_rk_curves_and_lines(probe_result, tmp_path):
    fig = report.rk_curves(probe_result, tmp_path / "rk.png")
    ax = fig.axes[0]
    c = next(c for c in probe_result.curves if c["subspace"] == "activation" and c["kind"] == "W_Q" and c["layer"] == 0)
    line = next(l for l in ax.get_lines() if l.get_label() == "L0 W_Q")
    assert list(line.get_ydata()) == pytest.approx(c["relative"])
    rows = [dict(step=s, r=1 + s / 10, m="W_Q") for s in (3, 1, 2)]
    fig = report.line_plot(rows, "step", "r", "m", tmp_path / "line.png", hline=1.0)
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == pytest.approx([1.1, 1.2, 1.3])


def test_singular_value_heatmap_and_tables(tmp_path):
    W = {
        0: {"blocks.0.attn.W_Q": torch.diag(torch.tensor([4.0, 2.0, 1.0]))},
        5: {"blocks.0.attn.W_Q": torch.diag(torch.tensor([8.0, 1.0, 0.5]))},
    }
    fig = report.singular_value_heatmap(lifecycle(W), "blocks.0.attn.W_Q", tmp_path / "sv.png")
    grid = np.asarray(fig.axes[0].images[0].get_array())
    assert grid[1, 0] == pytest.approx(math.log10(8.0))
    md = report.markdown_table([{"a": 1.23456, "b": None}], ["a", "b"])
    assert md.splitlines()[2] == "| 1.23 |  |"
    out = report.write_json({"x": torch.tensor([1.0, 2.0])}, tmp_path / "r.json")
    assert out.read_text().replace(" ", "").replace("\n", "") == '{"x":[1.0,2.0]}'
