"""The relative-subspace-fraction probe over a whole model: layer × matrix × head × side × subspace.

For ΔW = W_tuned − W_base and an orthonormal basis U (n × k) of one side of W,
f = ‖ΔW U‖²_F/‖ΔW‖²_F (input side) or ‖Uᵀ ΔW‖²_F/‖ΔW‖²_F (output side), r = f / (k/n)
(`rwasym.math.fraction.relative_fraction`). r = 1 is isotropic, r > 1 concentrated.

Which side and which subspace (rows carry both, so the whole 2×2 table is visible):

- the **residual-stream side** of every matrix — input for read matrices (W_Q/K/V/W_in/W_gate read
  the normalised residual stream), output for write matrices (W_O/W_out write into it) — against
  two subspaces of R^{d_model}:
  ``activation``: top-k PCA of the base model's activations on that side (the matrix's own input
  for read matrices; for write matrices the residual stream they write into: resid_mid for W_O of
  sequential blocks, resid_post otherwise);
  ``prediction``: top-k left singular vectors of the effective unembedding diag(γ_final)·W_U.
  Opt-in (``subspaces=``): ``prediction_centered``, of the vocabulary-centred W̃_U; ``prediction_fisher``, the
  top eigenvectors of the mean next-token Fisher metric E_t[W̃_U (diag p_t − p_t p_tᵀ) W̃_Uᵀ] on the data.
- the **inner side** (the input of write matrices: attention z / MLP hidden; the output of read
  matrices is not studied) against the PCA of its own activations (``activation``).

Subspaces are always computed on the *base* model. Per-head rows slice ΔW by head (rows for
Q/K/V, columns for O); an inner-side per-head basis is the PCA of that head's block of the
covariance. A tuned model loaded with a LoRA adapter (``load(base, adapter=folder)``) is probed
through its factored ΔW = s · B A (`rwasym.math.lowrank.LowRankDelta`): no n_out × n_in delta is formed.
A tuned model given as a Hugging Face checkpoint folder (config.json + safetensors) is never loaded:
each ΔW is W_tuned read from its files minus the loaded base's W (`rwasym.models.checkpoint.CheckpointDeltas`).
"""

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from .._progress import quiet
from .._version import __version__  # noqa: F401
from ..errors import RwasymError
from ..hooks.activations import ActivationStats, capture, data_hash, prediction_statistics
from ..math.checks import available_memory, linalg_threads, release_memory, require_k
from ..math.fraction import (
    GRAM_FROM,
    Side,
    column_energies,
    delta_gram,
    delta_spectrum,
    gradient_shaped_delta,
    gradient_shaped_fraction,
    gram_energies,
    gram_rho,
    gram_spectrum,
    kfree_null_std,
    kfree_rho,
    log_k_grid,
    null_moments,
    random_null,
)
from ..math.lowrank import LowRankDelta
from ..math.subspaces import Basis, k_reaching, pca_basis, prediction_basis
from ..math.topk import top_eigenpairs
from ..models import MatrixSpec, Model, head_input_block, head_range, head_slice, load, weight_deltas
from ..models.audit import unchanged_matrices
from ..models.checkpoint import CheckpointDeltas, is_checkpoint_folder
from ..models.deltas import ModelWeights, WeightDeltas
from ..models.loading import checkpoint_folder
from .options import option, resolve_config
from .readouts import fill_contexts, plan_readouts, prediction_readouts


@dataclass
class ProbeResult:
    """Rows (one per layer, matrix, head, side, subspace), r(k) curves and the configuration."""

    rows: list[dict]
    curves: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    readouts: list[dict] = field(default_factory=list)  # ProbeConfig.readouts: tokens and contexts per direction

    def to_dicts(self) -> list[dict]:
        return [dict(r) for r in self.rows]

    def to_json(self, path: str | None = None) -> str:
        doc = {"config": self.config, "rows": self.rows, "curves": self.curves}
        if self.readouts:
            doc["readouts"] = self.readouts
        text = json.dumps(doc, indent=1)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    def to_dataframe(self, table: str = "rows"):
        """``rows`` (default), ``curves`` or ``readouts`` as a pandas DataFrame (readouts: tokens and contexts as
        nested lists in their cells)."""
        try:
            import pandas as pd
        except ImportError:  # pandas is optional
            raise RwasymError("to_dataframe needs pandas: pip install pandas (or use to_dicts())") from None
        tables = {"rows": self.rows, "curves": self.curves, "readouts": self.readouts}
        if table not in tables:
            raise RwasymError(f"table={table!r}: choose rows, curves or readouts")
        return pd.DataFrame(tables[table])

    def table(self, side: str = "residual") -> dict[str, dict[str, float]]:
        """Mean relative fraction per matrix kind and subspace on whole matrices (heads pooled out)."""
        out: dict[str, dict[str, list]] = {}
        for row in self.rows:
            if row["head"] is None and row["stream"] == side:
                out.setdefault(row["kind"], {}).setdefault(row["subspace"], []).append(row["relative"])
        return {kind: {s: sum(v) / len(v) for s, v in subs.items()} for kind, subs in out.items()}

    def summary(self) -> str:
        """Read-side versus write-side mean relative fraction per matrix kind (residual side)."""
        lines = [
            f"relative fraction r = f/(k/n) on the residual-stream side, k={self.config.get('k')} "
            "(1 = isotropic, >1 = concentrated)",
            f"{'matrix':8s} {'side':6s} {'activation':>11s} {'prediction':>11s}",
        ]
        table = self.table()
        for kind in ("W_Q", "W_K", "W_V", "W_in", "W_gate", "W_O", "W_out"):
            if kind in table:
                side = "read" if kind not in ("W_O", "W_out") else "write"
                t = table[kind]
                lines.append(
                    f"{kind:8s} {side:6s} {t.get('activation', float('nan')):11.2f} "
                    f"{t.get('prediction', float('nan')):11.2f}"
                )
        return "\n".join(lines)


AUTO_TOPK_ABOVE = 2048  # spectral="auto": sites wider than this get the top-k solver (8B: d 4096, d_mlp 14,336)
TOPK_TOL = 1e-8  # the top-k solver's residual target, relative to θ₁ (rows carry the achieved value)
# its cap on block products C·X (the block Krylov solver reached 1e-8 in 50–64 of them on flat 4096- and
# 14,336-wide sample covariances); beyond it rows say spectral_converged=False and carry the residual reached
TOPK_MAX_ITER = 120
DELTAS = ("tuned", "base_weight", "random_delta", "noise_floor", "given")
SUBSPACES = ("activation", "prediction", "prediction_centered", "prediction_fisher", "activation_normalized")
ROUTINGS = ("tokens", "routing")


