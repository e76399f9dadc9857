"""Resumable sweeps of closed-form rank-1 interventions, and target-versus-control summaries.

`sweep` edits every matrix (optionally every head) along target directions (pca / prediction)
and matched controls (random / orthogonal), in one mode (see `rwasym.math.rank1`), and measures
each edited model (`rwasym.analyses.behaviour`). With ``joint=True`` each ``matrices`` entry is a
set edited all at once, at every rank of ``ranks`` (`rwasym.analyses.joint`: rank-r transplants /
ablations into e.g. every layer's W_Q, with per-matrix matched controls); its rows resume, shard
and summarise like the per-matrix ones.

What makes edits comparable (``match``):

- ``"kl"`` (the default): every edit, target and control, is scaled to each budget of collateral
  KL — the mean per-token KL(edited ‖ host) on a collateral text disjoint from the pairs
  (``collateral=``, `rwasym.analyses.behaviour.collateral_set`) — within ``kl_rtol`` (5%), by a
  few evaluations (`rwasym.math.calibration.ScaleSearch`; every edit of a unit in lockstep, one
  batched forward per round). Rows record α, ``collateral_kl``, ``collateral_dce``,
  ``calibration_evals``, ``budget_reached`` and ``saturated`` (a budget the edit cannot reach is a
  flagged row, never a dropped one). With ``ceiling`` (default) each matrix / set also gets its
  full-ΔW row (``direction="ceiling"``): the tuned weights of the set written into the base
  (transplant) or the base's into the tuned model (ablate), what every edit inside it is a fraction of.
- ``"norm"`` / ``"output"``: controls matched to their target's ‖α u vᵀ‖_F / mean-square output
  change at each given α. Equal size is not equal effect: a top-PC edit carries more input energy,
  so these modes compare edits of unequal strength (tests/test_planted.py shows norm matching
  calling a merely bigger direction a win); kept for comparison with earlier results.

The output is a JSON-lines file:

- line 1, the header: ``{"rwasym_sweep": 1, "config_hash": ..., "config": {...}, "reference": {...}}``
  — the configuration (model weight hashes, data hashes, matrices, directions, alphas or KL
  budgets, mode, seed, β, metrics, batching) and the base / tuned reference metrics;
- one line per edit, keyed by ``id`` = hash(matrix, head, direction, index, target, α or KL
  budget, mode, seed).

Write matrices behind a post-sublayer norm (OLMo 2, Gemma 2/3) are edited in the residual convention
(``post_norm="residual"``, the default): directions are chosen on diag(γ_post)·ΔW and written into the raw
weight as diag(γ_post)⁺·E, the pseudo-inverse. Where γ_post,i is exactly zero (gemma-3-270m has such
dimensions) the stream never sees that output dimension, the edit's part there is dropped, and each such row
records ``post_norm_unreachable``, the fraction of ‖E‖²_F dropped.

Each row is flushed and fsynced as soon as it is measured. A re-run with the same configuration
skips finished rows; a half-written last line (a killed run) is dropped with a warning; a file
written by another configuration raises `RwasymError` naming the differing entries. Edits are
measured ``edits_per_pass`` at a time in a fixed plan (the batch an edit is measured in never
depends on what was already done), so a resumed file equals an uninterrupted run's, and a kill
loses at most the edits of the pass in flight (``edits_per_pass=1``: at most the row in flight;
an effect-matched unit is recalibrated whole when any of its rows is missing).

Data parallel (under ``torchrun``, see `rwasym.distributed`): with world_size W > 1 the covariance
capture is sharded by batch, and unit j of the plan (a pass; for ``match="kl"`` every pass of
one calibrated matrix / set) runs on rank j mod W, which appends its rows
to ``<out>.rank<r>.jsonl`` (resumable like ``<out>``; rows already in ``<out>`` or in any rank
file, e.g. from a run with another W, are skipped). After a barrier rank 0 writes ``<out>``
atomically — the header and every row in plan order, as one uninterrupted process would — and
deletes the rank files; every rank returns the merged rows.

`summarize` compares, per matrix × head × mode × α (or KL budget) × target family, each target
with its own matched controls: the exact within-stratum rank p per (seed, target index), the
exact stratified rank test across strata, the seed-level t-interval of target − mean(controls)
and Holm over the primary metric's tests; pooled means and a bootstrap CI are descriptive only.
"""

from .config import CONTROLS as CONTROLS
from .config import FORMAT as FORMAT
from .config import MATCHES as MATCHES
from .config import TARGETS as TARGETS
from .config import SweepConfig, parse_directions
from .config import row_id as row_id
from .run import sweep
from .store import merge_shards as merge_shards  # rank files merged by hand in the torchrun tests
from .store import rank_path as rank_path
from .store import read_sweep
from .summary import SweepSummary, summarize

__all__ = ["SweepConfig", "SweepSummary", "parse_directions", "read_sweep", "summarize", "sweep"]
