"""The checkpoint audit (`rwasym.models.audit`, `rwasym audit`) and the identical / unchanged checks the probe and the
spectra series run. Oracles: SHA-256 of each tensor's bytes taken from the tensor itself (torch → numpy bytes, or
the gguf reader's memory map), hand-made folders with a known list of changes, a hub-cache layout with a
duplicated revision, and ΔW = 0 found by explicit subtraction."""

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import rwasym
from rwasym import RwasymError
from rwasym.analyses.companion import lifecycle_from_checkpoints
from rwasym.app.cli import main
from rwasym.models.audit import audit, fingerprint, unchanged_between, unchanged_matrices
from rwasym.models.checkpoint import CheckpointWeights
from rwasym.testing import build_hf_model

CHANGED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def _bytes_sha(t: torch.Tensor) -> str:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base; same (a copy); tuned (CHANGED perturbed); odd (one tensor bf16, one reshaped, one dropped, one added);
    sharded (base saved in shards)."""
    root = tmp_path_factory.mktemp("audit")
    hf = build_hf_model("llama", root / "base")
    shutil.copytree(root / "base", root / "same")
    shutil.copytree(root / "base", root / "tuned")
    state = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if k in CHANGED else v) for k, v in state.items()}
    save_file(tuned, str(root / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    odd = dict(tuned)
    odd["model.layers.0.mlp.up_proj.weight"] = odd["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    odd["model.norm.weight"] = odd["model.norm.weight"][:16]
    odd.pop("model.layers.1.input_layernorm.weight")
    odd["extra.bias"] = torch.zeros(3)
    (root / "odd").mkdir()
    save_file(odd, str(root / "odd" / "model.safetensors"))
    hf.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root, state, tuned


def test_fingerprint_hashes_every_tensor_and_shards_agree(folders):
    """Each tensor's SHA-256 equals that of its bytes taken from the loaded tensor; a sharded save of the same
    model has the same tensors, hashes and content hash."""
    root, state, _ = folders
    fp = fingerprint(root / "base")
    assert set(fp.tensors) == set(state) and fp.format == "safetensors"
    for name, t in state.items():
        rec = fp.tensors[name]
        assert rec.sha256 == _bytes_sha(t) and rec.shape == tuple(t.shape) and rec.dtype == "F32"
        assert rec.nbytes == t.numel() * 4
    sharded = fingerprint(root / "sharded")
    assert len(sharded.files) > 1 and sharded.tensors == fp.tensors and sharded.sha256 == fp.sha256


def test_audit_flags_each_planted_difference(folders, tmp_path):
    root, state, _ = folders
    res = audit([root / "base", root / "same", root / "tuned", root / "odd"], progress=False)
    kinds = {(f.kind, f.checkpoints): f for f in res.findings}
    assert kinds[("identical", (0, 1))].severity == "error" and not res.ok
    unchanged = kinds[("unchanged", (1, 2))]
    assert set(unchanged.tensors) == set(state) - set(CHANGED)  # exactly the tensors left alone
    assert kinds[("missing", (2, 3))].tensors == ("model.layers.1.input_layernorm.weight",)
    assert kinds[("extra", (2, 3))].tensors == ("extra.bias",)
    assert kinds[("shape", (2, 3))].tensors == ("model.norm.weight",) and kinds[("shape", (2, 3))].severity == "error"
    assert kinds[("dtype", (2, 3))].tensors == ("model.layers.0.mlp.up_proj.weight",)
    # tuned → odd: every common tensor but the three altered ones is unchanged
    altered = {"model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"}
    assert set(kinds[("unchanged", (2, 3))].tensors) == set(state) - altered
    assert ("unchanged", (0, 1)) not in kinds  # an identical pair is reported once, as identical
    doc = json.loads(res.to_json())
    assert doc["ok"] is False and len(doc["findings"]) == len(res.findings)
    assert doc["checkpoints"][2]["tensors"][CHANGED[0]]["sha256"] == _bytes_sha(folders[2][CHANGED[0]])
    assert list(res.to_dataframe()["kind"]) == [f.kind for f in res.findings]
    clean = audit([root / "base", root / "tuned"], progress=False)
    assert clean.ok and [f.kind for f in clean.findings] == ["unchanged"]
    from rwasym import report

    labels, columns, grid = report.audit_unchanged_grid(res)
    assert labels == ["[0] → [1]", "[1] → [2]", "[2] → [3]"] and columns == [0, 1, None]
    per_layer = {c: [n for n in state if f"layers.{c}." in n] for c in (0, 1)}
    assert grid[0] == [1.0, 1.0, 1.0]  # identical
    assert grid[1][0] == (len(per_layer[0]) - 1) / len(per_layer[0])  # one tensor of each layer changed
    assert grid[1][1] == (len(per_layer[1]) - 1) / len(per_layer[1]) and grid[1][2] == 1.0
    report.audit_grid(res, tmp_path / "audit.png")
    assert (tmp_path / "audit.png").stat().st_size > 0


def test_audit_reads_a_hub_cache_and_a_duplicated_revision_once(folders, tmp_path, monkeypatch):
    """models--org--p/{blobs, snapshots/<commit>, refs/<rev>} with two revisions that point at one blob (a branch
    serving the same weights) and a third that differs: the duplicate is an identical finding, and the shared
    blob is read once."""
    import huggingface_hub.constants as hub

    import rwasym.models.audit as audit_module

    root, _, _ = folders
    repo = tmp_path / "hub" / "models--org--p"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    for rev, commit, src in (("step1", "1" * 40, "base"), ("step2", "2" * 40, "base"), ("step3", "3" * 40, "tuned")):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in (root / src).iterdir():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copy(f, blob)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
        (repo / "refs" / rev).write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    reads = []
    real_chunks = audit_module._chunks
    monkeypatch.setattr(audit_module, "_chunks", lambda w, *a: (reads.append(w), real_chunks(w, *a))[1])
    res = audit(["org/p@step1", "org/p@step2", "org/p@step3"], progress=False)
    assert [(f.kind, f.checkpoints) for f in res.findings][:1] == [("identical", (0, 1))]
    n_tensors = len(res.fingerprints[0].tensors)
    assert len(reads) == 2 * n_tensors  # step1 and step3 hashed, step2 (the same blob) from the first read
    assert res.fingerprints[0].tensors == fingerprint(root / "base").tensors
    with pytest.raises(RwasymError, match="no hub name with a safetensors snapshot"):
        audit(["org/p@step9"], progress=False)


def test_audit_of_a_gguf_file_hashes_the_stored_quantized_bytes(real_gguf):
    import gguf

    fp = fingerprint(real_gguf, progress=False)
    reader = gguf.GGUFReader(str(real_gguf))
    assert fp.format == "gguf" and len(fp.tensors) == len(reader.tensors)
    for t in reader.tensors[:12]:
        rec = fp.tensors[t.name]
        assert rec.dtype == t.tensor_type.name and rec.sha256 == hashlib.sha256(t.data.tobytes()).hexdigest()
    assert {r.dtype for r in fp.tensors.values()} >= {"Q4_1"}


def test_corrupt_and_truncated_checkpoints_are_refused(folders, tmp_path):
    root, _, _ = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(RwasymError, match="not a readable safetensors file"):
        fingerprint(bad)
    cut = tmp_path / "cut"
    shutil.copytree(root / "base", cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RwasymError, match="truncated"):
        fingerprint(cut)
    with pytest.raises(RwasymError, match="holds no safetensors or GGUF weights"):
        fingerprint(tmp_path)


def test_unchanged_matrices_equal_explicit_subtraction(folders):
    """In memory, from two checkpoint folders, and loaded base against a folder: the matrices whose ΔW is zero are
    those an explicit ΔW = W_tuned − W_base finds zero."""
    root, _, _ = folders
    base, tuned = rwasym.load(root / "base"), rwasym.load(root / "tuned")
    names = [s.name for s in base.matrices()]
    truth = [n for n in names if not torch.any(tuned.weight(n) - base.weight(n))]
    assert len(truth) == len(names) - 2
    assert unchanged_matrices(base, tuned, names) == truth
    assert unchanged_matrices(CheckpointWeights(root / "base"), CheckpointWeights(root / "tuned"), names) == truth
    assert unchanged_matrices(base, CheckpointWeights(root / "tuned"), names) is None
    first = unchanged_matrices(base, CheckpointWeights(root / "tuned"), names, until_changed=True)
    assert first == truth[: len(first)] and names[len(first)] not in truth  # stopped at the first change
    assert unchanged_matrices(base, CheckpointWeights(root / "same"), names, until_changed=True) == names


def test_probe_refuses_identical_models_before_capturing_and_lists_unchanged_matrices(folders, monkeypatch):
    import rwasym.analyses.probe as probe_module

    root, _, _ = folders
    data = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    calls = []
    real_capture = probe_module.capture
    monkeypatch.setattr(probe_module, "capture", lambda *a, **k: (calls.append(1), real_capture(*a, **k))[1])
    for tuned in (root / "same", rwasym.load(root / "same")):  # streamed folder, loaded model
        with pytest.raises(RwasymError, match="identical in every selected matrix"):
            rwasym.probe(rwasym.load(root / "base"), tuned, data, k=2, null_samples=0)
    with pytest.raises(RwasymError, match="identical in every selected matrix"):
        rwasym.probe(root / "base", root / "same", data, k=2, null_samples=0, stream=True)
    assert calls == []  # refused before any capture
    with pytest.warns(UserWarning, match="have ΔW = 0"):
        res = rwasym.probe(root / "base", root / "tuned", data, k=2, null_samples=0)
    base = rwasym.load(root / "base")
    located = {r["matrix"] for r in res.rows}
    assert located == {"blocks.0.attn.W_Q", "blocks.1.mlp.W_out"}
    assert res.config["unchanged"] == [s.name for s in base.matrices() if s.name not in located]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only = rwasym.probe(root / "base", root / "tuned", data, k=2, null_samples=0, matrices=sorted(located))
    assert only.config["unchanged"] == [] and only.rows == [r for r in res.rows if r["matrix"] in located]


def test_series_checks_warn_on_identical_and_unchanged_neighbours(folders):
    root, state, _ = folders
    found = unchanged_between([root / "base", root / "same", root / "tuned", {"not": "a folder"}])
    assert [(i, ident) for i, _, ident in found] == [(1, True), (2, False)]
    assert set(found[1][1]) == set(state) - set(CHANGED)
    with pytest.warns(UserWarning, match="are identical"):
        lifecycle_from_checkpoints({0: root / "base", 1: root / "same"}, top_k=2)


def test_cli_audit_and_the_three_new_user_failures(folders, tmp_path, capsys):
    """`rwasym audit` exits 1 on an error finding and 0 otherwise and writes JSON; a probe of one folder against
    itself, a config.json without model_type and a corrupt .safetensors --data each end in an RwasymError (exit
    2 with its message), not "wrote 0 rows" or a traceback."""
    root, _, _ = folders
    out = tmp_path / "a.json"
    assert main(["audit", str(root / "base"), str(root / "same"), "--quiet", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["findings"][0]["kind"] == "identical"
    assert main(["audit", str(root / "base"), str(root / "tuned"), "--quiet", "--figure", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"tok{i % 90 + 3}" for i in range(400)))
    args = ["probe", "--base", str(root / "base"), "--data", str(text), "--quiet", "--k", "2", "--null-samples", "0"]
    assert main([*args, "--tuned", str(root / "base"), "--out", str(tmp_path / "p.json")]) == 2
    assert "identical in every selected matrix" in capsys.readouterr().err
    nomt = tmp_path / "nomt"
    shutil.copytree(root / "base", nomt)
    cfg = json.loads((nomt / "config.json").read_text())
    cfg.pop("model_type")
    (nomt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RwasymError, match="names no model_type"):
        rwasym.load(nomt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    args[args.index(str(text))] = str(bad)
    assert main([*args, "--tuned", str(root / "tuned"), "--out", str(tmp_path / "q.json")]) == 2
    assert "--data: cannot read" in capsys.readouterr().err