@dataclass(frozen=True)
class ProbeConfig:
    """What a probe measures. The result's ``config``, and the ``rwasym probe`` flags, derive from these
    fields (`rwasym.app.cli.add_config_flags`); `probe` takes one, or its fields as keyword overrides."""

    k: int = option(8, "subspace dimension k (per-head spaces smaller than k use their own size; rows record it)")
    null_samples: int = option(
        200,
        "Haar subspaces drawn for the percentile of f in its null (mean and std are exact); < 2 turns the row null off",
    )
    matrices: str | Sequence[str] | None = option(
        None, "registry glob such as 'blocks.*.attn.W_Q' (default every matrix)", type=str
    )
    heads: bool = option(True, "compute per-head rows besides whole matrices")
    delta: str = option(
        "tuned",
        "what the rows locate: tuned = ΔW = W_tuned − W_base; base_weight = W_base itself (how aligned "
        "pretraining left the matrix; no tuned model); random_delta = one draw of the gradient-shaped null "
        "update Σ_t ξ_t a_tᵀ, Gaussian ξ on the capture's tokens (what the inputs alone impose; no tuned model); "
        "noise_floor = W_replicate − W_tuned, two tuned runs differing only in seed (--replicate); given = the "
        "caller's deltas= mapping (Python API only, e.g. a run's SGD-equivalent update −Σ η g)",
        choices=DELTAS,
    )
    subspaces: str = option(
        "activation,prediction",
        "comma-separated subspaces of the rows: activation (PCA of the site), prediction (top left singular vectors "
        "of diag(γ)·W_U), prediction_centered (of the vocabulary-centred W_U: the softmax-invariant 'all logits up' "
        "direction removed), prediction_fisher (top eigenvectors of the mean next-token Fisher metric "
        "E_t[W̃_U (diag p_t − p_t p_tᵀ) W̃_Uᵀ] on the data: one more forward pass), activation_normalized (write "
        "matrices: PCA of the normalised residual the next sublayer reads, not the raw stream whose massive "
        "activations make k at 90% variance 1)",
    )
    center: bool = option(True, "centre the activation covariances (PCA of the centred activations)")
    variance: float = option(0.9, "rows also report f and r at the k reaching this explained-variance ratio")
    curves: bool = option(True, "compute r(k) curves: whole-matrix f at every k of a log grid, with the Haar null band")
    curve_null_samples: int = option(64, "the curves' null band: on when >= 2 (closed form, no draws)")
    seed: int = option(0, "seeds the Haar draws: every number is reproducible from it")
    batch_size: int = option(16, "sequences per forward pass of the capture")
    max_tokens: int | None = option(None, "tokens of the activation capture (default all)", type=int)
    exclude_positions: Sequence[int] = option(
        (),
        "attention-sink positions left out of every statistic, counted from each row's first token (e.g. 0: "
        "the first token, where massive activations sit)",
        list_of=int,
    )
    exclude_tokens: Sequence[int] = option(
        (), "token ids left out of every statistic wherever they occur (chosen delimiters)", list_of=int
    )
    stats_budget: int | float | None = option(
        None,
        "bytes the float64 sums of one capture pass may hold; more sites are captured in consecutive passes "
        "(default half the memory available when the probe starts; inf: one pass)",
        type=float,
    )
    spectral: str = option(
        "auto",
        "how site subspaces are computed: exact (a full eigh, O(d³)); topk (the certified top spectral_k eigenpairs, "
        "rwasym.math.top_eigenpairs, O(d² k)); auto: topk for sites wider than 2,048, exact below",
        choices=("auto", "exact", "topk"),
    )
    spectral_k: int = option(
        64,
        "eigenpairs the top-k solver computes per site (at least k): the range of r(k) curves and of the "
        "variance-reaching k (rows say when it lies beyond)",
    )
    stream: bool = option(
        False,
        "read the base block by block from its checkpoint folder (never the whole model in memory; "
        "rwasym.models.streaming); base and tuned must be Hugging Face checkpoint folders",
    )
    post_norm: str = option(
        "residual",
        "post-sublayer-norm models (OLMo 2, Gemma 2/3): measure W_O / W_out as diag(γ_post)·ΔW (residual, as "
        "the residual stream sees it) or the raw ΔW",
        choices=("residual", "raw"),
    )
    readouts: int = option(
        0,
        "read out each ΔW's leading singular directions in words: the tokens a write matrix's direction promotes and "
        "demotes (through diag(γ)·W_U) and the corpus contexts that most excite its input direction (collected in "
        "the capture pass); 0: off (rwasym.analyses.readouts)",
    )
    readout_top: int = option(10, "tokens and contexts listed per readout direction and sign")
    routing: str = option(
        "tokens",
        "mixture-of-experts experts: the routed statistics their activation rows use (one more pass over the data): "
        "tokens = the covariance of the inputs routed to the expert, each routed token counted once (C_e); routing = "
        "weighted by the routing weight w_{t,e} (C̃_e; docs: concepts/conventions)",
        choices=ROUTINGS,
    )

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise RwasymError(
                f"k={self.k!r} must be a positive integer subspace dimension, at most d_model (the residual "
                "stream's width); choose e.g. k=8"
            )
        if self.post_norm not in ("residual", "raw"):
            raise RwasymError(
                f"post_norm={self.post_norm!r}: use 'residual' (diag(γ_post)·ΔW, as the residual stream "
                "sees it) or 'raw' (the raw ΔW)"
            )
        chosen = self.subspace_list()
        unknown = [x for x in chosen if x not in SUBSPACES]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise RwasymError(
                f"subspaces={self.subspaces!r}: give distinct names from {', '.join(SUBSPACES)}, comma-separated "
                "(e.g. 'activation,prediction,prediction_centered')"
            )
        if self.routing not in ROUTINGS:
            raise RwasymError(
                f"routing={self.routing!r}: use 'tokens' (each routed token counts once) or 'routing' (weighted by "
                "the routing weight w_{t,e})"
            )
        if not 0.0 < float(self.variance) <= 1.0:
            raise RwasymError(f"variance must satisfy 0 < variance <= 1 (a variance fraction); got {self.variance}")
        for name in ("null_samples", "curve_null_samples", "batch_size", "readouts", "readout_top"):
            value = getattr(self, name)
            positive = name in ("batch_size", "readout_top")
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
                raise RwasymError(
                    f"{name} must be a non-negative integer (batch_size, readout_top positive); got {value!r}"
                )

    def subspace_list(self) -> list[str]:
        return [x.strip() for x in str(self.subspaces).split(",") if x.strip()]

    def to_dict(self) -> dict:
        return asdict(self)


def _residual_site(model: Model, spec: MatrixSpec) -> str:
    """The hook carrying the residual stream that a write matrix writes into."""
    resid = model.residual_hooks()
    mid = resid.get(f"blocks.{spec.layer}.hook_resid_mid")
    if spec.kind == "W_O" and mid is not None:
        return mid
    return resid[f"blocks.{spec.layer}.hook_resid_post"]


def _normalized_site(model: Model, spec: MatrixSpec) -> str:
    """The hook carrying what the next sublayer reads of the residual stream a write matrix writes into (its
    normalised form, after the next norm's γ): the MLP input of the same block for W_O of a sequential block,
    else the next block's attention input, and after the last block the final norm's output (the unembedding's
    input)."""
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    if spec.kind == "W_O" and not parallel:
        name = f"blocks.{spec.layer}.mlp.W_in"
    elif spec.layer + 1 < model.n_layers:
        name = f"blocks.{spec.layer + 1}.attn.W_Q"
    else:
        name = None
    if name is not None and name in {s.name for s in model.matrices()}:
        return model.input_hook(name)
    if name is None and "ln_final.hook_out" in model.bridge.hook_dict:
        return "ln_final.hook_out"
    raise RwasymError(
        f"{spec.name}: no hook carries the normalised residual stream after it on this architecture (looked for "
        f"{name or 'ln_final.hook_out'}); leave activation_normalized out of subspaces"
    )


def _input_site(model: Model, spec: MatrixSpec) -> str:
    """The site whose statistics are the input of ``spec``: its input hook, or for an expert matrix the name of
    its routed statistics, ``blocks.L.mlp.experts.e.routed_in`` (W_gate,e / W_in,e: the MLP input routed to e) or
    ``….routed_hidden`` (W_out,e: the expert's hidden state), which `routed_sites` lists (no hook carries them)."""
    if spec.expert is None:
        return model.input_hook(spec.name)
    side = "hidden" if spec.kind == "W_out" else "in"
    return f"blocks.{spec.layer}.mlp.experts.{spec.expert}.routed_{side}"


def routed_sites(specs: Sequence[MatrixSpec]) -> dict[str, int]:
    """The routed statistics the expert matrices among ``specs`` read (`_input_site` → width): captured by
    `rwasym.hooks.routing.capture_routed`, not by `capture`."""
    return {
        f"blocks.{s.layer}.mlp.experts.{s.expert}.routed_{'hidden' if s.kind == 'W_out' else 'in'}": s.n_in
        for s in specs
        if s.expert is not None
    }


def probe_sites(model: Model, specs: Sequence[MatrixSpec], normalized: bool = False) -> dict[str, int]:
    """Hooks whose statistics the probe needs for ``specs`` (hook → width); ``normalized``: also the normalised
    residual after each write matrix (`_normalized_site`, the ``activation_normalized`` rows). An expert matrix's
    input is its routed statistics (`routed_sites`), not a hook: only its write side's residual sites are here."""
    sites: dict[str, int] = {}
    for spec in specs:
        if spec.expert is None:
            sites.setdefault(model.input_hook(spec.name), spec.n_in)
        if spec.side == "write":
            sites.setdefault(_residual_site(model, spec), model.d_model)
            if normalized:
                sites.setdefault(_normalized_site(model, spec), model.d_model)
    return sites


