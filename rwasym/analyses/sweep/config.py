"""What a sweep measures (`SweepConfig`, one field = default, help, flag, header entry), the direction spec
and the rows' deterministic ids."""

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import RwasymError
from ...hooks.edits import MODES
from ..options import option as _opt

FORMAT = 1


TARGETS = ("pca", "prediction")


CONTROLS = ("random", "orthogonal", "spectrum", "output_random", "donor")


MATCHES = ("kl", "norm", "output")


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep measures. The sweep file's header, its config hash and the ``rwasym intervene``
    flags all derive from these fields (`header`, `rwasym.app.cli`)."""

    matrices: Sequence[str] = _opt(("blocks.*.attn.W_Q",), "registry globs of the matrices to edit", list_of=str)
    directions: str = _opt(
        "pca:1,random:20,orthogonal:20",
        "kind:count of targets (pca, prediction) and their controls: random, orthogonal (Haar directions; the "
        "edit keeps ΔW's own output / input space), spectrum (the target's direction on a random delta with "
        "ΔW's singular values), output_random (a Haar direction on the matrix's output side, p pᵀ ΔW: for read "
        "matrices it keeps ΔW's input space, not its output structure), donor (joint: the target's frame on a "
        "donor run's ΔW, --control-delta); controls are split over the targets "
        "(matched_to = j mod count), so 20 per "
        "target and family let one seed's rank p reach 1/21 < 0.05",
    )
    alphas: Sequence[int | float] = _opt((1.0,), "edit scales α, e.g. 0.5,1,2", list_of=float)
    mode: str = _opt("transplant", "transplant (base + α u vᵀ) or ablate (tuned − α u vᵀ)", choices=MODES)
    match: str = _opt(
        "kl",
        "what makes edits comparable: kl = every edit (target and control) scaled to each collateral-KL "
        "budget (--kl-budgets; α is calibrated, --alphas unused); norm / output = controls matched to their "
        "target's ‖α u vᵀ‖_F / mean-square output change at the given α (equal size is not equal effect)",
        choices=MATCHES,
    )
    kl_budgets: Sequence[int | float] = _opt(
        (0.01,),
        "match=kl: collateral KL budgets (nats per token, mean KL(edited ‖ host) on the collateral text), "
        "e.g. 0.003,0.01,0.03",
        list_of=float,
    )
    kl_rtol: float = _opt(0.05, "match=kl: relative tolerance of each edit's collateral KL around its budget")
    ceiling: bool = _opt(
        True,
        "add (match=kl) a row per matrix (joint: per set) with its full ΔW transplanted / ablated, the "
        "reference every edit inside it is a fraction of (direction 'ceiling')",
    )
    seed: int = _opt(0, "seeds the control directions (and keys the rows)")
    beta: float = _opt(0.1, "DPO β of the implicit-reward metrics")
    heads: bool = _opt(False, "also edit every attention head separately")
    edits_per_pass: int | None = _opt(
        None,
        "edits measured in one batched forward (default 4 on CPU, 64 on "
        "an accelerator; part of the configuration: batch composition moves "
        "float rounding)",
        type=int,
    )
    max_pairs: int | None = _opt(None, "held-out pairs used (default all)", type=int)
    max_tokens: int | None = _opt(None, "tokens of the covariance capture (default all)", type=int)
    exclude_positions: Sequence[int] = _opt(
        (),
        "positions (from each row's first real token) left out of the frames' covariance, e.g. 0 for BOS",
        list_of=int,
    )
    exclude_tokens: Sequence[int] = _opt(
        (), "token ids left out of the frames' covariance, e.g. the pad id", list_of=int
    )
    reuse_prefix: bool = _opt(True, "score chosen and rejected in one pass where they share a prefix")
    text_metrics: bool = _opt(
        True,
        "ce / kl_base / kl_tuned on the held-out text; --no-text-metrics unembeds the pairs' response positions "
        "only (several times cheaper at a large vocabulary)",
    )
    post_norm: str = _opt(
        "residual",
        "post-sublayer-norm models (OLMo 2, Gemma 2/3): residual = directions, norms "
        "and matching of W_O / W_out edits in diag(γ_post)·ΔW, as the residual stream sees the "
        "change (the edit written is the raw-weight equivalent); raw = on the raw ΔW",
        choices=("residual", "raw"),
    )
    joint: bool = _opt(
        False,
        "edit every matrix of each --matrices entry at once (a set: globs joined by +, or "
        "read / write / all); one row per set, rank, direction and α (rwasym.analyses.joint)",
    )
    ranks: Sequence[int] = _opt(
        (1,),
        "joint: edit ranks r, each edit the top-r target directions of every matrix (controls: random r-frames)",
        list_of=int,
    )
    control_delta: str | None = _opt(
        None,
        "joint: a donor tuned checkpoint of the same base (another seed or run) for the donor control family "
        "(directions donor:N): each target's own frame applied to the donor's ΔW = W_donor − W_base, so the edit "
        "keeps where the target points and takes how much and which output structure from another run",
        type=str,
    )

    def __post_init__(self) -> None:
        for name in ("matrices", "alphas", "ranks", "kl_budgets", "exclude_positions", "exclude_tokens"):
            # lists and single values become tuples
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int, float)) else tuple(value))
        if self.mode not in MODES:
            raise RwasymError(f"mode must be one of {MODES}; got {self.mode!r}")
        parse_directions(self.directions)
        if self.post_norm not in ("residual", "raw"):
            raise RwasymError(f"post_norm must be 'residual' or 'raw'; got {self.post_norm!r}")
        if self.match not in MATCHES:
            raise RwasymError(f"match must be one of {MATCHES}; got {self.match!r}")
        alphas = [float(a) for a in self.alphas]
        if not alphas or len(set(alphas)) != len(alphas) or not all(math.isfinite(a) for a in alphas):
            raise RwasymError(f"alphas must be distinct finite numbers; got {alphas}")
        object.__setattr__(self, "alphas", tuple(alphas))
        budgets = [float(b) for b in self.kl_budgets]
        if not budgets or len(set(budgets)) != len(budgets) or not all(math.isfinite(b) and b > 0 for b in budgets):
            raise RwasymError(f"kl_budgets must be distinct positive numbers such as 0.003,0.01,0.03; got {budgets}")
        object.__setattr__(self, "kl_budgets", tuple(sorted(budgets)))
        if not (isinstance(self.kl_rtol, (int, float)) and 0.0 < float(self.kl_rtol) < 1.0):
            raise RwasymError(f"kl_rtol must be in (0, 1), e.g. 0.05; got {self.kl_rtol!r}")
        if self.match == "kl" and self.alphas != (1.0,):
            raise RwasymError(
                f"alphas={list(self.alphas)} with match='kl': effect-matched sweeps calibrate α to each collateral-KL "
                "budget; pass kl_budgets (--kl-budgets 0.003,0.01) instead, or match='norm' / 'output' to sweep α"
            )
        ranks = self.ranks
        if (
            not ranks
            or len(set(ranks)) != len(ranks)
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks)
        ):
            raise RwasymError(f"ranks must be distinct positive integers such as 1,8; got {list(ranks)}")
        if not self.joint and ranks != (1,):
            raise RwasymError(f"ranks={list(ranks)} needs joint=True (--joint): per-matrix sweeps are rank 1")
        if self.joint and self.heads:
            raise RwasymError("joint edits are whole-matrix edits of a set; drop heads (--heads) or joint (--joint)")
        donor = "donor" in dict(parse_directions(self.directions))
        if donor != (self.control_delta is not None) or (donor and not self.joint):
            raise RwasymError(
                "the donor control family (directions donor:N) and control_delta (--control-delta, a donor tuned "
                "checkpoint) go together, in joint sweeps (--joint); pass both with --joint, or neither"
            )
        e = self.edits_per_pass
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise RwasymError(f"edits_per_pass must be a positive integer; got {e!r}")

    def header(
        self,
        *,
        base: str,
        tuned: str,
        pairs: str,
        cov_data: str,
        matrices: Sequence[str],
        metrics: Any,
        edits_per_pass: int,
        dtype: str,
        post_norm: bool = False,
        collateral: str | None = None,
        donor: str | None = None,
    ) -> dict:
        """The ``config`` of the sweep file's header: this configuration resolved against the run
        (weight and data hashes, matched matrix names, metric names — any iterable of them, e.g. the
        evaluator's metric dict —, the pass width, the dtype).
        Its hash keys the file; ``match`` is absent for "norm" so files from rwasym 0.1 still resume, and
        ``post_norm`` is recorded only for models with post-sublayer norms (``post_norm=True``), the covariance
        exclusions and ``text_metrics`` only when set. An effect-matched (``match="kl"``) header records the
        budgets, the tolerance and ``collateral`` (the collateral text's hash) in place of the α list; a donor
        control records ``control_delta`` (the donor's weights hash)."""
        kinds = parse_directions(self.directions)
        return dict(
            base=base,
            tuned=tuned,
            pairs=pairs,
            cov_data=cov_data,
            matrices=list(matrices),
            heads=bool(self.heads),
            directions=",".join(f"{k}:{c}" for k, c in kinds),
            **({} if self.match == "kl" else {"alphas": list(self.alphas)}),
            mode=self.mode,
            seed=int(self.seed),
            beta=float(self.beta),
            metrics=sorted(metrics),
            edits_per_pass=edits_per_pass,
            max_tokens=self.max_tokens,
            reuse_prefix=bool(self.reuse_prefix),
            dtype=dtype,
            **({} if self.match == "norm" else {"match": self.match}),
            **(
                {
                    "kl_budgets": list(self.kl_budgets),
                    "kl_rtol": float(self.kl_rtol),
                    "collateral": collateral,
                    "ceiling": bool(self.ceiling),
                }
                if self.match == "kl"
                else {}
            ),
            **({"joint": True, "ranks": list(self.ranks)} if self.joint else {}),
            **({"post_norm": self.post_norm} if post_norm else {}),
            **({"control_delta": donor} if self.control_delta is not None else {}),
            **({"exclude_positions": [int(p) for p in self.exclude_positions]} if self.exclude_positions else {}),
            **({"exclude_tokens": [int(t) for t in self.exclude_tokens]} if self.exclude_tokens else {}),
            **({} if self.text_metrics else {"text_metrics": False}),
        )

    def to_dict(self) -> dict:
        return asdict(self)


DESCRIPTORS = (
    "id",
    "matrix",
    "layer",
    "matrix_kind",
    "head",
    "side",
    "direction",
    "index",
    "target",
    "matched_to",
    "alpha",
    "mode",
    "seed",
    "u_norm",
    "edit_norm",
    "input_second_moment",
    "input_energy_ratio",
    "rank",
    "n_matrices",
    "kl_budget",
    "calibration_evals",
)


# --------------------------------------------------------------------------------- parsing
def parse_directions(spec: str) -> list[tuple[str, int]]:
    """``"pca:4,random:32,orthogonal:32"`` → [("pca", 4), ("random", 32), ("orthogonal", 32)]."""
    out: dict[str, int] = {}
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        kind, _, count = part.partition(":")
        if kind not in TARGETS + CONTROLS or not count.strip().isdigit() or int(count) < 1 or kind in out:
            raise RwasymError(
                f"bad direction spec {part!r} in {spec!r}: write kind:count with kind in "
                f"{', '.join(TARGETS + CONTROLS)}, each once, count >= 1 (e.g. pca:4,random:32)"
            )
        out[kind] = int(count)
    if not any(k in out for k in TARGETS):
        raise RwasymError(
            f"direction spec {spec!r} has no target kind: add pca:k (read side) or "
            "prediction:k (write side); controls are matched to the targets"
        )
    return list(out.items())


def stable_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (sorted keys): config hashes, row ids, seeds of control draws."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def row_id(
    matrix: str,
    head: int | None,
    direction: str,
    index: int,
    target: str,
    alpha: float,
    mode: str,
    seed: int,
    budget: float | None = None,
) -> str:
    """The deterministic key of one sweep row (an effect-matched row is keyed by its KL ``budget``, not its α)."""
    return stable_hash([matrix, head, direction, index, target, *scale_key(alpha, budget), mode, int(seed)])


def scale_key(alpha: float, budget: float | None = None) -> list:
    """The part of a row id that says how strong the edit is: its α, or ``["kl", budget]`` for an
    effect-matched row (whose α is calibrated, not chosen)."""
    return [float(alpha)] if budget is None else ["kl", float(budget)]
