"""Deprecated alias of `rwasym.studies.default_pair` (moved in 0.2; removed in 0.3)."""

from rwasym._moved import alias

alias(__name__, "rwasym.studies.default_pair")