def layer_groups(specs: Sequence[MatrixSpec], sites: dict[str, int], budget: int | float) -> list[list[MatrixSpec]]:
    """``specs`` (in layer order) cut into runs of whole layers whose probe sites' float64 sums
    (8·d² bytes per site of width d) stay within ``budget``; a layer above it on its own is a group."""
    per_layer: dict[int | float, int] = {}  # a non-block site sits at layer inf
    for hook, width in sites.items():
        per_layer[_site_layer(hook)] = per_layer.get(_site_layer(hook), 0) + 8 * width * width
    groups: list[list[MatrixSpec]] = []
    held, layer = 0, None
    for spec in specs:
        if spec.layer != layer:
            layer, cost = spec.layer, per_layer.get(spec.layer, 0)
            if not groups or held + cost > budget:
                groups.append([])
                held = 0
            held += cost
        groups[-1].append(spec)
    return groups


def _budget(base: Model, stats_budget: int | float | None, data: Any) -> int | float:
    if isinstance(data, Iterator):
        return float("inf")  # a one-shot iterator cannot be read twice
    if stats_budget is None:  # from the machine, not the model: half of what is available now
        return available_memory() // 2
    if not stats_budget > 0:
        raise RwasymError(
            f"stats_budget={stats_budget!r} must be a positive number of bytes (or None for half the memory "
            "available, float('inf') for one capture pass)"
        )
    return stats_budget


class _Covariances:
    """site → (covariance, full PCA basis) of one capture, computed once per site.

    `prefetch(sites)` computes them on a worker thread (one eigendecomposition at a time, on one
    core) while the caller computes the rows of the previous layer on the other: the results are
    the same as computed in place (the same single-threaded LAPACK calls), only the wall time
    overlaps. `release(layer)` drops the sites of the layers before ``layer`` (and, for
    statistics the probe captured itself, their float64 sums)."""

    def __init__(
        self,
        activations: ActivationStats,
        center: bool,
        owned: bool,
        overlap: bool = False,
        threads: int = 1,
        spectral: str = "exact",
        spectral_k: int = 64,
        keep_sums: bool = False,
    ) -> None:
        self.activations, self.center, self.owned, self.threads = activations, center, owned, threads
        self.spectral, self.spectral_k = spectral, spectral_k
        # an owned site's float64 sum S is freed once its C exists (`moments`), unless random_delta draws from it
        self.keep_sums = keep_sums
        self.moments: dict[str, tuple[torch.Tensor, float]] = {}  # site -> (μ, W = Σ w), kept when S is freed
        self.cache: dict[str, torch.Tensor] = {}
        self.bases: dict[str, Any] = {}
        self.certificates: dict[str, tuple[float, bool]] = {}  # site -> (max residual / θ₁, converged) of top-k
        self.pending: dict[str, Any] = {}  # site -> Future of (covariance, basis)
        self.pool = ThreadPoolExecutor(max_workers=1) if overlap else None
        # mixture-of-experts experts: routed sites without enough tokens for k (no rows read them), routed sites
        # whose statistics are routing-weighted (C̃_e, the weighted covariance divided by W_e, not W_e − 1), and
        # (layer, expert) -> what every row of that expert's matrices carries (expert, N_e, mean routing weight)
        self.absent: set[str] = set()
        self.biased: set[str] = set()
        self.experts: dict[tuple[int, int], dict] = {}

    def _basis_of(self, site: str, c: torch.Tensor):
        """The site's eigenbasis: every eigenvector (`pca_basis`), or with the top-k solver its leading
        ``spectral_k`` (a `Basis` with k < n; explained-variance ratios still over tr C)."""
        n = c.shape[0]
        if not uses_topk(self.spectral, self.spectral_k, n):
            return pca_basis(c, n, center=False)
        top = top_eigenpairs(c, self.spectral_k, tol=TOPK_TOL, max_iter=TOPK_MAX_ITER)
        scale = max(float(top.eigenvalues[0]), 1e-300)
        self.certificates[site] = (float(top.residuals.max()) / scale, top.converged)
        return Basis(
            U=top.U,
            eigenvalues=top.eigenvalues,
            explained_variance_ratio=top.explained_variance_ratio,
            k=top.k,
            n=n,
        )

    def _covariance(self, site: str) -> torch.Tensor:
        """C of ``site``, (μ, N) kept in `moments`; formed in its sum's own storage (`covariance(consume=True)`)
        when the statistics are the probe's own and nothing needs S later (no second d × d matrix)."""
        stats = self.activations[site]
        self.moments[site] = (stats.mean(), stats.weight_sum)  # W = N without weights
        unbiased = site not in self.biased
        return stats.covariance(center=self.center, unbiased=unbiased, consume=not self.keep_sums and self.owned)

    def _compute(self, site: str) -> tuple:
        c = self._covariance(site)
        return c, self._basis_of(site, c)

    def prefetch(self, sites: Sequence[str]) -> None:
        if self.pool is None:
            return
        for site in sites:
            if site not in self.cache and site not in self.pending and site not in self.absent:
                self.pending[site] = self.pool.submit(self._compute, site)

    def _collect(self, site: str) -> None:
        if site in self.pending:
            self.cache[site], self.bases[site] = self.pending.pop(site).result()
            self._formed(site)

    def _formed(self, site: str) -> None:
        """C of ``site`` exists (in the main thread): its consumed statistics leave the capture's mapping."""
        if not self.keep_sums and self.owned and site in self.activations.stats:
            del self.activations.stats[site]  # C, μ and N carry what the rows need

    def __call__(self, site: str) -> torch.Tensor:
        self._collect(site)
        if site not in self.cache:
            self.cache[site] = self._covariance(site)
            self._formed(site)
        return self.cache[site]

    def mean(self, site: str) -> torch.Tensor:
        """μ of the site (float64), also after its sums were freed."""
        self(site)
        return self.moments[site][0]

    def gradient_share(self, site: str, block: Callable[[torch.Tensor], torch.Tensor], U: torch.Tensor) -> float:
        """The gradient-shaped null's expected share tr(Uᵀ M U) / tr M (`gradient_shaped_fraction`) for the
        uncentred input second moment M ∝ S = Σ_t w_t a_t a_tᵀ, from the site's C and μ: S = a C + b μμᵀ with
        (a, b) = (W − 1, W) for the unbiased centred C, (W, W) for a biased one (routing-weighted C̃_e), (W, 0) for
        the uncentred one (C = S/W); W = Σ w_t = N without weights. ``block``
        takes a head's block of a d × d matrix or of μ (identity for the whole input)."""
        c = block(self(site))
        mu, count = self.moments[site]
        mu = block(mu)
        if not self.center:
            a, b = count, 0.0
        else:
            a, b = (count, count) if site in self.biased else (count - 1, count)
        proj = U.T @ mu
        num = a * float(((c @ U) * U).sum()) + b * float(proj.square().sum())
        return num / (a * float(c.diagonal().sum()) + b * float(mu.square().sum()))

    def basis(self, site: str):
        """The full eigenbasis of the site's covariance (`pca_basis` with k = n), shared by rows,
        k_variance and curves."""
        self._collect(site)
        if site not in self.bases:
            c = self(site)
            # in place, from n = 1024 up every thread pays (1536 × 1536 eigh: 0.62 s -> 0.35 s on 2 cores)
            with linalg_threads(self.threads if c.shape[0] >= 1024 else 1):
                self.bases[site] = self._basis_of(site, c)
        return self.bases[site]

    def release(self, layer: int) -> None:
        for cache in (self.cache, self.bases):
            for site in [s for s in cache if _site_layer(s) < layer]:
                del cache[site]
        if self.owned:
            stats = self.activations.stats
            for site in [s for s in stats if _site_layer(s) < layer and s not in self.pending]:
                del stats[site]
        release_memory()  # the freed d × d matrices go back to the OS, not only to the heap

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.pending.clear()


