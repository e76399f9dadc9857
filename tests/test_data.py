import json
import math

import jaxtyping
import pytest
import torch

from rwasym.data.pairs import ByteTokenizer, PreferencePairs, load_pairs_jsonl, load_text
from rwasym.errors import RwasymError
from rwasym.studies.language import (
    Language,
    LanguageConfig,
    PairConfig,
    bigram_accuracy,
    corpus,
    entropy_per_token,
    language,
    make_pairs,
    unigram_entropy,
)

SMALL = LanguageConfig(d_vocab=16, markov_rank=2, copy_prob=0.4, copy_mode_frac=0.5, class_fraction=0.5, seed=3)
MARKOV = LanguageConfig(d_vocab=10, markov_rank=2, copy_prob=0.0, seed=1)


def test_zipf_unigram_is_stationary_and_rows_are_distributions():
    lang = Language(SMALL)
    n = 14  # content tokens; 14 and 15 are the copy / plain mode markers
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    zipf = (ranks + SMALL.zipf_offset) ** -SMALL.zipf_exponent
    torch.testing.assert_close(lang.unigram[:n], zipf / zipf.sum())
    assert (lang.copy_marker, lang.plain_marker) == (14, 15) and float(lang.unigram[n:].sum()) == 0.0
    torch.testing.assert_close(lang.transition.sum(-1), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(lang.unigram @ lang.transition, lang.unigram, atol=1e-12, rtol=0)
    assert bool((lang.transition[:, :n] > 0).all()) and float(lang.transition[:, n:].sum()) == 0.0
    assert LanguageConfig().d_vocab >= 4 * 128  # vocabulary much larger than the default d_model


def test_markov_entropy_by_hand_and_against_bigram_counts():
    lang = Language(MARKOV)
    n = 8
    pi, T = lang.unigram.tolist(), lang.transition.tolist()
    by_hand = -sum(pi[a] * T[a][b] * math.log(T[a][b]) for a in range(n) for b in range(n))
    unigram = -sum(p * math.log(p) for p in pi[:n])
    assert lang.markov_entropy() == pytest.approx(by_hand, rel=1e-12)
    assert lang.unigram_entropy() == pytest.approx(unigram, rel=1e-12)
    # plug-in conditional entropy of a long sample's bigram counts (independent estimate)
    x = lang.sample(400, 200, seed=5)[:, 1:]  # drop the mode marker
    counts = torch.zeros(n, n, dtype=torch.float64).index_put_(
        (x[:, :-1].flatten(), x[:, 1:].flatten()), torch.ones(x[:, 1:].numel(), dtype=torch.float64), accumulate=True
    )
    joint = counts / counts.sum()
    cond = counts / counts.sum(-1, keepdim=True)
    plug_in = float(-(joint * cond.clamp_min(1e-300).log()).sum())
    assert plug_in == pytest.approx(by_hand, abs=0.01)
    # position 1 follows the marker (entropy H(π)); later positions carry the Markov entropy
    est = lang.entropy_per_token(seq_len=32, n_seqs=400, seed=2)
    assert abs(est.per_token - (unigram + 30 * by_hand) / 31) < 5 * est.stderr + 1e-9


def test_conditional_entropy_matches_brute_force_mixture():
    lang = Language(SMALL)
    x = lang.sample(6, 24, seed=0)
    H, LP = lang.conditional_entropies(x), lang.conditional_logprobs(x)
    T = lang.transition
    for b in range(6):
        p = SMALL.copy_prob if int(x[b, 0]) == lang.copy_marker else 0.0
        for t in range(1, 24):
            a = int(x[b, t - 1])
            prev = [j for j in range(t - 1) if int(x[b, j]) == a]
            q = T[a].clone()
            if prev and p > 0:
                q = (1 - p) * q
                q[int(x[b, prev[-1] + 1])] += p
            assert float(H[b, t - 1]) == pytest.approx(float(-(q * q.clamp_min(1e-300).log()).sum()), abs=1e-10)
            assert float(LP[b, t - 1]) == pytest.approx(math.log(float(q[x[b, t]])), abs=1e-10)


def test_entropy_estimate_agrees_with_generator_cross_entropy():
    est = entropy_per_token(seq_len=48, n_seqs=300, seed=1, config=SMALL)
    lang = language(SMALL)
    ce = -lang.conditional_logprobs(lang.sample(300, 48, seed=9)).mean(-1)
    assert abs(est.per_token - float(ce.mean())) < 4 * math.hypot(est.stderr, float(ce.std()) / math.sqrt(300))
    assert est.per_token < est.markov < est.unigram  # copying lowers the entropy below the Markov rate
    assert unigram_entropy(SMALL) == est.unigram


def test_corpus_is_seeded_and_shaped():
    a, b, c = (
        corpus(50, 12, seed=1, config=SMALL),
        corpus(50, 12, seed=1, config=SMALL),
        corpus(50, 12, seed=2, config=SMALL),
    )
    assert a.shape == (50, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a[:, 0].tolist()) == {14, 15} and int(a[:, 1:].max()) < 14 and int(a.min()) >= 0
    assert set(corpus(5, 4, config=SMALL, mode="plain")[:, 0].tolist()) == {15}
    plain = language(SMALL).entropy_per_token(24, 200, mode="plain").per_token
    assert language(SMALL).entropy_per_token(24, 200, mode="copy").per_token < plain  # copying lowers entropy


def test_language_config_errors():
    with pytest.raises(RwasymError, match="copy_prob must lie in"):
        Language(LanguageConfig(copy_prob=1.0))
    with pytest.raises(RwasymError, match="token ids must lie in"):
        language(SMALL).conditional_entropies(torch.tensor([[14, 99]]))
    with pytest.raises(RwasymError, match="open with a mode marker"):
        language(SMALL).conditional_entropies(torch.tensor([[3, 4]]))
    with pytest.raises(RwasymError, match="mode must be"):
        language(SMALL).sample(2, 4, mode="other")


def _last_occurrence(row: list[int]) -> int:
    return max(j for j in range(len(row) - 1) if row[j] == row[-1])


@pytest.mark.parametrize("cont_len", [1, 3])
def test_pair_rules_hold_by_construction(cont_len):
    cfg = PairConfig(n_per_rule=60, prompt_len=20, cont_len=cont_len, rejected_top=4, class_top=6, seed=4)
    pairs = make_pairs(cfg, SMALL)
    lang = language(SMALL)
    assert len(pairs) == 120 and pairs.rule_names == ("induction", "class")
    assert set(pairs.prompt[:, 0].tolist()) == {lang.plain_marker}  # prompt_mode="plain"
    assert pairs.prompt.shape == (120, 20) and pairs.chosen.shape == pairs.rejected.shape == (120, cont_len)
    top = lambda a, k: set(lang.transition[a].topk(k).indices.tolist())  # noqa: E731
    for i in range(len(pairs)):
        prompt, ch, rj = pairs.prompt[i].tolist(), pairs.chosen[i].tolist(), pairs.rejected[i].tolist()
        if pairs.rule_names[int(pairs.rule[i])] == "induction":
            j = _last_occurrence(prompt)
            assert ch == prompt[j + 1 : j + 1 + cont_len]  # chosen copies what followed last time
            assert ch[0] in top(prompt[-1], 4) and rj[0] in top(prompt[-1], 4)  # both Markov-likely
            followers = {prompt[k + 1] for k in range(len(prompt) - 1) if prompt[k] == prompt[-1]}
            assert rj[0] not in followers  # rejected never followed the last token: it breaks the copy
        else:
            for path, in_class in ((ch, True), (rj, False)):
                prev = prompt[-1]
                for tok in path:
                    assert bool(lang.token_class[tok]) == in_class and tok in top(prev, 6) and tok < 14
                    prev = tok


def test_induction_pairs_are_context_dependent():
    """A bigram model (no context) is near chance on induction pairs; the generator in copy mode,
    which reads the context, prefers chosen almost always."""
    pairs = make_pairs(PairConfig(n_per_rule=400, rules=("induction",), prompt_mode="copy", seed=3))
    assert 0.35 < bigram_accuracy(pairs) < 0.7
    lang = language(LanguageConfig())
    gen = lambda cont: lang.conditional_logprobs(torch.cat([pairs.prompt, cont], 1))[:, -1]  # noqa: E731
    assert float((gen(pairs.chosen) > gen(pairs.rejected)).double().mean()) > 0.95
    row = lang.transition[pairs.prompt[:1, -1], :-2]  # content successors of the last token
    extremes = PreferencePairs(pairs.prompt[:1], row.argmax(-1, keepdim=True), row.argmin(-1, keepdim=True))
    assert bigram_accuracy(extremes) == 1.0


def test_split_is_stratified_disjoint_and_seeded():
    pairs = make_pairs(PairConfig(n_per_rule=50, prompt_len=16, seed=1), SMALL)
    train, held = pairs.split(0.2, seed=3)
    assert len(train) == 80 and len(held) == 20
    assert {k: len(v) for k, v in held.by_rule().items()} == {"induction": 10, "class": 10}
    rows = lambda p: {tuple(r) for r in torch.cat([p.prompt, p.chosen, p.rejected], 1).tolist()}  # noqa: E731
    assert rows(train) | rows(held) == rows(pairs) and not rows(train) & rows(held)
    again, _ = pairs.split(0.2, seed=3)
    assert torch.equal(again.prompt, train.prompt)
    with pytest.raises(RwasymError, match="held-out fraction"):
        pairs.split(1.5)
    with pytest.raises(RwasymError, match="unknown rule"):
        make_pairs(PairConfig(rules=("nope",)), SMALL)


def test_sequences_pack_masked_rows():
    pairs = PreferencePairs(
        prompt=torch.tensor([[5, 6, 7], [8, 0, 0]]),
        chosen=torch.tensor([[1, 0], [2, 3]]),
        rejected=torch.tensor([[4, 0], [9, 0]]),
        prompt_mask=torch.tensor([[True, True, True], [True, False, False]]),
        chosen_mask=torch.tensor([[True, False], [True, True]]),
        rejected_mask=torch.tensor([[True, False], [True, False]]),
    )
    tokens, target = pairs.sequences("chosen")
    assert tokens.tolist() == [[5, 6, 7, 1], [8, 2, 3, 0]]
    assert target.tolist() == [[False, False, False, True], [False, True, True, False]]
    tokens, target = pairs.sequences("rejected")
    assert tokens.tolist() == [[5, 6, 7, 4], [8, 9, 0, 0]]
    with pytest.raises(RwasymError, match="prefix of each row"):
        PreferencePairs(
            torch.ones(1, 3, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.long),
            prompt_mask=torch.tensor([[True, False, True]]),
        )
    jaxtyping.config.update("jaxtyping_disable", True)  # the suite's shape checker would fire first
    try:
        with pytest.raises(RwasymError, match="same number of rows"):
            PreferencePairs(
                torch.ones(2, 3, dtype=torch.long),
                torch.ones(1, 1, dtype=torch.long),
                torch.ones(1, 1, dtype=torch.long),
            )
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


def test_pairs_save_load_round_trip(tmp_path):
    pairs = make_pairs(PairConfig(n_per_rule=10, prompt_len=12), SMALL)
    back = PreferencePairs.load(pairs.save(tmp_path / "p.safetensors"))
    assert back.rule_names == pairs.rule_names
    for name in ("prompt", "chosen", "rejected", "rule"):
        assert torch.equal(getattr(back, name), getattr(pairs, name))


def test_load_text_bytes_and_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 3)
    rows = load_text(path, seq_len=8)
    assert rows.shape == (3, 8) and rows[0].tolist() == list(b"abcdefgh")
    assert ByteTokenizer().decode(rows[0].tolist()) == "abcdefgh"
    with pytest.raises(RwasymError, match=r"token ids must lie in \[0, 100\)"):
        load_text(path, seq_len=8, d_vocab=100)  # 'a' = 97 ... 'h' = 104
    with pytest.raises(RwasymError, match="fewer than seq_len"):
        load_text(path, seq_len=64)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(RwasymError, match="is empty"):
        load_text(tmp_path / "e.txt")


