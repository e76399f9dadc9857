"""`rwasym demo`: the whole story on one model pair, written to a folder.

Steps (each only calls the public API): the probe (2 × 2 read/write × activation/prediction table,
heatmap, r(k) curves), gradient anisotropy on the base (CE on text and DPO on pairs: C_a versus C_δ),
the within-run trajectory and a small graded-objective control (the default and the real pair), a
rank-1 sweep with matched controls, and the companion spectra. Outputs: ``report.md``, ``results.json`` and PNG
figures in ``out``; the headline table is printed.
"""

import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import report
from .._version import __version__
from ..analyses.anisotropy import anisotropy_report
from ..analyses.companion import geometry, lifecycle_from_checkpoints, post_training_report
from ..analyses.probe import probe
from ..analyses.sweep import summarize, sweep
from ..hooks.activations import capture
from ..hooks.gradients import capture_gradients
from ..models import load
from ..objectives import objective_batches
from .experiments import asymmetry_summary, graded, trajectory


def run_demo(
    out: Any = "rwasym_out/demo",
    *,
    quick: bool = False,
    base: Any = None,
    tuned: Any = None,
    data: Any = None,
    pairs: Any = None,
    seed: int = 0,
    k: int = 8,
    progress: bool | None = None,
    real: bool = False,
    cache_dir: Any = None,
    log=print,
) -> dict:
    """Run the demo; returns the results dict written to ``out/results.json``.

    Default: the embedded default pair. ``real=True``: the real pair (SmolLM2-135M + DPO on a text
    task, `rwasym.studies.real_pair`), its activation statistics from the task's own text, the
    trajectory and lifecycle of its DPO run, smaller sweep and graded budgets (a 30-layer model on
    CPU). ``base``/``tuned``/``data``/``pairs``: your own pair instead (probe, gradients, sweep, SVD).
    """
    t_start = time.perf_counter()
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    info: dict = {}
    heldout_pairs = train_pairs = None
    run_folder = lifecycle_folder = None  # the alignment run (trajectory) and the checkpoints of the lifecycle
    if real:
        from .real_pair import load_real_pairs, real_corpus, real_pair

        log(f"[1/7] real pair ({'quick' if quick else 'full'}): SmolLM2-135M + DPO, trained on first use, then cached")
        base, tuned, info = real_pair(cache_dir, quick=quick, progress=progress is not False, seed=seed)
        train_pairs, heldout_pairs = load_real_pairs(info)
        data = real_corpus(info, base.tokenizer, seq_len=64)
        run_folder = lifecycle_folder = Path(info["folder"]) / "align"
    elif base is None:
        from .default_pair import default_pair, load_default_pairs
        from .language import LanguageConfig, corpus

        log(f"[1/7] default pair ({'quick' if quick else 'full'}): trained on first use, then cached")
        base, tuned, info = default_pair(quick=quick, progress=progress is not False)
        train_pairs, heldout_pairs = load_default_pairs(info)
        lang = LanguageConfig(**info["spec"]["language"])
        data = corpus(64 if quick else 256, info["spec"]["seq_len"], seed=10_000 + seed, config=lang)
        run_folder, lifecycle_folder = Path(info["folder"]) / "align", Path(info["folder"]) / "pretrain"
    else:
        base, tuned = load(base), load(tuned)
        heldout_pairs = pairs
        if data is None:
            raise ValueError("run_demo on your own pair needs data= (tokens or a text file)")
    results: dict = {"version": __version__, "seed": seed, "k": k, "quick": quick, "real": real}
    if real:
        results["real_pair"] = {key: info.get(key) for key in ("heldout_accuracy", "seconds", "final_loss", "folder")}
        results["real_pair"]["n_tokens"] = int(data.numel())
    else:
        results["default_pair"] = {
            key: info.get(key) for key in ("entropy", "pretrain", "align", "preference_accuracy", "folder")
        }
    figures = out / "figures"

    log("[2/7] probe: where ΔW concentrates")
    acts = capture(base, data, progress=progress)
    result = probe(
        base,
        tuned,
        activations=acts,
        k=k,
        null_samples=100 if quick else 300,
        seed=seed,
        curve_null_samples=16 if quick else 64,
        progress=progress,
    )
    results["probe"] = {
        "summary": asymmetry_summary(result),
        "summary_paper": asymmetry_summary(result, grouping="paper"),
        "table": result.table(),
        "rows": result.rows,
        "curves": result.curves,
    }
    report.asymmetry_heatmap(result, figures / "asymmetry_heatmap.png")
    report.rk_curves(result, figures / "rk_curves.png")
    headline = result.summary()
    log(headline)

    log("[3/7] gradient anisotropy on the base: C_a (inputs) versus C_δ (upstream gradients)")
    # real: four depths (C_a, C_δ and G of all 210 matrices are ~5 GB of float64 per objective)
    layers = sorted({0, base.n_layers // 3, 2 * base.n_layers // 3, base.n_layers - 1})
    grad_matrices = [f"blocks.{L}.*.*" for L in layers] if real else None
    grads = {
        "ce": capture_gradients(
            base, *objective_batches("ce", data, batch_size=16, n_batches=4), matrices=grad_matrices, progress=progress
        )
    }
    if heldout_pairs is not None and train_pairs is not None:
        loss_fn, batches = objective_batches(
            "dpo",
            train_pairs,
            reference=base,
            batch_size=16 if real else 64,
            n_batches=2 if quick else 4,
            beta=info["spec"]["align"]["beta"] if real else 1.0,
        )
        grads["dpo"] = capture_gradients(base, loss_fn, batches, matrices=grad_matrices, progress=progress)
    results["gradients"] = {obj: anisotropy_report(base, st, k=k) for obj, st in grads.items()}
    for name in ("blocks.0.attn.W_Q", f"blocks.{base.n_layers - 1}.mlp.W_out"):
        spectra = {}
        for obj, st in grads.items():
            C_a, C_d = st.second_moments(name)
            spectra[f"{obj}: a_t (input)"] = torch.linalg.eigvalsh(C_a).flip(0).tolist()
            spectra[f"{obj}: δ_t (gradient)"] = torch.linalg.eigvalsh(C_d).flip(0).tolist()
        report.spectra_plot(
            spectra,
            figures / f"grad_spectra_{name.replace('.', '_')}.png",
            title=f"{name}: covariance spectra",
            ylabel="λ_i / Σλ",
        )

    if run_folder is not None:
        log("[4/7] within-run trajectory of the alignment run")
        traj = trajectory(base, run_folder, data, k=k, null_samples=50, seed=seed)
        results["trajectory"] = traj
        summary_rows = [r for r in traj if r["kind"] == "summary"]
        long = [
            dict(step=r["step"], value=r.get(key), series=key)
            for r in summary_rows
            for key in ("read_activation", "write_prediction", "read_prediction", "write_activation")
        ]
        report.line_plot(
            long,
            "step",
            "value",
            "series",
            figures / "trajectory.png",
            hline=1.0,
            title="within-run trajectory (residual side, whole matrices)",
            ylabel="mean relative fraction r",
        )

        log("[5/7] graded-objective control (small budget)")
        from dataclasses import replace

        from ..train.loops import AlignConfig

        cfg = AlignConfig(**{**info["spec"]["align"], "betas": tuple(info["spec"]["align"]["betas"])})
        # real: 10 steps per λ (≈ 3.5 s each on 2 cores); #19's experiment runs the full control
        cfg = replace(
            cfg, steps=4 if quick else 10 if real else 60, checkpoint_every=0, warmup_steps=min(cfg.warmup_steps, 2)
        )
        lams = (0.0, 1.0) if quick else (0.0, 0.5, 1.0) if real else (0.0, 0.25, 0.5, 0.75, 1.0)
        rows = graded(base, train_pairs, data, lams=lams, align_config=cfg, k=k, null_samples=50, heldout=heldout_pairs)
        results["graded"] = rows
        long = [
            dict(lam=r["lam"], value=r[key], series=key)
            for r in rows
            for key in ("read_activation", "write_prediction")
        ]
        report.line_plot(
            long,
            "lam",
            "value",
            "series",
            figures / "graded.png",
            hline=1.0,
            title="graded objective λ·DPO + (1−λ)·CE",
            xlabel="λ (contrastive share)",
            ylabel="mean relative fraction r",
        )
    else:
        log("[4-5/7] trajectory and graded control need the default pair's training run: skipped")

    if heldout_pairs is not None:
        log("[6/7] rank-1 sweep with matched random and orthogonal controls")
        dirs = "pca:2,random:4,orthogonal:4" if quick or real else "pca:4,random:16,orthogonal:16"
        last = base.n_layers - 1
        matrices = (
            [f"blocks.{last // 2}.attn.W_Q", f"blocks.{last}.mlp.W_out"]
            if real
            else ["blocks.*.attn.W_Q", "blocks.*.mlp.W_out"]
        )  # real: one edit is a 30-layer forward
        rows = sweep(
            base,
            tuned,
            heldout_pairs,
            matrices=matrices,
            directions=dirs,
            mode="transplant",
            match="norm",
            out=out / "sweep.jsonl",
            seed=seed,
            max_pairs=64 if real else 128 if quick else 512,
            progress=progress,
        )
        summary = summarize(rows, metrics=["gap_accuracy", "margin", "kl_base"], seed=seed)
        results["sweep"] = {"summary": summary.to_dicts()}
        report.effect_plot(
            rows, "margin", figures / "sweep_margin.png", title="transplanted rank-1 edits: DPO margin by direction"
        )
    else:
        log("[6/7] no preference pairs: sweep skipped")

    log("[7/7] companion spectra")
    results["post_training_svd"] = post_training_report(base, tuned, k=min(k, base.d_model))["by_kind"]
    if lifecycle_folder is not None:
        pre = lifecycle_folder
        lc = lifecycle_from_checkpoints(pre)
        results["lifecycle"] = {"compression": lc.compression_timing(), "by_kind": lc.kind_summary()}
        report.singular_value_heatmap(lc, "blocks.0.attn.W_Q", figures / "sv_heatmap_W_Q.png")
        from ..analyses.companion import checkpoint_folders

        geo = geometry({step: folder for step, folder in checkpoint_folders(pre).items()}, data[:32])
        results["geometry"] = geo
        report.line_plot(
            geo,
            "checkpoint",
            "rankme",
            "layer",
            figures / "rankme.png",
            title=f"RankMe of resid_post across {'the DPO run' if real else 'pretraining'}",
            xlabel="step (symlog)",
            logx=True,
        )
    results["seconds"] = time.perf_counter() - t_start
    report.write_json(results, out / "results.json")
    (out / "report.md").write_text(_markdown(results, headline))
    log(
        f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(list(figures.glob('*.png')))} figures "
        f"in {results['seconds']:.0f} s"
    )
    return results


def _markdown(results: dict, headline: str) -> str:
    parts = [f"# rwasym demo report (rwasym {results['version']}, seed {results['seed']}, k={results['k']})\n"]
    if results.get("real_pair"):
        rp = results["real_pair"]
        parts.append(
            "## The real pair (SmolLM2-135M + DPO on the pick-the-second task)\n\n"
            f"held-out preference accuracy: base {rp['heldout_accuracy']['base']:.3f}, "
            f"tuned {rp['heldout_accuracy']['tuned']:.3f}; activation statistics from "
            f"{rp['n_tokens']} tokens of the task's text\n"
        )
    dp = results.get("default_pair") or {}
    if dp.get("preference_accuracy"):
        parts.append(
            "## The default pair\n\n```\n"
            + json.dumps({k: dp[k] for k in ("entropy", "pretrain", "align", "preference_accuracy")}, indent=1)
            + "\n```\n"
        )
    parts.append("## Probe: relative fraction r on the residual-stream side\n\n```\n" + headline + "\n```\n")
    probe = results["probe"]
    parts.append(
        "Mean r per side, in two groupings: pooled (read: W_Q/K/V/W_in/W_gate; write: W_O/W_out) and the paper's "
        "(read: W_Q, W_K; write: W_O, W_out):\n\n"
        + report.markdown_table(
            [
                {"grouping": "pooled", **probe["summary"]},
                {"grouping": "paper", **{k.removeprefix("paper_"): v for k, v in probe["summary_paper"].items()}},
            ]
        )
    )
    parts.append("![asymmetry](figures/asymmetry_heatmap.png)\n![r(k)](figures/rk_curves.png)\n")
    for obj, rows in results.get("gradients", {}).items():
        parts.append(
            f"## Gradient anisotropy ({obj})\n\n"
            + report.markdown_table(
                rows, ["matrix", "a_top1_share", "delta_top1_share", "G_input_pca_relative", "G_prediction_relative"]
            )
        )
    if "trajectory" in results:
        parts.append(
            "## Within-run trajectory\n\n"
            + report.markdown_table([r for r in results["trajectory"] if r["kind"] == "summary"])
            + "\n![trajectory](figures/trajectory.png)\n"
        )
    if "graded" in results:
        parts.append(
            "## Graded objective\n\n" + report.markdown_table(results["graded"]) + "\n![graded](figures/graded.png)\n"
        )
    if "sweep" in results:
        parts.append(
            "## Rank-1 sweep: target versus matched controls\n\n"
            + report.markdown_table(
                results["sweep"]["summary"],
                ["matrix", "alpha", "target", "control", "metric", "target_mean", "control_mean", "diff", "p_value"],
            )
        )
    parts.append(
        "## Post-training SVD by matrix kind\n\n"
        + report.markdown_table([dict(kind=k, **v) for k, v in results["post_training_svd"].items()])
    )
    if "geometry" in results:
        parts.append(
            f"## RankMe / α-ReQ across {'the DPO run' if results.get('real') else 'pretraining'}\n\n"
            + report.markdown_table(results["geometry"])
        )
    return "\n".join(parts)