def probe(
    base: Any,
    tuned: Any,
    data: Any = None,
    config: ProbeConfig | None = None,
    *,
    activations: ActivationStats | None = None,
    replicate: Any = None,
    deltas: Any = None,
    progress: bool | None = None,
    **overrides: Any,
) -> ProbeResult:
    """Measure where ΔW = W_tuned − W_base concentrates, for every matrix (and head).

    base, tuned: anything `rwasym.load` accepts; a ``tuned`` Hugging Face checkpoint folder
    (config.json + safetensors) is streamed instead of loaded (module docstring).
    data: corpus for the base model's activation statistics (anything `rwasym.hooks.activations.capture`
    accepts), or pass precomputed ``activations``. config: a `ProbeConfig`, with keyword ``overrides`` of
    its fields (``probe(base, tuned, data, k=16, heads=False)``). Its fields:
    k: subspace dimension (per-head inner spaces of
    size d_head < k use k = d_head; the row records the k used). null_samples: Haar-random
    subspaces for the percentile of the observed f in the Haar null (its law depends only on ΔW's
    spectrum, the side and k, so the activation and prediction rows of one side share one set of
    draws); the row's null_mean
    (k/n) and null_std are the null's exact moments (`rwasym.math.fraction.null_moments`), and
    null_samples < 2 turns the row null off (None). variance: rows also report f and r at the k
    reaching this explained-variance ratio (activation subspaces; `rwasym.math.subspaces.k_reaching`).
    curves: r(k) on a log grid of k for whole matrices, with the exact std of the Haar null of r
    at each k (the null mean of r is exactly 1); ``curve_null_samples`` >= 2 switches that band
    on (it is closed form: no draws, the number itself no longer matters).
    post_norm: where a write matrix's sublayer output is normalised before the residual add (OLMo 2,
    Gemma 2/3: `Model.post_norm_scale`), ``"residual"`` (default) measures the change as it reaches
    the residual stream, diag(γ_post_eff)·ΔW (per-token RMS factored out), on every row of that
    matrix; ``"raw"`` measures the raw ΔW. Rows record ``post_norm_scaled``.
    stats_budget: bytes the float64 activation sums of one capture pass may hold (8·d² per site);
    when the probe's sites need more, its layers are captured in consecutive groups, one forward
    pass per group (`layer_groups`; the numbers are the same). None: half the memory available when the
    probe starts (`rwasym.math.checks.available_memory`); ``float("inf")``: one pass. A one-shot iterator
    of batches is always read in one pass.
    Every row also carries the k-free score ``rho`` = ρ_C = n tr(ΔW C ΔWᵀ)/(tr C ‖ΔW‖²_F) of its side
    (C: the site's covariance for activation rows, W̃_U W̃_Uᵀ for prediction rows; 1 under the Haar
    null, `rwasym.math.fraction.kfree_score`) and ``rho_null_std``, its exact Haar-null spread.
    What the rows locate is ``delta`` (`ProbeConfig.delta`; rows record it): ``replicate=`` is the second tuned
    model of ``delta="noise_floor"`` (rows of W_replicate − W_tuned); ``deltas=`` the {matrix: n_out × n_in}
    mapping of ``delta="given"`` (only those matrices get rows). Activation rows also carry ``mean_fraction``,
    ΔW's share along the site's mean activation direction (which a centred basis cannot see), and every row
    ``random_delta_fraction``, the gradient-shaped null's expected share (docs: concepts/probe).
    readouts: each ΔW's leading directions in words, tokens (write side) and top contexts (collected in this
    capture pass), in ``ProbeResult.readouts`` (`rwasym.analyses.readouts`).
    Mixture-of-experts experts (``blocks.L.mlp.experts.e.W_gate | W_in | W_out``, selected or by default) read
    only the tokens routed to them: their activation rows use the expert's routed statistics
    (`rwasym.hooks.routing.capture_routed`, token-counted C_e or, with ``routing="routing"``, routing-weighted
    C̃_e), captured in a second pass over ``data`` per capture group (the layers of that group's experts; the
    hidden side only where a W_out,e is selected): the read side of W_gate,e / W_in,e against the PCA of the
    routed MLP input (site ``blocks.L.mlp.experts.e.routed_in``), the inner side of W_out,e against that of its
    routed hidden state (``….routed_hidden``); W_out,e's write side is a dense W_out's (the residual stream after
    the block and the prediction subspaces, ΔW unscaled by the routing weight). Their rows carry ``expert``,
    ``routed_tokens`` (N_e), ``mean_routing_weight`` and ``routing``. An expert with N_e < k + 1 gets no row read
    from routed statistics (its prediction and residual write rows remain; its read rows' ``random_delta_fraction``
    is None) and is listed in ``config["few_tokens"]`` with a warning. Experts need the base loaded whole, data=
    (not only activations=, not a one-shot iterator) and a loaded tuned model: otherwise they are left out with a
    warning, or refused when selected. Readouts leave experts out.
    Every number is reproducible from ``seed``. Each (matrix, head) delta is decomposed once
    (`rwasym.math.fraction.delta_spectrum`) and its spectrum reused for every subspace, side and k.
    """
    cfg: ProbeConfig = resolve_config(ProbeConfig, config, overrides, "probe")
    if cfg.delta not in DELTAS:
        raise RwasymError(f"delta must be one of {', '.join(DELTAS)}; got {cfg.delta!r}")
    if (cfg.delta == "noise_floor") != (replicate is not None):
        raise RwasymError(
            "delta='noise_floor' locates W_replicate − W_tuned and needs replicate= (a second tuned model, the same "
            "run with another seed); replicate= is used by delta='noise_floor' only"
            if replicate is None
            else f"replicate= was given with delta={cfg.delta!r}; pass delta='noise_floor' to probe "
            "W_replicate − W_tuned"
        )
    if (cfg.delta == "given") != (deltas is not None):
        raise RwasymError(
            "delta='given' locates the caller's deltas= mapping {matrix name: n_out × n_in tensor}, and deltas= "
            "needs delta='given'; pass both or neither"
        )
    stream, folders = _block_stream(base, tuned, replicate, activations, cfg) if cfg.stream else (None, {})
    base = load(base) if stream is None else stream.model
    if stream is None and cfg.delta in ("tuned", "noise_floor") and not is_checkpoint_folder(tuned):
        tuned = load(tuned)  # a HF folder is streamed
    require_k(cfg.k, base.d_model, "the residual stream (d_model)")
    specs = base.matrices(cfg.matrices)
    no_routing = _no_routing(stream, tuned, data, activations)
    specs = _with_input_sites(base, specs, selected=cfg.matrices is not None, no_routing=no_routing)
    if isinstance(deltas, WeightDeltas):  # lazy (a chain's stage): each ΔW formed when its rows are computed
        specs = [s for s in specs if s.name in deltas]
    elif deltas is not None:  # only the matrices the mapping holds, in float64
        deltas = {name: torch.as_tensor(t).to(torch.float64) for name, t in deltas.items()}
        specs = [s for s in specs if s.name in deltas]
        for s_ in specs:
            if tuple(deltas[s_.name].shape) != s_.shape:
                got = tuple(deltas[s_.name].shape)
                raise RwasymError(f"deltas[{s_.name!r}] has shape {got}; {s_.name} is {s_.shape} (nn.Linear layout)")
    if not specs:
        raise base.unmatched(cfg.matrices)
    if deltas is None:
        deltas = (
            _deltas(base, tuned, replicate, specs, cfg)
            if stream is None
            else _folder_deltas(stream, folders.get("tuned"), folders.get("replicate"), specs, cfg)
        )
        if isinstance(deltas, CheckpointDeltas):  # a checkpoint leaves mixture-of-experts matrices out (warned)
            specs = [s for s in specs if s.name in deltas]
    if activations is None and data is None:
        raise RwasymError("probe needs data for the activation subspaces: pass data=... or activations=...")
    _refuse_identical(deltas, specs, cfg, base, tuned, replicate)  # before any capture: nothing is lost
    if activations is not None and (cfg.exclude_positions or cfg.exclude_tokens):
        raise RwasymError(
            "exclude_positions / exclude_tokens apply to the probe's own capture; with precomputed activations= pass "
            "them to rwasym.hooks.activations.capture instead, or pass data= and let the probe capture"
        )
    readouts, watch = [], {}
    if cfg.readouts:  # directions before the capture, contexts collected in it
        if stream is not None or activations is not None or deltas is None:
            raise RwasymError(
                "readouts collect their contexts in the probe's own capture pass: not with stream=True or "
                "precomputed activations= (pass data= and let the probe capture), and they read a ΔW (not with "
                "delta='random_delta', which draws one per row)"
            )
        dense = [s for s in specs if s.expert is None]  # experts: no readouts (no hook collects their contexts)
        readouts, watch = plan_readouts(base, dense, deltas, cfg.readouts, cfg.readout_top, cfg.post_norm)
    generator = torch.Generator().manual_seed(cfg.seed)
    with contextlib.nullcontext() if stream is None else stream.outside():  # the unembedding read, then freed
        preds, n_fisher = _prediction_bases(base, data, cfg, progress)
    rows: list[dict] = []
    curve_rows: list[dict] = []
    # on two threads the eigendecompositions run on a worker thread beside the rows (each on one
    # thread: measured 41 s against 59 s in place on the real pair); with more threads the large
    # ones run in place on all of them. The many small ops of the rows run on one thread either way.
    threads = torch.get_num_threads()
    overlap = threads == 2
    normalized = "activation_normalized" in cfg.subspace_list()
    sites = probe_sites(base, specs, normalized)
    if stream is not None:
        budget = float("inf")  # one streamed pass: each block's sums are freed after its rows
    else:
        budget = _budget(base, cfg.stats_budget, data)
    groups = (
        [specs]
        if activations is not None or stream is not None
        else layer_groups(specs, {**sites, **routed_sites(specs)}, budget)
    )
    few_tokens: list[str] = []
    n_tokens = None if activations is None else activations.n_tokens
    if stream is not None:
        n_tokens = _streamed_rows(stream, data, specs, sites, deltas, preds, cfg, generator, progress, rows, curve_rows)
        groups = []
    for group in tqdm(groups, desc="probe passes", disable=quiet(progress) or len(groups) == 1):
        if activations is None:  # captured here, one pass per group: its float64 sums are freed layer by layer
            group_sites = probe_sites(base, group, normalized) if len(groups) > 1 else sites
            routed = _routed_statistics(base, data, group, cfg, progress)  # experts: a pass of their own
            acts = (
                capture(
                    base,
                    data,
                    sites=group_sites,
                    batch_size=cfg.batch_size,
                    max_tokens=cfg.max_tokens,
                    progress=progress,
                    exclude_positions=cfg.exclude_positions,
                    exclude_tokens=cfg.exclude_tokens,
                    contexts={s.name: watch[s.name] for s in group if s.name in watch} or None,
                    context_top=cfg.readout_top,
                )
                if group_sites
                else ActivationStats(stats={}, model=base)
            )
            fill_contexts(readouts, acts.contexts, base.tokenizer)
            n_tokens = acts.n_tokens if group_sites else routed.n_tokens
            covs = _Covariances(acts, cfg.center, owned=True, overlap=overlap, threads=threads, **_solver(cfg))
            routed.attach(covs)
            few_tokens += routed.few
        else:  # the caller's statistics stay untouched
            covs = _Covariances(activations, cfg.center, owned=False, overlap=overlap, threads=threads, **_solver(cfg))
        try:
            with linalg_threads(1):
                _probe_rows(
                    base,
                    group,
                    deltas,
                    covs,
                    preds,
                    cfg,
                    generator=generator,
                    progress=progress,
                    rows=rows,
                    curve_rows=curve_rows,
                )
        finally:
            covs.close()
        del covs
    recorded = {  # JSON-equal (sequences as lists); stats_budget left out: no number needs it
        name: list(value) if isinstance(value, tuple) else value
        for name, value in cfg.to_dict().items()
        if name != "stats_budget"
    }
    located = {row["matrix"] for row in rows}
    few = set(few_tokens)  # too few routed tokens for k: no routed rows (perhaps none at all), reported apart
    unchanged = [  # ΔW = 0: skipped, never r = NaN
        spec.name
        for spec in specs
        if spec.name not in located and not (spec.expert is not None and spec.name.rsplit(".", 1)[0] in few)
    ]
    if few_tokens:
        warnings.warn(
            f"rwasym.probe: {len(few_tokens)} mixture-of-experts experts received fewer than k + 1 = {cfg.k + 1} "
            f"routed tokens and get no rows from routed statistics: {', '.join(few_tokens[:4])}"
            f"{' …' if len(few_tokens) > 4 else ''}; the result lists them under config['few_tokens']",
            stacklevel=2,
        )
    if unchanged and not rows:
        raise RwasymError(
            f"ΔW = 0 in every selected matrix ({len(specs)}): the two models are the same there, so there is nothing "
            "to locate; check the checkpoints with `rwasym audit BASE TUNED`, or select other matrices"
        )
    if unchanged:
        warnings.warn(
            f"rwasym.probe: {len(unchanged)} of {len(specs)} matrices have ΔW = 0 (untouched: frozen, outside an "
            f"adapter, or identical checkpoints) and get no rows: {', '.join(unchanged[:4])}"
            f"{' …' if len(unchanged) > 4 else ''}; the result lists them under config['unchanged']",
            stacklevel=2,
        )
    header: dict[str, Any] = dict(
        **recorded,
        unchanged=unchanged,
        few_tokens=few_tokens,
        n_tokens=n_tokens,
        capture_passes=1 if stream is not None else len(groups),
        **_provenance(base, tuned, data),
    )
    if n_fisher is not None:
        header["fisher_tokens"] = n_fisher
    if replicate is not None:
        header["replicate"] = str(replicate.source) if isinstance(replicate, Model) else os.fspath(replicate)
    if cfg.readouts and "prediction" in preds:
        readouts += prediction_readouts(base, preds["prediction"].U, cfg.readouts, cfg.readout_top)
    return ProbeResult(rows=rows, curves=curve_rows, config=header, readouts=readouts)


