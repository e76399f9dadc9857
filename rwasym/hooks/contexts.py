"""Top contexts: the corpus positions that most excite given directions, collected in a capture pass.

For a direction v at a hook site (the input of a matrix, width n), each counted token t has the score
s_t = vᵀ a_t (a_t the site's activation). `TopContexts` keeps, for every column v_j of V (n × m), the ``top``
positions with the largest and the smallest scores seen so far, each with its sequence index, position and the
``window`` token ids ending at that position (padding left out). It is updated once per batch from that batch's
candidates (a top-k of the batch merged with the kept ones), so the cost is one (tokens × n) · (n × m) product
per batch and site: small next to the capture's own Σ a aᵀ (n × n per token).

`rwasym.hooks.activations.capture` fills them when given ``contexts={label: (site, V)}`` and returns them as
``ActivationStats.contexts``.
"""

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RwasymError

__all__ = ["Context", "TopContexts"]


@dataclass(frozen=True)
class Context:
    """One position: its score vᵀa, sequence index (in the order the data was read), position in the row, and the
    token ids of the window ending there."""

    score: float
    seq: int
    pos: int
    ids: tuple[int, ...]


@dataclass
class TopContexts:
    """Streaming top-``top`` and bottom-``top`` of s_t = v_jᵀ a_t for each column of ``V`` (n × m, float64)."""

    V: Float[Tensor, "n m"]
    top: int = 10
    window: int = 12
    best: list[list[Context]] = field(default_factory=list)
    worst: list[list[Context]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.V.dim() != 2 or self.top < 1 or self.window < 1:
            raise RwasymError(
                f"TopContexts needs V of shape (n, m) and top, window >= 1; got {tuple(self.V.shape)}, "
                f"top={self.top}, window={self.window}"
            )
        self.V = self.V.to(torch.float64)
        m = self.V.shape[1]
        self.best, self.worst = [[] for _ in range(m)], [[] for _ in range(m)]

    def add(
        self, rows: Tensor, mask: Tensor | None, tokens: Tensor, seq_offset: int, attention: Tensor | None = None
    ) -> None:
        """One batch: ``rows`` (batch, pos, n) activations, ``mask`` (batch, pos) the counted tokens (None: all),
        ``tokens`` (batch, pos) ids, ``seq_offset`` the index of the batch's first sequence, ``attention`` the
        padding mask (None: no padding), which keeps padding out of the windows."""
        b, p = rows.shape[0], rows.shape[1]
        scores = rows.reshape(b * p, -1).to(torch.float64) @ self.V  # (b·p, m)
        counted = torch.ones(b * p, dtype=torch.bool) if mask is None else mask.reshape(-1).to(torch.bool).cpu()
        if not bool(counted.any()):
            return
        k = min(self.top, int(counted.sum()))
        for sign, kept in ((1.0, self.best), (-1.0, self.worst)):
            s = torch.where(counted[:, None], sign * scores.cpu(), torch.tensor(float("-inf"), dtype=torch.float64))
            values, index = s.topk(k, dim=0)  # (k, m)
            for j in range(scores.shape[1]):
                merged = kept[j] + [
                    self._context(float(sign * values[i, j]), int(index[i, j]), p, tokens, attention, seq_offset)
                    for i in range(k)
                ]
                merged.sort(key=lambda c: -sign * c.score)
                kept[j][:] = merged[: self.top]

    def _context(
        self, score: float, row: int, p: int, tokens: Tensor, attention: Tensor | None, offset: int
    ) -> Context:
        b, pos = divmod(row, p)
        start = max(0, pos - self.window + 1)
        ids = tokens[b, start : pos + 1].cpu()
        if attention is not None:  # padding out of the window (excluded sinks stay: they are text)
            ids = ids[attention[b, start : pos + 1].bool().cpu()]
        return Context(score, offset + b, pos, tuple(int(t) for t in ids))

    def to_dicts(self, j: int) -> dict:
        """Column j's kept positions: {"top": [...], "bottom": [...]}, each a dict of `Context`'s fields."""
        as_dict = lambda c: dict(score=c.score, seq=c.seq, pos=c.pos, ids=list(c.ids))  # noqa: E731
        return {"top": [as_dict(c) for c in self.best[j]], "bottom": [as_dict(c) for c in self.worst[j]]}
