"""A procedural language with a known entropy, preference pairs, and loaders for user data.

The language (`Language`, configured by `LanguageConfig`) has four parts:

- **Zipfian unigram** π_v ∝ (v + 1 + zipf_offset)^(−zipf_exponent) over the n = d_vocab − 2
  content tokens (token id = frequency rank), n much larger than d_model.
- **Markov backbone**: a transition matrix T with stationary distribution exactly π and low-rank
  log-structure. K = exp(L) with bigram logits L = σ·U Vᵀ/std (U, V ∈ R^{n×r} Gaussian, r =
  ``markov_rank``, σ = ``markov_logit_std``); Sinkhorn–Knopp scalings give A = D_r K D_c with row
  sums π and column sums π, and T = diag(π)⁻¹ A, so πᵀ T = 1ᵀ A = πᵀ and log T[a, b] = L[a, b] +
  f(a) + g(b): a model with d_model > r can represent the chain exactly, leaving copying as the
  thing left to learn. L is not symmetric, so short a → b → a loops are rare and copying produces
  genuinely long-range repeats.
- **Induction (copy) rule**: when the current token x_{t−1} occurred before, most recently at
  position j, then with probability p the next token is x_{j+1} (the token that followed it last
  time); otherwise x_t ~ T[x_{t−1}].
- **Modes**: every sequence opens with a marker token — ``d_vocab − 2`` (copy mode, p =
  ``copy_prob``, a share ``copy_mode_frac`` of the corpus) or ``d_vocab − 1`` (plain mode, p = 0,
  a pure Markov chain). x_1 ~ π. A pretrained model thus has an induction circuit that it has
  learned to switch off in plain mode; the induction preference rule asks it to copy there too.

The conditional law of x_t given the whole prefix is observable: q_t = p·δ_{x_{j+1}} + (1 − p)·T[x_{t−1}]
when x_{t−1} repeats, else T[x_{t−1}] (p read from the marker). `Language.conditional_entropies`
gives H(q_t) exactly for every position of every sequence, and `entropy_per_token` averages them
over sampled sequences: a Monte-Carlo estimate of E H(x_t | x_<t) over positions 1..seq_len−1 with
its standard error over sequences (for copy_prob = 0 it is exact: (H(π) + (L − 2)·Σ_a π_a H(T[a])) /
(L − 1)). It is the floor of a language model's next-token cross-entropy on the corpus; the unigram
entropy H(π) is the loss of the best context-free predictor (exact for the backbone; copying
re-emits successors of the same token, so the marginal stays ≈ π).

Preference pairs (`make_pairs`, `PairConfig`) come in two rules, prompts in plain mode by default:
``"induction"`` (context-dependent: chosen copies what followed the previous occurrence of the
prompt's last token, rejected is an equally Markov-likely token that never followed it) and
``"class"`` (context-free: chosen is a likely successor inside a fixed token class — 90% of the
content vocabulary — rejected a likely successor from the remaining "avoided" 10%).
"""

import functools
import math
import os
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..data.pairs import PreferencePairs
from ..errors import RwasymError

__all__ = [
    "RULES",
    "EntropyEstimate",
    "Language",
    "LanguageConfig",
    "PairConfig",
    "bigram_accuracy",
    "corpus",
    "entropy_per_token",
    "language",
    "make_pairs",
    "unigram_entropy",
]

RULES = ("induction", "class")
PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------- the language
@dataclass(frozen=True)
class LanguageConfig:
    """The generator's parameters (frozen: a config is a hashable cache key)."""

    d_vocab: int = 512  # vocabulary size; ≫ d_model so the unembedding has a real low-rank structure
    zipf_exponent: float = 1.0  # unigram π_v ∝ (v + 1 + zipf_offset)^-exponent
    zipf_offset: float = 2.7  # flattens the head (Zipf–Mandelbrot); top token ≈ 5% of the mass
    markov_rank: int = 16  # rank r of the bigram logits (≪ d_model: a model can represent T exactly)
    markov_logit_std: float = 4.5  # spread of the bigram logits: larger = peakier rows, lower entropy
    copy_prob: float = 0.6  # p of the induction rule inside copy-mode sequences
    copy_mode_frac: float = 0.5  # share of sequences in copy mode; the rest are plain Markov (p = 0)
    class_fraction: float = 0.9  # share of the content vocabulary in the preferred class ("class" rule)
    seed: int = 0  # seed of the language itself (graph, weights, token class)