def _prediction_bases(base: Model, data: Any, cfg: ProbeConfig, progress: bool | None) -> tuple[dict, int | None]:
    """{prediction subspace: full basis (k = d_model)} for the chosen ones, and the Fisher pass's token count."""
    chosen = cfg.subspace_list()
    w_raw, gamma = base.unembedding_parts()  # diag(γ)·W_U folded in chunk by chunk: no float64 copy of W_U
    out: dict = {}
    if "prediction" in chosen:
        out["prediction"] = prediction_basis(w_raw, base.d_model, row_scale=gamma)
    if "prediction_centered" in chosen:
        out["prediction_centered"] = prediction_basis(w_raw, base.d_model, center_vocab=True, row_scale=gamma)
    n_fisher = None
    if "prediction_fisher" in chosen:
        if data is None or isinstance(data, Iterator):
            raise RwasymError(
                "subspaces with prediction_fisher need data= as tokens, a dict or a text file (its own forward pass "
                "reads it again), not only precomputed activations or a one-shot iterator"
            )
        stats = prediction_statistics(
            base,
            data,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            progress=progress,
            exclude_positions=cfg.exclude_positions,
            exclude_tokens=cfg.exclude_tokens,
        )
        out["prediction_fisher"] = pca_basis(stats.fisher(base.unembedding()), base.d_model)
        n_fisher = stats.count
    return out, n_fisher


def _refuse_identical(deltas: Any, specs: Sequence[MatrixSpec], cfg: ProbeConfig, *sources: Any) -> None:
    """RwasymError when ΔW is exactly zero in every selected matrix (`rwasym.models.audit.unchanged_matrices`:
    in memory for loaded models, byte for byte for checkpoint folders), before the probe captures anything."""
    if cfg.delta not in ("tuned", "noise_floor") or not isinstance(deltas, WeightDeltas):
        return
    zero = unchanged_matrices(deltas.base, deltas.tuned, [spec.name for spec in specs], until_changed=True)
    if zero is not None and len(zero) == len(specs):
        names = [
            (str(m.source) if m.source is not None else "a model in memory") if isinstance(m, Model) else str(m)
            for m in sources
            if m is not None
        ]
        which = "tuned and replicate" if cfg.delta == "noise_floor" else "base and tuned"
        raise RwasymError(
            f"{which} are identical in every selected matrix ({len(specs)} of them, ΔW = 0 exactly; sources "
            f"{', '.join(repr(n) for n in names if n)}): the probe would locate nothing. Pass the other checkpoint, "
            "or check them with `rwasym audit`"
        )


