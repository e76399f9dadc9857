"""Generic offline corpora for the pretraining-contrast study (issue #30), deterministic and hashed.

Two registers that exist on every machine here, each a list of *documents*:

- ``docstring``: the docstrings of `DOC_MODULES` from the installed Python standard library (a module's own
  docstring and each public member's, in sorted order, a docstring shared by several members once), built in a
  fresh isolated interpreter (``python -I``) so the text does not depend on what the caller imported;
- ``man``: man pages of section 1 rendered as plain text (``MANWIDTH=80 LC_ALL=C.UTF-8 man -P cat``), the
  `MAN_PAGES` pages whose names hash lowest (a deterministic sample of what is installed).

Documents are split into disjoint shards by a hash of their *unit* — the module for docstrings (every docstring
of a module lands in one shard), the page name for man pages: `shard_of` maps SHA-256(unit) mod 10 to
``heal`` (0–3), ``train`` (4–6) and ``heldout`` (7–9). The study reads them as the model reads text
(`document_rows`): each row starts with BOS and holds one document (a long one is cut into consecutive
windows, each its own row), right-padded with the pad id, which training masks and the probe excludes.

Preference pairs (`preference_items`, `preference_jsonl`): the prompt is a public function's signature written
as code (``def name(args):\\n    \\"\\"\\"``), the chosen response its own docstring's first sentence, the rejected
one another item's first sentence from the same shard (a seeded derangement). Train and held-out pairs come
from disjoint modules.

Every builder returns its SHA-256 with the text: docstrings change between Python releases and man pages
between machines, so the hash, not the recipe, is what a result records.
"""

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RwasymError

__all__ = [
    "DOC_MODULES",
    "MAN_PAGES",
    "SHARDS",
    "Document",
    "docstring_documents",
    "document_rows",
    "documents",
    "man_documents",
    "preference_items",
    "preference_jsonl",
    "shard_of",
]

# Standard-library modules with substantial prose docstrings (pure Python, present on every CPython 3.11 build).
DOC_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "code",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.utils", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "ipaddress", "json",
    "locale", "logging", "lzma", "mailbox", "mimetypes", "netrc", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "sysconfig", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "xml.dom.minidom", "zipfile", "zoneinfo",
)  # fmt: skip
MAN_PAGES = 600  # man(1) pages sampled (lowest SHA-256 of the page name)
SHARDS = ("heal", "train", "heldout")


@dataclass(frozen=True)
class Document:
    """One document: its register (docstring | man), the unit its shard is drawn by (module or page), an id
    (``module.member`` or the page name), its text and, for a function or class, its signature."""

    register: str
    unit: str
    id: str
    text: str
    signature: str | None = None
    kind: str | None = None  # function | class | module | page

    @property
    def shard(self) -> str:
        return shard_of(self.unit)


def shard_of(unit: str) -> str:
    """heal | train | heldout from SHA-256(unit) mod 10 (0–3, 4–6, 7–9): stable across machines and runs."""
    bucket = int(hashlib.sha256(unit.encode()).hexdigest()[:8], 16) % 10
    return "heal" if bucket < 4 else "train" if bucket < 7 else "heldout"


_BUILD = """
import importlib, inspect, json, re, sys
out, seen = [], set()
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    items = [(name, "module", inspect.getdoc(module), None)]
    for member in sorted(n for n in dir(module) if not n.startswith("_")):
        obj = getattr(module, member, None)
        if getattr(obj, "__module__", None) != name:
            continue  # re-exported from elsewhere: counted in its own module, or not at all
        kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else None
        if kind is None:
            continue
        try:
            sig = re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))  # default reprs carry addresses
        except (TypeError, ValueError):
            sig = None
        items.append((name + "." + member, kind, inspect.getdoc(obj), sig))
    for ident, kind, doc, sig in items:
        if doc and doc not in seen:
            seen.add(doc)
            out.append(dict(unit=name, id=ident, kind=kind, text=doc, signature=sig))
sys.stdout.write(json.dumps(out))
"""


