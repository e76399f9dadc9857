"""The study's offline corpora (`rwasym.studies.corpora`): shards are disjoint by unit and stable, rows are
what the model reads (BOS, one document, right padding) and give back each document's tokens, preference
pairs never reject with an item's own sentence, and man pages render from any folder."""

import collections
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from rwasym import RwasymError
from rwasym.studies import corpora as c

pytestmark = pytest.mark.unit


class _CharTokenizer:
    """One token per character (ids 3 + code point mod 997), BOS 1, pad 0: lengths are known by hand."""

    bos_token_id, pad_token_id = 1, 0

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [3 + ord(ch) % 997 for ch in text]}


def test_shards_are_fixed_by_a_hash_of_the_unit():
    for unit in ("json", "re", "ls", "tar"):
        bucket = int(hashlib.sha256(unit.encode()).hexdigest()[:8], 16) % 10
        assert c.shard_of(unit) == ("heal" if bucket < 4 else "train" if bucket < 7 else "heldout")
    counts = collections.Counter(c.shard_of(m) for m in c.DOC_MODULES)
    assert set(counts) == set(c.SHARDS) and all(v >= 10 for v in counts.values())


def test_docstring_documents_keep_a_module_in_one_shard_and_are_reproducible():
    docs = c.docstring_documents()
    assert len(docs) > 1000
    assert {d.unit for d in docs} <= set(c.DOC_MODULES)
    by_unit = collections.defaultdict(set)
    for d in docs:
        by_unit[d.unit].add(d.shard)
    assert all(len(s) == 1 for s in by_unit.values())  # a module never straddles two shards
    assert len({d.text for d in docs}) == len(docs)  # a shared docstring counts once
    json_doc = next(d for d in docs if d.id == "json.dumps")
    assert json_doc.kind == "function" and json_doc.signature.startswith("(obj, *, skipkeys=False")
    assert json_doc.text.startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    c.docstring_documents.cache_clear()
    again = c.docstring_documents()
    assert again == docs  # a fresh interpreter builds the same documents


def test_document_rows_are_bos_one_document_and_right_padding():
    docs = [
        c.Document("docstring", "m", "m.a", "x" * 10),  # shorter than min_tokens: no row
        c.Document("docstring", "m", "m.b", "abcdefghij" * 5),  # 50 tokens: windows 31, 19
        c.Document("docstring", "m", "m.c", "0123456789" * 7),  # 70 tokens: windows 31, 31, 8 (dropped)
    ]
    tok = _CharTokenizer()
    rows, info = c.document_rows(tok, docs, seq_len=32, min_tokens=12)
    assert rows.shape == (4, 32) and info["rows"] == 4 and info["pad_id"] == 0
    assert torch.equal(rows[:, 0], torch.ones(4, dtype=torch.long))
    real = rows != 0
    lengths = real.sum(1).tolist()
    assert lengths == [32, 20, 32, 32]
    assert all(bool(real[i, :n].all()) and not bool(real[i, n:].any()) for i, n in enumerate(lengths))
    ids_b = tok(docs[1].text, add_special_tokens=False)["input_ids"]
    assert rows[0, 1:].tolist() + rows[1, 1:20].tolist() == ids_b  # the windows give the document back
    ids_c = tok(docs[2].text, add_special_tokens=False)["input_ids"]
    assert rows[2, 1:].tolist() + rows[3, 1:].tolist() == ids_c[:62]
    assert info["padding"] == pytest.approx(12 / 128)
    picked, _ = c.document_rows(tok, docs, seq_len=32, min_tokens=12, max_rows=2)
    assert torch.equal(picked, rows[[0, 3]])  # evenly over the list: first and last
    with pytest.raises(RwasymError, match="3 documents give 4 rows"):
        c.document_rows(tok, docs, seq_len=32, min_tokens=12, max_rows=5)
    tok.pad_token_id = 1
    with pytest.raises(RwasymError, match="distinct BOS and pad"):
        c.document_rows(tok, docs)


def test_preference_pairs_reject_with_another_item_of_the_same_kind(tmp_path):
    record = c.preference_jsonl("train", 3, tmp_path / "p.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    items = {it["id"]: it for it in c.preference_items("train")}
    assert record["pairs"] == len(lines) == len(items) > 100
    kind_of = {}
    for it in items.values():
        kind_of.setdefault(it["response"], set()).add(it["kind"])
    for line in lines:
        item = items[line["id"]]
        assert line["prompt"] == item["prompt"] and line["chosen"] == item["response"]
        assert line["rejected"] != line["chosen"] and item["kind"] in kind_of[line["rejected"]]
        assert line["prompt"].startswith(("def ", "class ")) and line["prompt"].endswith('):\n    """')
    held = {it["id"].rsplit(".", 1)[0] for it in c.preference_items("heldout")}
    assert not held & {i.rsplit(".", 1)[0] for i in items}  # train and held-out pairs: disjoint modules
    again = c.preference_jsonl("train", 3, tmp_path / "q.jsonl")
    assert again["sha256"] == record["sha256"]
    assert c.preference_jsonl("train", 4, tmp_path / "r.jsonl")["sha256"] != record["sha256"]


@pytest.mark.skipif(shutil.which("man") is None or not Path("/usr/share/man/man1/ls.1.gz").exists(), reason="no man")
def test_man_documents_render_the_pages_of_a_folder_by_hash_order(tmp_path):
    names = ("ls", "cat", "grep", "sed", "tar")
    for name in names:
        shutil.copy(f"/usr/share/man/man1/{name}.1.gz", tmp_path / f"{name}.1.gz")
    (tmp_path / "broken.1").write_text("")  # renders to nothing: skipped, the next name takes its place
    docs = c.man_documents(4, str(tmp_path))
    order = sorted([*names, "broken"], key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    assert [d.id for d in docs] == [n for n in order if n != "broken"][:4]
    ls = next(d for d in c.man_documents(5, str(tmp_path)) if d.id == "ls")
    assert "list directory contents" in ls.text and "\x08" not in ls.text
    assert max(len(line) for d in docs for line in d.text.splitlines()) <= 80
    with pytest.raises(RwasymError, match="only 5 man pages render"):
        c.man_documents(6, str(tmp_path))