def _with_input_sites(
    base: Model, specs: list[MatrixSpec], *, selected: bool, no_routing: str | None = None
) -> list[MatrixSpec]:
    """``specs`` without the matrices that have no input site read by every token (`Model.no_input_site`) and
    no routed statistics to stand for one: mixture-of-experts experts are kept (their rows read routed statistics,
    `routed_sites`) unless ``no_routing`` says why the probe cannot capture those; the rest (e.g. Qwen2-MoE's
    shared W_out) are left out with a warning by default, refused (RwasymError) when the caller selected them."""
    why = {s.name: None if s.expert is not None and no_routing is None else base.no_input_site(s.name) for s in specs}
    left_out = [name for name, reason in why.items() if reason is not None]
    if left_out and selected:
        expert = base.matrix(left_out[0]).expert is not None
        raise RwasymError(
            f"rwasym.probe: {left_out[0]} has no input site read by every token ({why[left_out[0]]})"
            + (
                f", and this probe cannot capture routed statistics ({no_routing})"
                if expert
                else ", and the probe has no statistics for it"
            )
            + "; select other matrices (e.g. 'blocks.*.attn.*')"
        )
    if left_out:
        because = (
            f"; experts need routed statistics, which this probe cannot capture: {no_routing}" if no_routing else ""
        )
        warnings.warn(
            f"rwasym.probe: {len(left_out)} matrices have no input site read by every token and are left out "
            f"(e.g. {left_out[0]}: {why[left_out[0]]}){because}",
            stacklevel=3,
        )
    return [s for s in specs if why[s.name] is None]


def _no_routing(stream: Any, tuned: Any, data: Any, activations: Any) -> str | None:
    """Why this probe cannot capture the routed statistics of mixture-of-experts experts, or None when it can:
    it needs the base loaded whole (not streamed block by block), data= to read (not only precomputed
    activations=, and not a one-shot iterator, which the probe's own capture reads), and a loaded tuned model (a
    tuned checkpoint folder's deltas leave experts out)."""
    if stream is not None:
        return "stream=True reads the base block by block"
    if data is None or activations is not None:
        return "it needs data= for its own routed capture, not precomputed activations="
    if isinstance(data, Iterator):
        return "data is a one-shot iterator, which the routed capture cannot read a second time"
    if is_checkpoint_folder(tuned):
        return "the tuned model is a checkpoint folder read without loading"
    return None


@dataclass
class _Routed:
    """One group's routed expert statistics: site → `RunningCovariance` (experts with enough tokens only), the
    extra fields of each expert's rows, the experts with too few tokens and whether the statistics are weighted."""

    stats: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    absent: set = field(default_factory=set)
    few: list = field(default_factory=list)
    weighted: bool = False
    n_tokens: int | None = None

    def attach(self, covs: "_Covariances") -> None:
        covs.activations.stats.update(self.stats)
        covs.absent |= self.absent
        covs.experts.update(self.experts)
        if self.weighted:
            covs.biased |= set(self.stats)


def _routed_statistics(base: Model, data: Any, group: Sequence[MatrixSpec], cfg: ProbeConfig, progress: Any) -> _Routed:
    """The routed statistics of the expert matrices in ``group`` (`rwasym.hooks.routing.capture_routed` over
    their layers, one pass of its own; the hidden side only where a W_out,e is selected), with the probe's
    batch_size, max_tokens and exclusions and ``cfg.routing``'s weighting. Experts with N_e < k + 1 routed
    tokens (`RoutedStats.few_tokens`) get no statistics: their sites are ``absent`` and they are listed in ``few``."""
    from ..hooks.routing import capture_routed

    experts = [s for s in group if s.expert is not None]
    if not experts:
        return _Routed()
    routed = capture_routed(
        base,
        data,
        layers=sorted({s.layer for s in experts}),
        weighting=cfg.routing,
        hidden=any(s.kind == "W_out" for s in experts),
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        progress=progress,
        exclude_positions=cfg.exclude_positions,
        exclude_tokens=cfg.exclude_tokens,
    )
    few = set(routed.few_tokens(cfg.k))
    out = _Routed(weighted=cfg.routing == "routing", n_tokens=routed.n_tokens)
    for spec in experts:
        if spec.expert is None:  # never: `experts` holds expert matrices only
            continue
        key, site = (spec.layer, spec.expert), _input_site(base, spec)
        out.experts[key] = dict(
            expert=key[1],
            routed_tokens=routed.count(*key),
            mean_routing_weight=routed.mean_routing_weight(*key),
            routing=cfg.routing,
        )
        if f"blocks.{key[0]}.mlp.experts.{key[1]}" in few:
            out.absent.add(site)
        else:
            out.stats[site] = routed.for_matrix(spec.name)
    out.few = sorted({name.rsplit(".", 1)[0] for name in (s.name for s in experts)} & few, key=_expert_order)
    return out


def _expert_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[1]), int(parts[4])


def _deltas(base: Model, tuned: Any, replicate: Any, specs: Sequence[MatrixSpec], cfg: ProbeConfig) -> Any:
    """{matrix: what its rows locate}, each formed when read (a tuned folder's W read from its files);
    None for ``random_delta``, drawn in `_probe_rows` from the capture's input scatter."""
    names = [s.name for s in specs]
    if cfg.delta == "base_weight":  # the reference rows: W_base in place of ΔW
        return ModelWeights(base, names)
    if cfg.delta == "random_delta":
        return None
    if cfg.delta == "noise_floor":  # W_replicate − W_tuned: what two seeds of one run disagree on
        if not isinstance(tuned, Model):
            raise RwasymError("delta='noise_floor' needs a loaded tuned model (not a streamed folder); load it first")
        if is_checkpoint_folder(replicate):
            return CheckpointDeltas(tuned, replicate, cfg.matrices)
        return weight_deltas(tuned, load(replicate), cfg.matrices, lazy=True)
    if isinstance(tuned, Model):
        return weight_deltas(base, tuned, cfg.matrices, lazy=True)
    return CheckpointDeltas(base, tuned, cfg.matrices)


def uses_topk(spectral: str, spectral_k: int, n: int) -> bool:
    """Whether a site ``n`` wide gets the top-k solver under `ProbeConfig.spectral` (``topk``, or ``auto`` above
    `AUTO_TOPK_ABOVE`) rather than a full eigh; never when ``spectral_k`` reaches ``n``."""
    return spectral_k < n and (spectral == "topk" or (spectral == "auto" and n > AUTO_TOPK_ABOVE))


def _solver(cfg: ProbeConfig) -> dict:
    """`_Covariances` options from the config (random_delta draws ΔW from the sums S, so they are kept)."""
    return {
        "spectral": cfg.spectral,
        "spectral_k": max(cfg.spectral_k, cfg.k),
        "keep_sums": cfg.delta == "random_delta",
    }


def _block_stream(base: Any, tuned: Any, replicate: Any, activations: Any, cfg: ProbeConfig) -> tuple[Any, dict]:
    """The `BlockStream` of a ``stream=True`` probe, after checking what streaming can serve, and the local
    folders of the other sources it reads ({"tuned": …, "replicate": …}: each hub name resolved once, here)."""
    from ..models.streaming import BlockStream

    folders = {} if isinstance(base, BlockStream) else {"base": base}
    if cfg.delta in ("tuned", "noise_floor"):
        folders["tuned"] = tuned
    if cfg.delta == "noise_floor":
        folders["replicate"] = replicate
    resolved = {}
    for role, source in folders.items():
        resolved[role] = checkpoint_folder(source)  # a folder, or a hub name's safetensors snapshot
        if resolved[role] is None:
            raise RwasymError(
                f"stream=True reads every model from a Hugging Face checkpoint folder (config.json + safetensors) or "
                f"a hub name's safetensors snapshot; "
                f"the {role} is {source!r}: save it once with rwasym.save_model, or probe without stream=True"
            )
    if activations is not None:
        raise RwasymError("stream=True captures its own statistics block by block; pass data=, not activations=")
    unsupported = [x for x in cfg.subspace_list() if x in ("prediction_fisher", "activation_normalized")]
    if unsupported:
        raise RwasymError(
            f"stream=True does not compute the {unsupported[0]} subspace yet (it needs the whole forward pass); "
            "leave it out of subspaces, or probe without stream=True"
        )
    stream = base if isinstance(base, BlockStream) else BlockStream(resolved.pop("base"))
    return stream, resolved


