"""The bad-input table: each case raises RwasymError whose message names the problem and the fix,
and leaves nothing edited."""

import inspect

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.hooks.activations import capture
from rwasym.math.rank1 import closed_form_u


def _cfg(**kw):
    base = dict(
        d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=64, n_key_value_heads=2, d_mlp=48, seed=1
    )
    return rwasym.native_config(**{**base, **kw})


@pytest.fixture(scope="module")
def m():
    return rwasym.load(_cfg())


def _nan_tuned():
    t = rwasym.load(_cfg())
    with torch.no_grad():
        t.host_parameter("blocks.0.mlp.W_in")[0, 0] = float("nan")
    return t


def _missing_weights(tmp):
    rwasym.save_model(rwasym.load(_cfg()), tmp / "ck")
    (tmp / "ck" / "model.safetensors").unlink()
    return tmp / "ck"


def _corrupt_weights(tmp):
    rwasym.save_model(rwasym.load(_cfg()), tmp / "ck")
    (tmp / "ck" / "model.safetensors").write_bytes(b"garbage")
    return tmp / "ck"


CASES = {
    "layers differ": (
        lambda m, t: rwasym.weight_deltas(m, rwasym.load(_cfg(n_layers=3))),
        r"first unmatched one is blocks.2.attn.W_Q.*one architecture",
    ),
    "d_model differs": (
        lambda m, t: rwasym.weight_deltas(m, rwasym.load(_cfg(d_model=48, d_head=12))),
        r"differ at blocks.0.attn.W_Q",
    ),
    "vocab differs": (
        lambda m, t: rwasym.weight_deltas(m, rwasym.load(_cfg(d_vocab=80))),
        r"vocabulary sizes differ: base 64, tuned 80",
    ),
    "GQA heads differ": (
        lambda m, t: rwasym.weight_deltas(m, rwasym.load(_cfg(n_key_value_heads=4))),
        r"W_K.*2 heads.*4 heads",
    ),
    "NaN in tuned weights": (
        lambda m, t: rwasym.weight_deltas(m, _nan_tuned()),
        r"ΔW of blocks.0.mlp.W_in contains \d+ non-finite value.*NaN.*Check the checkpoint",
    ),
    "unknown matrix": (
        lambda m, t: m.weight("blocks.0.attn.W_Z"),
        r"unknown matrix name 'blocks.0.attn.W_Z'; valid names are: blocks.0.attn.W_Q",
    ),
    "unknown hook": (
        lambda m, t: capture(m, torch.zeros(1, 4, dtype=torch.long), sites=["blocks.0.hook_resid_typo"]),
        r"unknown hook name 'blocks.0.hook_resid_typo'; valid names include",
    ),
    "k = 0": (
        lambda m, t: rwasym.probe(m, m, torch.zeros(1, 4, dtype=torch.long), k=0),
        r"k=0 must be a positive integer subspace dimension, at most d_model",
    ),
    "k > dimension": (
        lambda m, t: rwasym.math.pca_basis(torch.eye(8, dtype=torch.float64), 9),
        r"k=9 exceeds the dimension",
    ),
    "empty data": (
        lambda m, t: capture(m, torch.zeros(0, 4, dtype=torch.long)),
        r"no tokens were captured.*pass at least one",
    ),
    "all padding": (
        lambda m, t: capture(
            m, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}
        ),
        r"fully masked",
    ),
    "token id >= vocab": (
        lambda m, t: capture(m, torch.full((1, 4), 64)),
        r"token ids must lie in \[0, 64\).*tokenized for another model",
    ),
    "float tokens": (lambda m, t: capture(m, torch.zeros(1, 4)), r"integer tensors shaped \(batch, pos\)"),
    "NaN weight write": (
        lambda m, t: m.set_weight("blocks.0.attn.W_Q", torch.full((32, 32), float("nan"))),
        r"the new value of blocks.0.attn.W_Q contains 1024 non-finite value.*1024 NaN",
    ),
    "NaN activations": (
        lambda m, t: rwasym.math.RunningCovariance(3).add(torch.tensor([[1.0, float("inf"), 0.0]])),
        r"non-finite value",
    ),
    "unsupported dtype": (
        lambda m, t: rwasym.load(_cfg(), dtype=torch.int8),
        r"unsupported dtype torch.int8; use one of",
    ),
    "missing folder": (lambda m, t: rwasym.load(t / "does-not-exist"), r"no such folder .*does-not-exist"),
    "missing weights file": (
        lambda m, t: rwasym.load(_missing_weights(t)),
        r"cannot read .*model.safetensors.*incomplete or corrupt",
    ),
    "corrupt weights file": (lambda m, t: rwasym.load(_corrupt_weights(t)), r"incomplete or corrupt"),
    "wrong shape write": (
        lambda m, t: m.set_weight("blocks.0.mlp.W_in", torch.zeros(32, 48)),
        r"shape \(n_out, n_in\) = \(48, 32\).*nn.Linear layout",
    ),
    "identical models": (
        lambda m, t: rwasym.math.relative_fraction(torch.zeros(4, 4), torch.eye(4)[:, :1], "input"),
        r"‖ΔW‖_F = 0.*identical",
    ),
    # inspect.unwrap: under jaxtyping's runtime checks (dev mode) the Literal annotation rejects it first
    "unknown side": (
        lambda m, t: inspect.unwrap(rwasym.math.relative_fraction)(torch.ones(4, 4), torch.eye(4)[:, :1], "left"),
        r"side must be one of \['input', 'output'\]",
    ),
    "non-unit direction": (
        lambda m, t: closed_form_u(torch.ones(4, 4), torch.ones(4)),
        r"must be a unit vector.*Normalise it",
    ),
    "head out of range": (
        lambda m, t: m.head_weight("blocks.0.attn.W_V", 3),
        r"head 3 is out of range for blocks.0.attn.W_V: it has 2 heads",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_named(case, m, tmp_path):
    before = m.state_fingerprint()
    call, pattern = CASES[case]
    with pytest.raises(RwasymError, match=pattern):
        call(m, tmp_path)
    after = m.state_fingerprint()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing left edited
