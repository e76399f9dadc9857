"""A long capture survives a crash: killed mid-way (SIGKILL in a subprocess), rerun with the same
checkpoint file, it ends with the same sums, bit for bit, as an uninterrupted capture."""

import signal
import subprocess
import sys

import pytest
import torch

import rwasym
from rwasym import RwasymError
from rwasym.hooks.activations import capture

CFG = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=64, n_key_value_heads=2, d_mlp=48, seed=1)
CHILD = f"""
import os, signal, sys, torch, rwasym
from rwasym.hooks.activations import capture
model = rwasym.load(rwasym.native_config(**{CFG!r}))
tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
kill_after, calls, forward = int(sys.argv[2]), [0], model.bridge.forward
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] > kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a crash
    return forward(*args, **kwargs)
model.bridge.forward = dying
capture(model, tokens, batch_size=2, checkpoint=sys.argv[1], checkpoint_every=1, progress=False)
"""


def _counting(model):
    calls, forward = [0], model.bridge.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.bridge.forward = counted
    return calls


@pytest.mark.integration
def test_killed_capture_resumes_to_the_uninterrupted_result(tmp_path):
    path = tmp_path / "acts.safetensors"
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), "3"], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.exists()
    model = rwasym.load(rwasym.native_config(**CFG))
    tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    reference = capture(model, tokens, batch_size=2, progress=False)
    calls = _counting(model)
    resumed = capture(model, tokens, batch_size=2, checkpoint=path, checkpoint_every=1, progress=False)
    assert calls[0] == 6 - 3  # only the batches the killed run had not written
    assert resumed.n_tokens == reference.n_tokens == 12 * 16
    for hook, acc in reference.stats.items():
        assert torch.equal(resumed.stats[hook].state_dict()["sum_outer"], acc.state_dict()["sum_outer"]), hook
        assert torch.equal(resumed.stats[hook].state_dict()["sum"], acc.state_dict()["sum"]), hook
    assert resumed.stats["blocks.0.hook_out"] is resumed.stats["blocks.1.hook_in"]  # the sharing survives
    again = capture(model, tokens, batch_size=2, checkpoint=path, progress=False)  # finished: no forward
    assert calls[0] == 3 and torch.equal(
        again.stats["blocks.1.mlp.out.hook_in"].covariance(), reference.stats["blocks.1.mlp.out.hook_in"].covariance()
    )


def test_mismatched_or_corrupt_checkpoints_are_refused(tmp_path):
    model = rwasym.load(rwasym.native_config(**CFG))
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "acts.safetensors"
    capture(model, tokens, batch_size=2, checkpoint=path, progress=False)
    with pytest.raises(RwasymError, match="belongs to another capture.*data"):
        capture(model, tokens + 1, batch_size=2, checkpoint=path, progress=False)
    with pytest.raises(RwasymError, match="belongs to another capture.*batch_size"):
        capture(model, tokens, batch_size=4, checkpoint=path, progress=False)
    other = rwasym.load(rwasym.native_config(**{**CFG, "seed": 2}))
    with pytest.raises(RwasymError, match="belongs to another capture.*weights"):
        capture(other, tokens, batch_size=2, checkpoint=path, progress=False)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(RwasymError, match="cannot be read.*delete it"):
        capture(model, tokens, batch_size=2, checkpoint=path, progress=False)
    with pytest.raises(RwasymError, match="needs data it can hash"):
        capture(model, iter([tokens]), checkpoint=tmp_path / "b.safetensors", progress=False)
    with pytest.raises(RwasymError, match="must be a .safetensors file"):
        capture(model, tokens, checkpoint=tmp_path / "b.pt", progress=False)


# -- gradient captures ------------------------------------------------------------------------
GRAD_CHILD = f"""
import os, signal, sys, torch, rwasym
model = rwasym.load(rwasym.native_config(**{CFG!r}))
tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
loss_fn, batches = rwasym.objective_batches("ce", tokens, batch_size=2, n_batches=6)
kill_after, calls = int(sys.argv[2]), [0]
def dying(model, batch):
    calls[0] += 1
    if calls[0] > kill_after:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a crash
    return loss_fn(model, batch)
dying.__qualname__ = loss_fn.__qualname__
rwasym.capture_gradients(model, dying, batches, checkpoint=sys.argv[1], checkpoint_every=1,
                         checkpoint_key={{"objective": "ce"}}, progress=False)
"""