def _folder_deltas(stream: Any, tuned: Any, replicate: Any, specs: Sequence[MatrixSpec], cfg: ProbeConfig) -> Any:
    """`_deltas` of a streamed probe: every W read from the checkpoint folders when looked up."""
    from ..models.checkpoint import CheckpointWeights
    from ..models.deltas import WeightDeltas, check_same_architecture

    names = [s.name for s in specs]
    base_w = CheckpointWeights(stream.folder)
    if cfg.delta == "base_weight":
        return base_w
    if cfg.delta == "random_delta":
        return None
    tuned_w = CheckpointWeights(tuned)
    check_same_architecture(stream.model, tuned_w.model)
    if cfg.delta == "noise_floor":
        replicate_w = CheckpointWeights(replicate)
        check_same_architecture(stream.model, replicate_w.model)
        return WeightDeltas(tuned_w, replicate_w, names)
    return WeightDeltas(base_w, tuned_w, names)


def _streamed_rows(
    stream: Any,
    data: Any,
    specs: Sequence[MatrixSpec],
    sites: dict[str, int],
    deltas: Any,
    preds: dict,
    cfg: ProbeConfig,
    generator: torch.Generator,
    progress: bool | None,
    rows: list[dict],
    curve_rows: list[dict],
) -> int:
    """The rows of a streamed probe: each block's statistics captured (`capture_blocks`), its rows computed
    while the block is read (its norms' γ included), then both freed. Returns the token count."""
    from ..hooks.activations import capture_blocks

    n_tokens = 0
    by_layer: dict[int, list[MatrixSpec]] = {}
    for spec in specs:
        by_layer.setdefault(spec.layer, []).append(spec)
    blocks = capture_blocks(
        stream,
        data,
        sites=sites,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        progress=progress,
        exclude_positions=cfg.exclude_positions,
        exclude_tokens=cfg.exclude_tokens,
    )
    # Rows at 8B widths are GEMMs and eigensolvers on 4096–14,336-wide matrices, where every thread pays (a
    # 4096² float64 Gram: 1.4 s on 2 threads); below 1024 they are small products that one thread runs faster
    threads = torch.get_num_threads() if stream.model.d_model >= 1024 else 1
    for layer, acts in blocks:
        n_tokens = acts.n_tokens
        covs = _Covariances(acts, cfg.center, owned=True, threads=threads, **_solver(cfg))
        try:
            with linalg_threads(threads):
                _probe_rows(
                    stream.model,
                    by_layer.get(layer, []),
                    deltas,
                    covs,
                    preds,
                    cfg,
                    generator=generator,
                    progress=False,
                    rows=rows,
                    curve_rows=curve_rows,
                )
        finally:
            covs.close()
        del covs, acts
    return n_tokens