@dataclass(frozen=True)
class EntropyEstimate:
    """Entropies in nats per token. ``per_token`` ± ``stderr`` is the generator's conditional
    entropy (exact when copy_prob = 0); ``markov`` = Σ_a π_a H(T[a]); ``unigram`` = H(π)."""

    per_token: float
    stderr: float
    markov: float
    unigram: float
    n_seqs: int
    seq_len: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_config(cfg: LanguageConfig) -> None:
    if cfg.d_vocab < 6:
        raise RwasymError(f"LanguageConfig.d_vocab must be >= 6; got {cfg.d_vocab}.")
    if not 0.0 <= cfg.copy_prob < 1.0:
        raise RwasymError(f"LanguageConfig.copy_prob must lie in [0, 1); got {cfg.copy_prob}.")
    if not 0.0 <= cfg.copy_mode_frac <= 1.0:
        raise RwasymError(f"LanguageConfig.copy_mode_frac must lie in [0, 1]; got {cfg.copy_mode_frac}.")
    if not 0.0 < cfg.class_fraction < 1.0:
        raise RwasymError(f"LanguageConfig.class_fraction must lie in (0, 1); got {cfg.class_fraction}.")
    if cfg.markov_rank < 1 or cfg.markov_logit_std <= 0 or cfg.zipf_exponent < 0:
        raise RwasymError(
            f"LanguageConfig needs markov_rank >= 1, markov_logit_std > 0, zipf_exponent >= 0; got "
            f"markov_rank={cfg.markov_rank}, markov_logit_std={cfg.markov_logit_std}, "
            f"zipf_exponent={cfg.zipf_exponent}."
        )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _draw(cdf: Tensor, g: torch.Generator) -> Tensor:
    """One inverse-CDF draw per row of ``cdf`` (batch, V): the first index with cdf > u."""
    u = torch.rand(cdf.shape[0], 1, generator=g, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)


def _entropy_rows(P: Tensor) -> Tensor:
    """H of each row of a stochastic matrix, 0 log 0 = 0."""
    return -(P * P.clamp_min(1e-300).log()).sum(-1)