@functools.lru_cache(maxsize=1)
def docstring_documents() -> tuple[Document, ...]:
    """The docstring register: one document per module docstring and per public function / class docstring of
    `DOC_MODULES`, built in a fresh ``python -I`` (independent of the caller's imports)."""
    done = subprocess.run([sys.executable, "-I", "-c", _BUILD, *DOC_MODULES], capture_output=True, check=False)
    if done.returncode != 0:
        raise RwasymError(f"building the docstring corpus failed: {done.stderr.decode(errors='replace')[-500:]}")
    return tuple(Document(register="docstring", **d) for d in json.loads(done.stdout))


def _man_files(section_dir: Path) -> dict[str, Path]:
    """{page name: file}; of two files with one name (ls.1 and ls.1.gz) the first in sorted order."""
    files: dict[str, Path] = {}
    for f in sorted(section_dir.iterdir()):
        name = f.name.removesuffix(".gz")
        if "." in name and f.is_file():
            files.setdefault(name.rsplit(".", 1)[0], f)
    return files


@functools.lru_cache(maxsize=4)
def man_documents(n: int = MAN_PAGES, section_dir: str = "/usr/share/man/man1") -> tuple[Document, ...]:
    """The man register: the ``n`` section-1 pages (of ``section_dir``) whose names hash lowest, rendered at 80
    columns in the C.UTF-8 locale; pages that fail to render or render under 200 characters are skipped (the
    next name by hash takes their place). Refused when fewer than ``n`` pages exist."""
    root = Path(section_dir)
    if not root.is_dir():
        raise RwasymError(f"no man pages at {section_dir}: install man-db and manpages, or pass another section_dir")
    files = _man_files(root)
    names = sorted(files, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": "", "MANPAGER": "cat"}
    out: list[Document] = []
    for name in names:
        if len(out) == n:
            break
        done = subprocess.run(["man", "-P", "cat", "-l", str(files[name])], capture_output=True, env=env, check=False)
        text = re.sub(r".\x08", "", done.stdout.decode("utf-8", errors="replace"))  # overstrike, if any
        text = "\n".join(line.rstrip() for line in text.splitlines()).strip()
        if done.returncode == 0 and len(text) >= 200:
            out.append(Document(register="man", unit=name, id=name, text=text, kind="page"))
    if len(out) < n:
        raise RwasymError(f"only {len(out)} man pages render under {section_dir}; {n} were asked for")
    return tuple(out)


def documents(register: str, shard: str | None = None, *, man_pages: int = MAN_PAGES) -> list[Document]:
    """The documents of one register (docstring | man), optionally of one shard, in a fixed order."""
    if register not in ("docstring", "man"):
        raise RwasymError(f"register must be 'docstring' or 'man'; got {register!r}")
    if shard is not None and shard not in SHARDS:
        raise RwasymError(f"shard must be one of {SHARDS}; got {shard!r}")
    docs = docstring_documents() if register == "docstring" else man_documents(man_pages)
    return [d for d in docs if shard is None or d.shard == shard]


def _sha(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.register, d.id, d.text], ensure_ascii=False).encode())
    return h.hexdigest()


