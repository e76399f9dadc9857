"""What a probe will cost, before it runs: peak memory and wall time from the model's shapes, the token count
and this machine's measured throughput (issue #31: `rwasym probe` prints it before a long run).

Memory is the sum of what is alive together at the peak, each holder named in ``memory``:
- resident (`rwasym.load`): the model's parameters, the float64 sums of the largest capture pass (8·d² per
  site, `rwasym.analyses.probe.layer_groups` under ``stats_budget``), the covariance and eigenbasis of the
  widest site, three float64 n_out × n_in matrices (W_base, W_tuned, ΔW) and the interpreter;
- streamed (``stream=True``): the larger of the embedding phase (the input embedding in float32 and the
  corpus's hidden states) and the block phase (one block's parameters, the hidden states, one block's sums, the
  widest site's covariance and basis, three float64 matrices), plus the interpreter.
Time is a sum of floating-point work at measured rates (float32 and float64 matrix products, `eigh` and
`svdvals` timed on small matrices once per process): the forward (2 · parameters · tokens), the covariance
updates (2 · tokens · d² per site, float32), each site's subspace (a full eigh, or the top-k solver's at most
TOPK_MAX_ITER block products of 2 · d² · (k + 16): an upper bound, flat spectra converge in about half), each
matrix's spectrum (one SVD, or its smaller Gram at ≥ 1024 wide), its projections, and the prediction basis
(the d_model × d_vocab unembedding's Gram). It is an estimate: memory within about a factor 1.5 of the
measured peak, time within a factor 2–3 (benchmarks/RESULTS.md compares both with measurements).
"""

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..math.fraction import GRAM_FROM
from ..models import Model
from .probe import TOPK_MAX_ITER, ProbeConfig, _budget, _solver, layer_groups, probe_sites, uses_topk

_INTERPRETER = 600 * 2**20  # Python with torch, transformers and TransformerLens imported (measured ≈ 450–600 MiB)
_RATES: dict[str, float] = {}


def _rate(what: str) -> float:
    """Operations per second of ``what`` on this machine, measured once per process (≈ 0.5 s in all)."""
    if what not in _RATES:
        g = torch.Generator().manual_seed(0)
        n = 1024 if what == "eigh" else 512  # eigh's rate per n³ still grows below ~1k
        a64 = torch.randn(n, n, generator=g, dtype=torch.float64)
        a32 = a64.float()
        sym = a64 @ a64.T
        tall = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
        ops = {
            "f32": (lambda: a32 @ a32, 2 * n**3),
            "f64": (lambda: a64 @ a64, 2 * n**3),
            "eigh": (lambda: torch.linalg.eigh(sym), n**3),  # per n³
            "svd": (lambda: torch.linalg.svdvals(tall), 2 * n * n * n),  # per m n²
        }
        fn, work = ops[what]
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        _RATES[what] = work / max(time.perf_counter() - start, 1e-6)
    return _RATES[what]


@dataclass(frozen=True)
class ProbeEstimate:
    """An estimate of a probe's peak memory (bytes), wall time (seconds) and disk use (bytes), with its parts."""

    peak_bytes: int
    seconds: float
    disk_bytes: int
    memory: dict[str, int] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        minutes = self.seconds / 60
        when = (
            f"{self.seconds:.0f} s"
            if self.seconds < 120
            else f"{minutes:.0f} min"
            if minutes < 120
            else f"{minutes / 60:.1f} h"
        )
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.parts.items())
        return (
            f"estimate: peak memory ≈ {self.peak_bytes / 2**30:.1f} GiB, wall time ≈ {when} on this machine "
            f"({parts}); disk {self.disk_bytes / 2**30:.1f} GiB"
        )


def _spectrum_seconds(n_out: int, n_in: int) -> float:
    """ΔW's spectrum: an SVD, or from min(n_out, n_in) = 1024 up its smaller Gram and that Gram's eigvalsh."""
    small, large = min(n_out, n_in), max(n_out, n_in)
    if small >= GRAM_FROM:
        return 2 * large * small * small / _rate("f64") + small**3 / _rate("eigh")
    return large * small * small / _rate("svd")


def estimate_probe(
    model: Model, n_tokens: int, config: ProbeConfig | None = None, *, stream: bool = False
) -> ProbeEstimate:
    """The `ProbeEstimate` of ``rwasym.probe`` on ``model`` (loaded or the weightless model of a
    `rwasym.models.streaming.BlockStream`) over ``n_tokens`` tokens with ``config`` (module docstring)."""
    cfg = config or ProbeConfig()
    specs = model.matrices(cfg.matrices)
    sites = probe_sites(model, specs)
    n_tokens = int(n_tokens if cfg.max_tokens is None else min(n_tokens, cfg.max_tokens))
    widest = max(sites.values())
    biggest = max(spec.n_out * spec.n_in for spec in specs)
    per_layer: dict[Any, int] = {}
    for hook, width in sites.items():
        layer = hook.split(".")[1] if hook.startswith("blocks.") else "other"
        per_layer[layer] = per_layer.get(layer, 0) + 8 * width * width

    solver_k = _solver(cfg)["spectral_k"]  # the eigenpairs the probe's solver computes

    def topk(width: int) -> bool:
        return uses_topk(cfg.spectral, solver_k, width)

    basis = {w: (8 * w * (solver_k + 16) if topk(w) else 2 * 8 * w * w) for w in set(sites.values())}
    deltas = 3 * 8 * biggest
    hidden = 2 * 4 * n_tokens * model.d_model
    if stream:
        blocks = [sum(4 * p.numel() for p in block.parameters()) for block in model.bridge.blocks]  # float32
        embed = 4 * model.d_vocab * model.d_model
        block_phase = dict(
            block=max(blocks), sums=max(per_layer.values()), covariance=8 * widest * widest, basis=max(basis.values())
        )
        block_phase.update(deltas=deltas, hidden=hidden)
        phase = block_phase if sum(block_phase.values()) >= embed + hidden else {"embedding": embed, "hidden": hidden}
        memory = {"interpreter": _INTERPRETER, **phase}
    else:
        params = sum(p.numel() * p.element_size() for p in model.bridge.parameters())
        groups = layer_groups(specs, sites, _budget(model, cfg.stats_budget, None))
        group_sums = max(sum(per_layer.get(str(layer), 0) for layer in {s.layer for s in grp}) for grp in groups)
        memory = dict(interpreter=_INTERPRETER, parameters=params, sums=group_sums, covariance=8 * widest * widest)
        memory.update(basis=max(basis.values()), deltas=deltas)
    weights = sum(spec.n_out * spec.n_in for spec in model.matrices())
    subspaces = sum(
        TOPK_MAX_ITER * 2 * w * w * (solver_k + 16) / _rate("f64") if topk(w) else w**3 / _rate("eigh")
        for w in sites.values()
    )
    parts = {
        "forward": 2 * weights * n_tokens / _rate("f32"),
        "statistics": sum(2 * n_tokens * w * w for w in sites.values()) / _rate("f32"),
        "subspaces": subspaces,
        "spectra": sum(_spectrum_seconds(s.n_out, s.n_in) for s in specs),
        "rows": sum(2 * s.n_out * s.n_in * (solver_k + 2 * s.n_in * topk(s.n_in)) for s in specs) / _rate("f64"),
        "prediction": 2 * model.d_model**2 * model.d_vocab / _rate("f64") + model.d_model**3 / _rate("eigh"),
    }
    return ProbeEstimate(
        peak_bytes=int(sum(memory.values())),
        seconds=float(sum(parts.values())),
        disk_bytes=0,
        memory=memory,
        parts=parts,
    )
