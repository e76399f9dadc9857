"""Geometry of resid_post after different alignment objectives (seed 0 default pair)."""
import json, time
from dataclasses import replace
from pathlib import Path
import rwasym
from rwasym.studies.default_pair import default_pair, load_default_pairs
from rwasym.studies.experiments import _align_config, clone
from rwasym.train import align
from rwasym.app.spectra import run_geometry
from rwasym.studies.language import corpus, LanguageConfig

t0 = time.time()
base, tuned, info = default_pair(seed=0, progress=False)
train_pairs, held = load_default_pairs(info)
cfg = _align_config(info, 400)
out = Path("/tmp/exp/objectives"); out.mkdir(exist_ok=True)
models = {"base": info["base"], "dpo": info["tuned"]}
for name, c in (("sft", replace(cfg, objective="sft")), ("graded_0.5", replace(cfg, objective="graded", lam=0.5))):
    m = clone(base)
    align(m, base, train_pairs, c, out=out / name, progress=False)
    models[name] = str(sorted((out / name).glob("step_*"))[-1])
data = corpus(256, 64, seed=10_000, config=LanguageConfig(**info["spec"]["language"]))
res = run_geometry(models, data, "/tmp/exp/results/spectra_geometry_objectives", progress=False)
print(json.dumps(res["rows"], indent=0)[:3000]); print(time.time() - t0)