@pytest.mark.integration
def test_killed_gradient_capture_resumes_to_the_uninterrupted_result(tmp_path):
    path = tmp_path / "grads.safetensors"
    child = subprocess.run([sys.executable, "-c", GRAD_CHILD, str(path), "4"], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.exists()
    model = rwasym.load(rwasym.native_config(**CFG))
    tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    loss_fn, batches = rwasym.objective_batches("ce", tokens, batch_size=2, n_batches=6)
    reference = rwasym.capture_gradients(model, loss_fn, batches, progress=False)
    calls = [0]

    def counted(model, batch):
        calls[0] += 1
        return loss_fn(model, batch)

    counted.__qualname__ = loss_fn.__qualname__
    kw = dict(checkpoint=path, checkpoint_every=1, checkpoint_key={"objective": "ce"}, progress=False)
    resumed = rwasym.capture_gradients(model, counted, batches, **kw)
    assert calls[0] == 6 - 4 and resumed.n_batches == reference.n_batches == 6
    for name in reference.G:
        assert torch.equal(resumed.G[name], reference.G[name]), name
        for part in ("inputs", "grads"):
            got, want = getattr(resumed, part)[name].state_dict(), getattr(reference, part)[name].state_dict()
            assert got["count"] == want["count"] and torch.equal(got["sum_outer"], want["sum_outer"]), (name, part)
    again = rwasym.capture_gradients(model, counted, batches, **kw)  # finished: no backward pass
    assert calls[0] == 2 and all(torch.equal(again.G[n], reference.G[n]) for n in reference.G)
    # refused, with nothing computed: other batches, other key, other weights, too many batches, a damaged file
    with pytest.raises(RwasymError, match="other batches"):
        rwasym.capture_gradients(model, counted, [b + 1 for b in batches], **kw)
    with pytest.raises(RwasymError, match="belongs to another capture.*key"):
        rwasym.capture_gradients(model, counted, batches, **{**kw, "checkpoint_key": {"objective": "dpo"}})
    other = rwasym.load(rwasym.native_config(**{**CFG, "seed": 2}))
    with pytest.raises(RwasymError, match="belongs to another capture.*weights"):
        rwasym.capture_gradients(other, counted, batches, **kw)
    with pytest.raises(RwasymError, match="finished after 6 batches"):
        rwasym.capture_gradients(model, counted, batches + batches[:1], **kw)
    with pytest.raises(RwasymError, match="holds 6 batches but only 5"):
        rwasym.capture_gradients(model, counted, batches[:5], **kw)
    assert calls[0] == 2
    with pytest.raises(RwasymError, match="must be JSON"):
        rwasym.capture_gradients(model, counted, batches, **{**kw, "checkpoint_key": object()})
    with pytest.raises(RwasymError, match="cannot hash a batch"):
        rwasym.capture_gradients(model, counted, [object()], **{**kw, "checkpoint": tmp_path / "x.safetensors"})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RwasymError, match="cannot be read.*delete it"):
        rwasym.capture_gradients(model, counted, batches, **kw)


def test_batch_digest_tells_batches_apart():
    from rwasym.data import PreferencePairs
    from rwasym.hooks.gradients import batch_digest

    t = torch.arange(6).view(2, 3)
    assert batch_digest(t) == batch_digest(t.clone()) != batch_digest(t.T.contiguous())
    assert batch_digest(t) != batch_digest(t.float()) and batch_digest(t) != batch_digest(t.view(3, 2))
    assert batch_digest({"a": t, "b": 1}) == batch_digest({"b": 1, "a": t}) != batch_digest({"a": t, "b": 2})
    p = PreferencePairs(prompt=t, chosen=t + 1, rejected=t + 2)
    q = PreferencePairs(prompt=t, chosen=t + 2, rejected=t + 1)
    assert batch_digest(p) != batch_digest(q) and batch_digest((t, None)) != batch_digest((t,))