def test_load_text_with_hf_tokenizer(tmp_path):
    from rwasym.testing import _word_tokenizer

    tok = _word_tokenizer(10)
    path = tmp_path / "w.txt"
    path.write_text("tok3 tok4 tok5 tok3 tok4 tok5")
    assert load_text(path, tok, seq_len=3).tolist() == [[3, 4, 5], [3, 4, 5]]
    with pytest.raises(RwasymError, match=r"token ids must lie in \[0, 4\)"):
        load_text(path, tok, seq_len=3, d_vocab=4)


def test_load_pairs_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "ab", "chosen": "c", "rejected": "de"}, {"prompt": [1, 2, 3], "chosen": [4], "rejected": [5]}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    pairs = load_pairs_jsonl(path, ByteTokenizer())
    assert len(pairs) == 2 and pairs.chosen.shape == pairs.rejected.shape == (2, 2)
    tokens, target = pairs.sequences("rejected")
    assert tokens[0].tolist() == [97, 98, 100, 101] and target[0].tolist() == [False, False, True, True]
    assert tokens[1].tolist() == [1, 2, 3, 5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[1]) + "\n{not json\n")
    with pytest.raises(RwasymError, match="line 2 is not valid JSON"):
        load_pairs_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RwasymError, match="holds no pairs"):
        load_pairs_jsonl(tmp_path / "empty.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": [1], "chosen": [70], "rejected": [2]}))
    with pytest.raises(RwasymError, match=r"line 1 \(chosen\): token ids must lie in \[0, 64\)"):
        load_pairs_jsonl(big, d_vocab=64)
    keys = tmp_path / "keys.jsonl"
    keys.write_text(json.dumps({"prompt": [1], "chosen": [2]}))
    with pytest.raises(RwasymError, match="line 1 must be an object with keys"):
        load_pairs_jsonl(keys)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps(lines[0]))
    with pytest.raises(RwasymError, match="pass a tokenizer"):
        load_pairs_jsonl(text)


def test_generic_text_does_not_depend_on_what_the_caller_imported():
    """The docstring text is built in a fresh interpreter: importing submodules first (as pandas, Jupyter or a test
    runner do) leaves it unchanged, and on the Python the causal re-run used it is the text that run recorded."""
    import hashlib
    import json
    import platform
    import subprocess
    import sys
    from pathlib import Path

    from rwasym.studies.collateral import _docstrings

    code = (
        "import logging.handlers, unittest.mock, json.tool, email.mime.text, hashlib\n"
        "from rwasym.studies.collateral import _docstrings\n"
        "print(hashlib.sha256(_docstrings().encode()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = hashlib.sha256(_docstrings().encode()).hexdigest()
    assert other == here
    recorded = json.loads((Path(__file__).parent.parent / "docs/results/real_causal/collateral_s0.json").read_text())
    if platform.python_version() == recorded["python"]:
        assert here == recorded["sha256"]