def _matrix_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one matrix's draw, from the seed and the matrix name only (the draw does not depend on
    which other matrices a probe selects)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _provenance(base: Model, tuned: Model | str | os.PathLike | None, data: Any) -> dict:
    """Where the numbers came from: package versions, model sources and dtype, a data fingerprint."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if isinstance(data, torch.Tensor):
        fingerprint = f"tokens:{data_hash(data)}"
    elif isinstance(data, (str, os.PathLike)):
        fingerprint = f"file:{os.fspath(data)}"
    elif isinstance(data, dict) and isinstance(data.get("input_ids"), torch.Tensor):
        fingerprint = f"tokens:{data_hash(data['input_ids'])}"
    else:
        fingerprint = None  # batches from an iterable or precomputed activations

    def src(m: Model | str | os.PathLike | None) -> str | None:
        m = m.source if isinstance(m, Model) else m  # a path: a streamed checkpoint folder
        return None if m is None else os.fspath(m) if isinstance(m, (str, os.PathLike)) else str(m)

    def quantized(m: Model | str | os.PathLike | None) -> dict | None:  # a GGUF source: hash and quantization types
        g = m.provenance.get("gguf") if isinstance(m, Model) else None
        return None if g is None else {k: g.get(k) for k in ("sha256", "tensor_types")}

    streamed = tuned is not None and not isinstance(tuned, Model)  # None: delta="base_weight"
    return dict(
        version=__version__,
        torch=torch.__version__,
        transformer_lens=version("transformer-lens"),
        base=src(base),
        tuned=src(tuned),
        tuned_adapter=isinstance(tuned, Model) and tuned.adapter is not None,
        tuned_streamed=streamed,
        dtype=str(base.dtype),
        base_gguf=quantized(base),
        tuned_gguf=quantized(tuned),
        data=fingerprint,
    )


def _probe_rows(
    base: Model,
    specs: Sequence[MatrixSpec],
    deltas: Any,
    cov: "_Covariances",
    preds: dict,
    cfg: ProbeConfig,
    *,
    generator: torch.Generator,
    progress: bool | None,
    rows: list[dict],
    curve_rows: list[dict],
) -> None:
    """Append the rows (and r(k) curves) of ``specs`` to ``rows`` / ``curve_rows``: every side, subspace and
    head of each ΔW in ``deltas``, against the covariances ``cov`` and the full prediction basis."""
    k, null_samples, heads, curves = cfg.k, cfg.null_samples, cfg.heads, cfg.curves
    chosen = cfg.subspace_list()
    bases: dict = {}  # (site, head) -> eigenbasis of a per-head input block (small)

    def full_basis(c_h, site, head):
        if head is None:
            return cov.basis(site)
        if (site, head) not in bases:
            bases[(site, head)] = pca_basis(c_h, c_h.shape[0], center=False)
        return bases[(site, head)]

    def layer_sites(layer):
        own = [spec for spec in specs if spec.layer == layer]
        return list(probe_sites(base, own, "activation_normalized" in chosen)) + list(routed_sites(own))

    layers = list(dict.fromkeys(spec.layer for spec in specs))
    layer = None
    for spec in tqdm(specs, desc="probe", disable=quiet(progress)):
        if spec.layer != layer:  # specs come layer by layer: free the float64 d × d matrices of earlier layers
            layer = spec.layer
            for key in [key for key in bases if _site_layer(key[0]) < layer]:
                del bases[key]
            cov.release(layer)
            if layer == layers[0]:
                cov.prefetch(layer_sites(layer))
            following = layers.index(layer) + 1
            if following < len(layers):  # the next layer's eigendecompositions overlap this layer's rows
                cov.prefetch(layer_sites(layers[following]))
        delta: Any
        site_in = _input_site(base, spec)  # an expert's routed statistics
        absent = site_in in cov.absent  # an expert with too few routed tokens for k: no rows read them
        if deltas is None:  # random_delta: one draw of Σ_t ξ_t a_tᵀ from the input's scatter S = Σ_t a_t a_tᵀ
            if absent:
                continue
            stats = cov.activations[site_in]
            scatter = stats.second_moment() * stats.weight_sum
            delta = gradient_shaped_delta(scatter, spec.n_out, _matrix_generator(cfg.seed, spec.name))
        else:
            delta = deltas[spec.name]  # formed here (`WeightDeltas`), released with the next matrix
        if _energy(delta) == 0.0:
            continue  # untouched matrix (e.g. frozen, or outside a LoRA adapter): nothing to locate
        gamma = base.post_norm_scale(spec.name) if cfg.post_norm == "residual" else None
        if gamma is not None:  # the change as the residual stream sees it: diag(γ_post_eff)·ΔW
            delta = (
                LowRankDelta(gamma[:, None] * delta.B, delta.A, delta.scale)
                if isinstance(delta, LowRankDelta)
                else gamma[:, None] * delta
            )
        spectra: dict = {}  # head -> DeltaSpectrum of that ΔW: one SVD shared by subspaces, sides and k
        grams: dict = {}  # head -> (side, ΔW's smaller Gram) at 8B widths, or None (`_side_gram`)
        nulls: dict = {}  # (head, side, k) -> NullResult: one set of draws shared by the side's subspaces
        resid_side = "input" if spec.side == "read" else "output"
        model_site = site_in if spec.side == "read" else _residual_site(base, spec)
        routed_only = spec.side == "read" and absent
        spaces = []  # (stream, side, subspace, C or None for a prediction basis, site)
        if "activation" in chosen and not routed_only:
            spaces.append(("residual", resid_side, "activation", cov(model_site), model_site))
        spaces += [("residual", resid_side, name, None, "unembedding") for name in chosen if name in preds]
        if spec.side == "write" and "activation_normalized" in chosen:  # what the next sublayer reads
            nsite = _normalized_site(base, spec)
            spaces.append(("residual", "output", "activation_normalized", cov(nsite), nsite))
        if spec.side == "write" and "activation" in chosen and not absent:
            spaces.append(("inner", "input", "activation", cov(site_in), site_in))
        for stream, side, subspace, c, site in spaces:
            for head in [None] + (list(range(spec.n_heads)) if heads and spec.n_heads else []):
                d = delta if head is None else head_slice(spec, delta, head)  # a LowRankDelta stays factored
                if _energy(d) == 0.0:
                    continue
                c_h = c if c is None or side != "input" else head_input_block(spec, c, head)
                n = d.shape[1] if side == "input" else d.shape[0]
                k_used = min(k, n)
                full = preds[subspace] if c_h is None else full_basis(c_h, site, None if c_h is c else head)
                partial = full.k < full.n  # the top-k solver's leading eigenvectors only
                # f(k) for every leading k from one product ΔW U (finite ΔW, orthonormal U: built here), or from
                # ΔW's Gram on this side where one is held (wide matrices: it also gives ρ and the spectrum)
                gram = _side_gram(grams, spectra, d, head, resid_side)
                gram = gram[1] if gram is not None and gram[0] == side else None
                energies = column_energies(d, full.U, side) if gram is None else gram_energies(gram, full.U)
                share = energies / _energy(d)  # (m,) ε_j = e_j / ‖ΔW‖²
                cum = share.cumsum(0)
                fraction = float(cum[k_used - 1])
                # the k-free score ρ_C = n Σ_j ℓ_j ε_j (ℓ = C's eigenvalue shares; `kfree_score`), its null spread
                # from ΔW's spectrum s₂ and c₂ = Σ ℓ_j² (C: the site's covariance, or W̃_U W̃_Uᵀ for prediction)
                ratio = full.explained_variance_ratio
                if partial and c_h is not None:  # from C: ρ_C = n tr(ΔW C ΔWᵀ)/(tr C ‖ΔW‖²), c₂ = tr(C²)/tr(C)²
                    rho = kfree_rho(d, c_h, side) if gram is None else gram_rho(gram, c_h)
                    c2 = (float(torch.linalg.vector_norm(c_h)) / float(c_h.diagonal().sum())) ** 2
                else:
                    rho = n * float((ratio * share[: ratio.shape[0]]).sum())
                    c2 = float(ratio.square().sum())
                # exact mean/std; samples for the percentile. The law depends on ΔW's spectrum, the side
                # and k only, so the subspaces of one side share one set of draws
                if null_samples >= 2 and (head, side, k_used) not in nulls:
                    nulls[(head, side, k_used)] = random_null(
                        _spectrum(spectra, d, head), side, k_used, null_samples, generator
                    )
                null = nulls.get((head, side, k_used))
                # the gradient-shaped null's expected f (`gradient_shaped_fraction`): tr(UᵀMU)/tr M with the
                # input's uncentred M on the input side; γ_post² weights on the output side (else exactly k/n)
                expected: float | None
                if side == "input" and absent:  # no routed statistics for this expert
                    expected = None
                elif side == "input":
                    expected = cov.gradient_share(site_in, _head_block(spec, head), full.U[:, :k_used])
                elif gamma is not None:
                    expected = gradient_shaped_fraction(torch.diag(gamma.square()), full.U[:, :k_used])
                else:
                    expected = k_used / n
                row = dict(
                    layer=spec.layer,
                    matrix=spec.name,
                    kind=spec.kind,
                    matrix_side=spec.side,
                    head=head,
                    stream=stream,
                    side=side,
                    subspace=subspace,
                    site=site,
                    k=k_used,
                    n=n,
                    fraction=fraction,
                    relative=fraction * n / k_used,
                    null_mean=None if null is None else null.mean,
                    null_std=None if null is None else null.std,
                    null_percentile=None if null is None else null.percentile_of(fraction),
                    delta_norm=float(d.norm()),
                    post_norm_scaled=gamma is not None,
                    delta=cfg.delta,
                    rho=rho,
                    rho_null_std=kfree_null_std(_spectrum(spectra, d, head).s2, c2, n) if null_samples >= 2 else None,
                    random_delta_fraction=expected,
                    random_delta_relative=None if expected is None else expected * n / k_used,
                )
                if spec.expert is not None:  # expert, N_e, mean routing weight (dense rows keep their keys)
                    row.update(cov.experts.get((spec.layer, spec.expert), dict(expert=spec.expert)))
                if partial:  # what the solver computed and how well: the largest residual ‖Cu − θu‖ / θ₁
                    residual, converged = cov.certificates.get(site, (float("nan"), False))
                    row.update(spectral_k=full.k, spectral_residual=residual, spectral_converged=converged)
                if c_h is not None:
                    reached = bool(float(ratio.sum()) >= cfg.variance - 1e-12) or not partial
                    if reached:
                        k90 = k_reaching(full.explained_variance_ratio, cfg.variance)
                        f90 = float(cum[k90 - 1])
                        row.update(k_variance=k90, fraction_k_variance=f90, relative_k_variance=f90 * n / k90)
                    else:  # the variance-reaching k lies beyond the eigenpairs computed: said, not guessed
                        row.update(k_variance=None, fraction_k_variance=None, relative_k_variance=None)
                    # the mean activation direction μ̂ (which a centred basis cannot see): ΔW's share along it
                    mu = cov.mean(site)
                    mu = mu if c_h is c or head is None else mu[head_range(spec, head)]
                    if float(mu.norm()) > 0:
                        e = column_energies(d, (mu / mu.norm())[:, None], side)
                        row.update(mean_fraction=float(e[0]) / _energy(d), mean_relative=float(e[0]) / _energy(d) * n)
                rows.append(row)
                if curves and head is None:
                    ks = [kk for kk in log_k_grid(n) if kk <= full.k]  # the computed range only
                    curve = cum[torch.tensor(ks) - 1]
                    band = (
                        [null_moments(_spectrum(spectra, d, head), side, kk) for kk in ks]
                        if cfg.curve_null_samples >= 2
                        else []
                    )  # exact std of f at each k: no draws
                    curve_rows.append(
                        dict(
                            matrix=spec.name,
                            kind=spec.kind,
                            layer=spec.layer,
                            stream=stream,
                            side=side,
                            subspace=subspace,
                            n=n,
                            ks=ks,
                            relative=(curve * n / torch.tensor(ks, dtype=torch.float64)).tolist(),
                            fraction=curve.tolist(),
                            null_relative_std=[b.std * n / kk for b, kk in zip(band, ks)],
                        )
                    )


def _head_block(spec: MatrixSpec, head: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What head ``head`` reads of an input-side d × d matrix or d-vector: its d_head block for W_O (heads index
    the input, `head_input_block`), the whole of it otherwise."""
    if head is None or spec.head_axis != "in":
        return lambda x: x
    sl = head_range(spec, head)
    return lambda x: x[sl, sl] if x.ndim == 2 else x[sl]


def _site_layer(site: str) -> int | float:
    """The block index of a hook name (``blocks.L. ...``); other sites never expire (inf)."""
    parts = site.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else float("inf")


def _side_gram(grams: dict, spectra: dict, d, head, prefer: Side):
    """(side, G) for ΔW (or its head slice) when it is dense with both sides ≥ `GRAM_FROM` (8B widths): G its Gram
    on the smaller side (``prefer`` on a tie), formed once per head, its spectrum stored in ``spectra``, and ρ_C and
    the column energies on that side taken from it (one GEMM where each of them paid one); else None."""
    if head not in grams:
        grams[head] = None
        if isinstance(d, torch.Tensor) and min(d.shape) >= GRAM_FROM:
            n_out, n_in = d.shape
            side: Side = prefer if n_out == n_in else ("input" if n_in < n_out else "output")
            gram = delta_gram(d, side)
            grams[head] = (side, gram)
            spectra.setdefault(head, gram_spectrum(gram, (int(n_out), int(n_in))))
    return grams[head]


def _spectrum(spectra: dict, d, head):
    """The `DeltaSpectrum` of ΔW (or its head slice `head`), computed on first use and kept in `spectra`."""
    if head not in spectra:
        spectra[head] = delta_spectrum(d)
    return spectra[head]


def _energy(d) -> float:
    """‖ΔW‖²_F, factored for a LowRankDelta."""
    return d.frobenius_sq() if isinstance(d, LowRankDelta) else float(d.square().sum())
