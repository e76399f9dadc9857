import os

import pytest
import torch

import rwasym
from rwasym.testing import HF_ARCHS, build_hf_model

# Lanes (`make test-fast` runs the unit lane): a test is marked by what it needs — the real SmolLM2 model, tiny
# Hugging Face models, an executed notebook, torchrun, the docs build — read off its file and fixtures; long
# end-to-end runs on native models carry @pytest.mark.integration themselves.
_LANE_FIXTURES = {
    "real": ("real_gguf", "real_folder", "shared_gguf_cache", "gemma_gguf", "gemma_folder"),
    "hf": ("hf_folder", "models"),
}
_LANE_FILES = {
    "test_notebooks.py": "notebook",
    "test_distributed.py": "distributed",
    "test_docs.py": "docs",
    "test_real_experiment.py": "real",
    "test_causal_study.py": "real",
    "test_real_pair.py": "real",
    "test_real_model.py": "real",
    "test_real_gemma.py": "real",
    "test_study.py": "real",
    "test_families.py": "hf",
    "test_trl.py": "hf",
    "test_lora.py": "hf",
    "test_shards.py": "hf",
    "test_streaming.py": "hf",
    "test_audit.py": "hf",
    "test_chain.py": "hf",
}
_LANES = ("real", "hf", "notebook", "distributed", "docs", "integration", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        lane = _LANE_FILES.get(item.path.name)
        if lane is None:
            names = set(getattr(item, "fixturenames", ()))
            lane = next((m for m, fixtures in _LANE_FIXTURES.items() if names & set(fixtures)), None)
        if lane is not None and lane not in item.keywords:
            item.add_marker(getattr(pytest.mark, lane))
        if not any(m in item.keywords for m in _LANES):
            item.add_marker(pytest.mark.unit)
    if os.environ.get("RWASYM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set RWASYM_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """Tiny random HF models saved to disk: arch -> (folder, fresh HF model in eval mode)."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: (root / arch, build_hf_model(arch, root / arch)) for arch in HF_ARCHS}


@pytest.fixture(scope="session")
def native_cfg():
    return rwasym.native_config(
        d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=32, d_vocab=64, n_key_value_heads=2, d_mlp=48, seed=1
    )


@pytest.fixture(scope="module")
def models(hf_folder, native_cfg):
    """One rwasym.Model per test architecture: native, gpt2, llama (GQA), neox."""
    out = {"native": rwasym.load(native_cfg)}
    for arch, (folder, _) in hf_folder.items():
        out[arch] = rwasym.load(folder)
    return out


@pytest.fixture(scope="session")
def save_perturbed_pair(native_cfg):
    """save(root) -> generator: writes root/base and root/tuned (base + 0.05·N(0, 1) on every studied
    matrix, seed 0) and returns the generator, positioned after the perturbation, for further draws."""
    import copy

    def save(root):
        base = rwasym.load(native_cfg)
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(0)
        for spec in tuned.matrices():
            tuned.set_weight(
                spec.name, tuned.weight(spec.name) + 0.05 * torch.randn(spec.shape, generator=g, dtype=torch.float64)
            )
        rwasym.save_model(base, root / "base")
        rwasym.save_model(tuned, root / "tuned")
        return g

    return save


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory):
    """One RWASYM_CACHE for the session, so each quick default pair is built once and shared."""
    root = tmp_path_factory.mktemp("rwasym-cache")
    old = os.environ.get("RWASYM_CACHE")
    os.environ["RWASYM_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("RWASYM_CACHE", None)
    else:
        os.environ["RWASYM_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest; on a shared 2-core box spinning OpenMP
    threads make every op far slower."""
    from rwasym.math.checks import linalg_threads

    with linalg_threads(1):
        yield


# The user's rwasym cache, fixed before any test points RWASYM_CACHE elsewhere: the de-quantized
# real model is built once per machine, not once per session.
_USER_CACHE = None if os.environ.get("RWASYM_CACHE") else os.path.join(os.path.expanduser("~"), ".cache", "rwasym")


@pytest.fixture(scope="session")
def real_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF, or a skip naming the extra that provides it."""
    from rwasym.testing import REAL_EXTRA_HINT, smollm2_gguf_path

    pytest.importorskip("gguf", reason=REAL_EXTRA_HINT)
    try:
        return smollm2_gguf_path()
    except rwasym.RwasymError:
        pytest.skip(REAL_EXTRA_HINT)


@pytest.fixture(scope="session")
def real_folder(real_gguf):
    """n_layers (None: all 30) -> the cached de-quantized SmolLM2 folder (rwasym.testing.real_model_folder)."""
    from rwasym.testing import real_model_folder

    return lambda n_layers=None: real_model_folder(n_layers, cache_dir=_USER_CACHE)


@pytest.fixture(scope="session")
def gemma_gguf():
    """Path of the assembled google/gemma-3-270m GGUF (cached in the user cache), or a skip naming the packages."""
    from rwasym.testing import GEMMA_EXTRA_HINT, gemma_gguf_path

    pytest.importorskip("gguf", reason=GEMMA_EXTRA_HINT)
    try:
        return gemma_gguf_path(_USER_CACHE)
    except rwasym.RwasymError as e:
        if "cannot find" not in str(e):
            raise  # a corrupt chunk fails, it is not skipped
        pytest.skip(GEMMA_EXTRA_HINT)


@pytest.fixture(scope="session")
def gemma_folder(gemma_gguf):
    """n_layers (None: all 18) -> the cached de-quantized gemma-3-270m folder (rwasym.testing.gemma_model_folder)."""
    from rwasym.testing import gemma_model_folder

    return lambda n_layers=None: gemma_model_folder(n_layers, cache_dir=_USER_CACHE)


_USER_GGUF = os.path.join(
    os.environ.get("RWASYM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rwasym"), "gguf"
)


@pytest.fixture(scope="session")
def shared_gguf_cache(quick_cache):
    """quick_cache's gguf/ is the user cache's: what builds the real pair inside quick_cache (a
    notebook, the real demo) reuses the de-quantized SmolLM2 instead of converting it again."""
    link = quick_cache / "gguf"
    if not link.exists():
        os.makedirs(_USER_GGUF, exist_ok=True)
        link.symlink_to(_USER_GGUF, target_is_directory=True)
    return link
