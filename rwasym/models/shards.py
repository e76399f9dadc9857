"""Deprecated alias of `rwasym.models.checkpoint` (moved in 0.2; removed in 0.3)."""

from rwasym._moved import alias

alias(__name__, "rwasym.models.checkpoint")