class Language:
    """The procedural language of `LanguageConfig` (see the module docstring for the model).

    Attributes: ``unigram`` π (d_vocab,) and ``transition`` T (d_vocab, d_vocab), float64, with
    rows T[a] = P(next | current a) (marker rows are π; marker columns are 0); ``token_class``
    (bool, d_vocab) the preferred class of the "class" rule; ``content`` (bool, d_vocab) the
    non-marker tokens; ``copy_marker`` = d_vocab − 2 and ``plain_marker`` = d_vocab − 1.
    """

    def __init__(self, config: LanguageConfig = LanguageConfig()):
        _check_config(config)
        self.config = config
        V, g = config.d_vocab, _generator(config.seed)
        n = V - 2  # content tokens 0..V-3; V-2 and V-1 are the mode markers
        self.copy_marker, self.plain_marker = V - 2, V - 1
        ranks = torch.arange(1, n + 1, dtype=torch.float64)
        pi = (ranks + config.zipf_offset) ** -config.zipf_exponent
        pi = pi / pi.sum()  # (n,)
        U = torch.randn(n, config.markov_rank, generator=g, dtype=torch.float64)
        Vf = torch.randn(n, config.markov_rank, generator=g, dtype=torch.float64)
        logits = U @ Vf.T  # (n, n) rank-r bigram logits
        logits = logits / logits.std() * config.markov_logit_std
        K = torch.exp(logits - logits.max())  # (n, n) positive, not symmetric: few short a → b → a loops
        r, c = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        for _ in range(10000):  # Sinkhorn–Knopp: diag(r) K diag(c) gets row sums π and column sums π
            r = pi / (K @ c)
            c_new = pi / (K.T @ r)
            if torch.allclose(c_new, c, rtol=1e-13, atol=0.0):
                break
            c = c_new
        A = r[:, None] * K * c_new[None, :]  # (n, n) joint law of a bigram (a, b), both marginals π
        T = A / pi[:, None]
        self.unigram: Float[Tensor, " d_vocab"] = torch.zeros(V, dtype=torch.float64)
        self.unigram[:n] = pi  # markers have no unigram mass (they only open sequences)
        self.transition: Float[Tensor, "d_vocab d_vocab"] = torch.zeros(V, V, dtype=torch.float64)
        self.transition[:n, :n] = T / T.sum(-1, keepdim=True)
        self.transition[n:, :n] = pi  # the first content token after a marker is drawn from π
        n_class = max(1, round(config.class_fraction * n))
        self.token_class: Bool[Tensor, " d_vocab"] = torch.zeros(V, dtype=torch.bool)
        self.token_class[torch.randperm(n, generator=g)[:n_class]] = True
        self.content: Bool[Tensor, " d_vocab"] = torch.arange(V) < n
        self._row_entropy = _entropy_rows(self.transition)  # (V,)
        self._cdf = self.transition.cumsum(-1)  # (V, V) inverse-CDF sampling tables

    @property
    def d_vocab(self) -> int:
        return self.config.d_vocab

    def unigram_entropy(self) -> float:
        """H(π) in nats: the loss of the best context-free predictor."""
        return float(_entropy_rows(self.unigram[None])[0])

    def markov_entropy(self) -> float:
        """Σ_a π_a H(T[a]) in nats: the exact entropy rate when copy_prob = 0."""
        return float((self.unigram * self._row_entropy).sum())

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, n_seqs: int, seq_len: int, seed: int = 0, mode: str = "mix") -> Int[Tensor, "batch pos"]:
        """``n_seqs`` sequences of length ``seq_len`` (int64), reproducible from ``seed``.

        Each row opens with its mode marker; ``mode`` = "mix" (copy mode with probability
        ``copy_mode_frac``), "copy" or "plain" (every row in that mode).
        """
        if n_seqs < 1 or seq_len < 2:
            raise RwasymError(f"sample needs n_seqs >= 1 and seq_len >= 2; got {n_seqs}, {seq_len}.")
        if mode not in ("mix", "copy", "plain"):
            raise RwasymError(f"mode must be 'mix', 'copy' or 'plain'; got {mode!r}.")
        g = _generator(seed)
        coin = torch.rand(n_seqs, generator=g, dtype=torch.float64) < self.config.copy_mode_frac
        copy_mode = coin if mode == "mix" else torch.full((n_seqs,), mode == "copy")
        x = torch.empty(n_seqs, seq_len, dtype=torch.long)
        x[:, 0] = torch.where(copy_mode, self.copy_marker, self.plain_marker)
        p = copy_mode.double() * self.config.copy_prob  # (n_seqs,) float64
        last = torch.full((n_seqs, self.d_vocab), -1, dtype=torch.long)  # last position of each token
        rows = torch.arange(n_seqs)
        for t in range(1, seq_len):
            a = x[:, t - 1]
            j = last[rows, a]  # most recent earlier occurrence of the current token, -1 if none
            last[rows, a] = t - 1
            markov = _draw(self._cdf[a], g)
            copy = (j >= 0) & (torch.rand(n_seqs, generator=g, dtype=torch.float64) < p)
            x[:, t] = torch.where(copy, x[rows, (j + 1).clamp_min(0)], markov)
        return x

    def copy_prob_of(self, tokens: Tensor) -> Tensor:
        """(batch, 1) copy probability of each row: copy_prob in copy mode, 0 in plain mode."""
        return (tokens[:, :1] == self.copy_marker).double() * self.config.copy_prob

    def _copy_targets(self, tokens: Tensor) -> Tensor:
        """y[b, t] = x[b, j+1] for the most recent j < t−1 with x_j = x_{t−1}, else −1 (t ≥ 1)."""
        n, L = tokens.shape
        y = torch.full((n, L), -1, dtype=torch.long)
        last = torch.full((n, self.d_vocab), -1, dtype=torch.long)
        rows = torch.arange(n)
        for t in range(1, L):
            a = tokens[:, t - 1]
            j = last[rows, a]
            last[rows, a] = t - 1
            y[:, t] = torch.where(j >= 0, tokens[rows, (j + 1).clamp_min(0)], -1)
        return y

    def conditional_entropies(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_1"]:
        """Exact H(x_t | x_<t) of the generator at t = 1..pos−1 for each given prefix (nats).

        With a = x_{t−1}, y its copy target and T_y = T[a, y]: without a copy target H = H(T[a]);
        otherwise q = p·δ_y + (1−p)·T[a], so with m = p + (1−p)·T_y

            H = −m log m + (1−p)·(H(T[a]) + T_y log T_y) − (1−p)(1 − T_y)·log(1−p).
        """
        tokens = self._check_tokens(tokens)
        p = self.copy_prob_of(tokens)  # (batch, 1)
        a, y = tokens[:, :-1], self._copy_targets(tokens)[:, 1:]
        h = self._row_entropy[a]  # (batch, pos-1)
        ty = self.transition[a, y.clamp_min(0)]
        m = p + (1 - p) * ty
        mixed = -m * m.log() + (1 - p) * (h + ty * ty.clamp_min(1e-300).log()) - (1 - p) * (1 - ty) * torch.log1p(-p)
        return torch.where((y >= 0) & (p > 0), mixed, h)

    def conditional_logprobs(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_1"]:
        """log q_t(x_t) under the generator at t = 1..pos−1 (its own per-token log-likelihood)."""
        tokens = self._check_tokens(tokens)
        p = self.copy_prob_of(tokens)  # (batch, 1)
        a, b, y = tokens[:, :-1], tokens[:, 1:], self._copy_targets(tokens)[:, 1:]
        t_ab = self.transition[a, b]
        q = torch.where(y >= 0, (1 - p) * t_ab + p * (y == b), t_ab)  # q_t(x_t)
        return q.log()

    def entropy_per_token(
        self, seq_len: int = 64, n_seqs: int = 2000, seed: int = 12345, mode: str = "mix"
    ) -> EntropyEstimate:
        """Monte-Carlo mean of the exact conditional entropies over positions 1..seq_len−1 of
        ``n_seqs`` sequences sampled in ``mode``, with the standard error over sequences."""
        if seq_len < 2 or n_seqs < 2:
            raise RwasymError(f"entropy_per_token needs seq_len >= 2 and n_seqs >= 2; got {seq_len}, {n_seqs}.")
        per_seq = self.conditional_entropies(self.sample(n_seqs, seq_len, seed, mode)).mean(-1)  # (n_seqs,)
        return EntropyEstimate(
            per_token=float(per_seq.mean()),
            stderr=float(per_seq.std() / math.sqrt(n_seqs)),
            markov=self.markov_entropy(),
            unigram=self.unigram_entropy(),
            n_seqs=n_seqs,
            seq_len=seq_len,
        )

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[1] < 2:
            raise RwasymError("tokens must be an integer tensor of shape (batch, pos) with pos >= 2.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.d_vocab):
            raise RwasymError(
                f"token ids must lie in [0, {self.d_vocab}); got range [{int(tokens.min())}, "
                f"{int(tokens.max())}]. Use the language that generated them."
            )
        if bool(self.content[tokens[:, 0]].any()) or not bool(self.content[tokens[:, 1:]].all()):
            raise RwasymError(
                f"rows of this language open with a mode marker ({self.copy_marker} = copy, "
                f"{self.plain_marker} = plain) followed by content tokens only; pass rows from `sample`."
            )
        return tokens.long()


@functools.lru_cache(maxsize=8)
def language(config: LanguageConfig = LanguageConfig()) -> Language:
    """The (cached) `Language` of a config."""
    return Language(config)


def corpus(
    n_seqs: int, seq_len: int, seed: int = 0, config: LanguageConfig = LanguageConfig(), mode: str = "mix"
) -> Int[Tensor, "batch pos"]:
    """``n_seqs`` sequences of the procedural language (int64, shape (n_seqs, seq_len))."""
    return language(config).sample(n_seqs, seq_len, seed, mode)


def entropy_per_token(
    seq_len: int = 64,
    n_seqs: int = 2000,
    seed: int = 12345,
    config: LanguageConfig = LanguageConfig(),
    mode: str = "mix",
) -> EntropyEstimate:
    """The generator's entropy per token (see `Language.entropy_per_token`)."""
    return language(config).entropy_per_token(seq_len, n_seqs, seed, mode)


def unigram_entropy(config: LanguageConfig = LanguageConfig()) -> float:
    """H(π) of the language's Zipfian unigram, nats."""
    return language(config).unigram_entropy()


# --------------------------------------------------------------------------- preference pairs
@dataclass(frozen=True)
class PairConfig:
    """How `make_pairs` builds preference pairs from the language."""

    n_per_rule: int = 1500  # pairs generated for each rule (use many: DPO memorises repeated pairs)
    rules: tuple[str, ...] = RULES  # "induction" (context-dependent) and/or "class" (context-free)
    prompt_len: int = 12  # tokens per prompt, marker included (short: the copy is less diluted by context)
    cont_len: int = 1  # tokens per chosen / rejected continuation
    rejected_top: int = 8  # induction: copy target and rejected[0] both among the top-k successors
    class_top: int = 8  # class rule (and later rejected tokens): draws ∝ T among the top-k successors
    rejected_in_prompt: bool = False  # induction: may rejected occur in the prompt (not after a)? True
    # leaves only a real induction circuit to tell chosen from rejected; False also rewards copying
    # any token from the context
    prompt_mode: str = "plain"  # mode of the prompts: "plain" (the base was taught not to copy there), "copy", "mix"
    seed: int = 0  # seed of the prompts and continuations


def _draw_restricted(probs: Tensor, allowed: Tensor, g: torch.Generator) -> Tensor:
    """One draw per row ∝ probs restricted to ``allowed`` (batch, V); −1 where nothing is allowed."""
    w = torch.where(allowed, probs, 0.0)
    ok = w.sum(-1) > 0
    w = torch.where(ok[:, None], w, 1.0)
    return torch.where(ok, _draw(w.cumsum(-1), g), -1)


def _top_mask(lang: Language, a: Tensor, k: int) -> Tensor:
    """(batch, V) bool: the k most likely successors of each token in ``a``."""
    idx = lang.transition[a].topk(k, dim=-1).indices
    return torch.zeros(len(a), lang.d_vocab, dtype=torch.bool).scatter_(1, idx, True)


def _markov_continue(lang: Language, first: Tensor, n: int, k: int, g: torch.Generator) -> Tensor:
    """Extend ``first`` (batch,) by n − 1 tokens, each drawn ∝ T among the top-k successors."""
    out = [first]
    for _ in range(n - 1):
        out.append(_draw_restricted(lang.transition[out[-1]], _top_mask(lang, out[-1], k), g))
    return torch.stack(out, -1)


def _induction_rows(lang: Language, cfg: PairConfig, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    P, c = cfg.prompt_len, cfg.cont_len
    g = _generator(seed + 1)
    x = lang.sample(max(64, 4 * cfg.n_per_rule), P, seed, cfg.prompt_mode)
    hits = x[:, : P - 1] == x[:, P - 1 :]  # (batch, P-1): earlier occurrences of the last token
    j = torch.where(hits, torch.arange(P - 1), -1).max(-1).values  # most recent one, -1 if none
    keep = (j >= 0) & (j + c <= P - 1)  # the copied span lies inside the prompt
    x, j = x[keep], j[keep]
    chosen = torch.gather(x, 1, (j[:, None] + 1 + torch.arange(c)))  # (batch, c) the copied span
    a, rows = x[:, -1], torch.arange(len(x))
    allowed = _top_mask(lang, a, cfg.rejected_top)
    likely = allowed[rows, chosen[:, 0]]  # the copy target is itself a top-k successor
    if cfg.rejected_in_prompt:  # rejected may occur in the prompt, just never right after a
        seen = torch.zeros_like(allowed, dtype=torch.long).scatter_add_(1, x[:, 1:], hits[keep].long()) > 0
    else:  # rejected occurs nowhere in the prompt
        seen = torch.zeros_like(allowed).scatter_(1, x, True)
    allowed &= ~seen  # (the copy target is restored below)
    allowed[rows, chosen[:, 0]] = likely
    w = lang.transition[a, chosen[:, 0]] / torch.where(allowed, lang.transition[a], 0.0).sum(-1)
    # Keeping a row with probability 1 − w_y makes P(y = i, z = j) ∝ w_i w_j symmetric: without it,
    # drawing z from the rest after y would favour a heavier y (a bigram model would beat 50%).
    symmetric = torch.rand(len(x), generator=g, dtype=torch.float64) < 1 - w
    allowed[rows, chosen[:, 0]] = False  # rejected must break the copy
    first = _draw_restricted(lang.transition[a], allowed, g)
    ok = likely & symmetric & (first >= 0)
    rejected = _markov_continue(lang, first[ok], c, cfg.class_top, g)
    return x[ok], chosen[ok], rejected


def _class_rows(lang: Language, cfg: PairConfig, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    P, c = cfg.prompt_len, cfg.cont_len
    g = _generator(seed + 1)
    x = lang.sample(max(64, 2 * cfg.n_per_rule), P, seed, cfg.prompt_mode)
    good = torch.ones(len(x), dtype=torch.bool)
    cols: dict[bool, list[Tensor]] = {True: [], False: []}
    for in_class in (True, False):
        prev = x[:, -1]
        for _ in range(c):
            allowed = _top_mask(lang, prev, cfg.class_top) & (lang.token_class == in_class) & lang.content
            nxt = _draw_restricted(lang.transition[prev], allowed, g)
            good &= nxt >= 0
            cols[in_class].append(nxt)
            prev = nxt.clamp_min(0)
    return x[good], torch.stack(cols[True], -1)[good], torch.stack(cols[False], -1)[good]


def make_pairs(
    config: PairConfig = PairConfig(), language_config: LanguageConfig = LanguageConfig()
) -> PreferencePairs:
    """Preference pairs of the procedural language, ``n_per_rule`` per rule, rules interleaved.

    - ``"induction"`` (context-dependent): the prompt is a language sample whose last token a
      occurred before, most recently at j (with j + cont_len inside the prompt). chosen = the span
      x_{j+1..j+c} that followed it. rejected[0] is drawn ∝ T[a] among a's ``rejected_top`` most
      likely successors that occur nowhere in the prompt (with ``rejected_in_prompt``: that never
      followed a in it), and only prompts whose copy target is itself among those successors are
      kept, each with probability 1 − w_y (w_y = its share of that top-k mass) — this makes the
      joint law of (chosen[0], rejected[0]) symmetric, so both are equally Markov-likely and only
      the context tells them apart (a bigram model scores near 50%; measure it with
      `bigram_accuracy`). Later rejected tokens continue the Markov chain among top-``class_top``
      successors.
    - ``"class"`` (context-free): from the prompt's last token, chosen follows a Markov path of
      top-``class_top`` successors inside the preferred token class (``class_fraction`` of the
      content vocabulary), rejected one through the avoided rest.
    """
    if config.prompt_len < 2 or config.cont_len < 1 or config.n_per_rule < 1:
        raise RwasymError(f"PairConfig needs prompt_len >= 2, cont_len >= 1, n_per_rule >= 1; got {config}.")
    unknown = [r for r in config.rules if r not in RULES]
    if unknown or not config.rules:
        raise RwasymError(f"unknown rule(s) {unknown or config.rules}; choose from {RULES}.")
    lang = language(language_config)
    parts = []
    for r, rule in enumerate(config.rules):
        build = _induction_rows if rule == "induction" else _class_rows
        rows = [torch.empty(0, n, dtype=torch.long) for n in (config.prompt_len, config.cont_len, config.cont_len)]
        attempt = 0
        while len(rows[0]) < config.n_per_rule:
            if attempt == 20:
                raise RwasymError(
                    f"rule {rule!r} accepted only {len(rows[0])} of {config.n_per_rule} pairs "
                    "after 20 rounds; use a longer prompt_len or a larger top-k."
                )
            new = build(lang, config, config.seed * 1000 + 97 * r + attempt)
            rows = [torch.cat([old, add]) for old, add in zip(rows, new)]
            attempt += 1
        prompt, chosen, rejected = (t[: config.n_per_rule] for t in rows)
        parts.append(
            PreferencePairs(
                prompt, chosen, rejected, rule=torch.full((config.n_per_rule,), r), rule_names=tuple(config.rules)
            )
        )
    pairs = PreferencePairs.concat(parts)
    order = torch.arange(len(pairs)).view(len(parts), -1).T.reshape(-1)  # interleave rules
    return pairs.subset(order)


def bigram_accuracy(pairs: PreferencePairs, config: LanguageConfig = LanguageConfig()) -> float:
    """Fraction of pairs that the Markov backbone alone (no context) scores chosen > rejected:
    Σ log T along each continuation from the prompt's last token. The context-free baseline."""
    T = language(config).transition.log()

    def score(cont: Tensor) -> Tensor:
        path = torch.cat([pairs.prompt[:, -1:], cont], 1)  # (n, c+1)
        return T[path[:, :-1], path[:, 1:]].sum(-1)

    return float((score(pairs.chosen) > score(pairs.rejected)).double().mean())