def document_rows(
    tokenizer: Any,
    docs: Sequence[Document],
    seq_len: int = 64,
    *,
    min_tokens: int = 16,
    max_rows: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """(rows (N, seq_len) int64, info): each row BOS + up to seq_len − 1 tokens of one document (a document
    longer than that is cut into consecutive windows, each its own row; a window with fewer than
    ``min_tokens`` tokens is dropped), right-padded with the pad id. With ``max_rows``, that many rows taken
    evenly over the whole list (every part of the shard, not its first documents). info: the documents' and
    the rows' SHA-256, counts, pad id, padding share and the Python version."""
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if bos is None or pad is None or pad == bos:
        raise RwasymError(
            "document_rows needs a tokenizer with distinct BOS and pad tokens (bos_token_id, pad_token_id)"
        )
    if seq_len < min_tokens + 1 or min_tokens < 1:
        raise RwasymError(f"seq_len must exceed min_tokens >= 1; got seq_len={seq_len}, min_tokens={min_tokens}")
    rows: list[list[int]] = []
    width = seq_len - 1
    for d in docs:
        ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), width):
            window = ids[start : start + width]
            if len(window) >= min_tokens:
                rows.append([bos, *window] + [pad] * (width - len(window)))
    if not rows or (max_rows is not None and len(rows) < max_rows):
        raise RwasymError(f"{len(docs)} documents give {len(rows)} rows of {seq_len} tokens; {max_rows} were asked for")
    tokens = torch.tensor(rows, dtype=torch.long)
    if max_rows is not None:
        tokens = tokens[torch.linspace(0, len(rows) - 1, max_rows).round().long()]
    info = dict(
        documents=len(docs),
        documents_sha256=_sha(docs),
        rows=int(tokens.shape[0]),
        seq_len=seq_len,
        rows_sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        pad_id=int(pad),
        padding=float((tokens == pad).double().mean()),
        python=platform.python_version(),
    )
    return tokens, info


_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def _first_sentence(text: str) -> str | None:
    para = text.strip().split("\n\n", 1)[0].replace("\n", " ")
    m = _SENTENCE.match(para)
    sentence = (m.group(1) if m else para).strip()
    return sentence if 4 <= len(sentence.split()) <= 40 else None


MAX_PROMPT_CHARS = 120  # a longer signature leaves no room for the response in a 64-token row


def preference_items(shard: str) -> list[dict]:
    """Functions and classes of one docstring shard with a signature and a first sentence of 4–40 words:
    {id, kind, prompt, response} with prompt ``def name(signature):\\n    \\"\\"\\"`` (``class name(signature):``
    for a class, its constructor's signature) and response the sentence; prompts longer than `MAX_PROMPT_CHARS`
    characters are left out (the same items whatever the tokenizer)."""
    items = []
    for d in documents("docstring", shard):
        if d.kind not in ("function", "class") or d.signature is None:
            continue
        sentence = _first_sentence(d.text)
        if sentence is None:
            continue
        name = d.id.rsplit(".", 1)[1]
        keyword = "def" if d.kind == "function" else "class"
        prompt = f'{keyword} {name}{d.signature}:\n    """'
        if len(prompt) <= MAX_PROMPT_CHARS:
            items.append(dict(id=d.id, kind=d.kind, prompt=prompt, response=sentence))
    return items


def preference_jsonl(shard: str, seed: int, out: str | os.PathLike) -> dict:
    """Write ``{"id", "prompt", "chosen", "rejected"}`` lines for one shard: chosen = the item's own first
    sentence, rejected = the first sentence of the item of the same kind (function / class) that a seeded
    derangement assigns (never its own, never an identical sentence). Returns {path, pairs, sha256, seed, shard}."""
    items = preference_items(shard)
    g = torch.Generator().manual_seed(int(seed))
    rejected: dict[int, str] = {}
    for kind in ("function", "class"):
        group = [i for i, it in enumerate(items) if it["kind"] == kind]
        if len(group) < 2:
            raise RwasymError(f"shard {shard!r} has {len(group)} usable {kind}s; preference pairs need two or more")
        for _ in range(10_000):  # rejection sampling of a derangement (about e tries)
            perm = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
            if all(items[i]["response"] != items[j]["response"] for i, j in zip(group, perm)):
                break
        else:
            raise RwasymError(f"shard {shard!r}: no derangement of its {kind}s gives every item another sentence")
        rejected |= {i: items[j]["response"] for i, j in zip(group, perm)}
    lines = [
        json.dumps(dict(id=it["id"], prompt=it["prompt"], chosen=it["response"], rejected=rejected[i]))
        for i, it in enumerate(items)
    ]
    text = "\n".join(lines) + "\n"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return dict(
        path=str(path), pairs=len(items), sha256=hashlib.sha256(text.encode()).hexdigest(), seed=seed, shard=shard
    )
