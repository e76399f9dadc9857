"""The study notebooks' one setup: the embedded default pair, its preference pairs and a held-out corpus.

``RWASYM_QUICK=1`` (what the test suite sets) trains a tiny smoke-test pair in seconds; otherwise the full
default pair is built on first use (~5 min on 2 CPU cores) and cached.
"""

import os
from dataclasses import dataclass

from torch import Tensor

from .._version import __version__
from ..data.pairs import PreferencePairs
from ..models import Model
from .default_pair import default_pair, load_default_pairs
from .language import LanguageConfig, corpus

__all__ = ["StudyPair", "default_pair_setup", "quick_mode"]


def quick_mode() -> bool:
    """True when ``RWASYM_QUICK=1``: notebooks and demos run their smoke-test sizes."""
    return os.environ.get("RWASYM_QUICK") == "1"


@dataclass
class StudyPair:
    """A base, its aligned copy, their preference pairs and a corpus from the same language."""

    base: Model
    tuned: Model
    info: dict
    train_pairs: PreferencePairs
    heldout_pairs: PreferencePairs
    tokens: Tensor
    quick: bool


def default_pair_setup(quick: bool | None = None, *, n_tokens_rows: int = 64, show: bool = True) -> StudyPair:
    """The default pair (`rwasym.studies.default_pair`), its train / held-out pairs, and ``n_tokens_rows``
    held-out sequences of its language (seed 10 000, disjoint from training); prints the two models and
    the version line the notebook tests read (``rwasym X, QUICK=...``) when ``show``."""
    quick = quick_mode() if quick is None else quick
    base, tuned, info = default_pair(quick=quick, progress=False)
    train_pairs, heldout_pairs = load_default_pairs(info)
    language = LanguageConfig(**info["spec"]["language"])
    tokens = corpus(n_tokens_rows, info["spec"]["seq_len"], seed=10_000, config=language)
    if show:
        print(base, "\n", tuned)
        print(f"rwasym {__version__}, QUICK={quick}")
    return StudyPair(base, tuned, info, train_pairs, heldout_pairs, tokens, quick)
