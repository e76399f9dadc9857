"""Checkpoint audit: per-tensor content hashes, read from the files without loading a model.

A *checkpoint* is a Hugging Face folder (``model.safetensors`` or a sharded index; other ``*.safetensors`` files
such as a PEFT adapter's otherwise), an rwasym native folder, a hub name (``NAME`` or ``NAME@REVISION``: its
snapshot in huggingface_hub's cache, `rwasym.models.loading.checkpoint_folder`) or a GGUF file.

`fingerprint` reads each file's header only (safetensors: the 8-byte length and the JSON header; GGUF: the
gguf package's reader) and hashes every tensor's stored bytes with SHA-256, one tensor at a time in 16 MiB reads
(nothing is materialised as a tensor, nothing is unpickled). Two tensors are *the same* when their dtype (for GGUF
the quantisation type), shape and bytes are equal, so an unchanged matrix is found exactly, whatever its dtype.

`audit` compares a list of checkpoints, each with the one before it, and every two for identity:

- ``identical`` (error): two checkpoints whose tensors are all the same (a base == instruct upload, a Pythia
  branch that serves final-era weights);
- ``unchanged`` (warning): tensors the same between consecutive checkpoints (frozen, or never trained);
- ``missing`` / ``extra`` (warning): tensor names only in the earlier / the later checkpoint;
- ``shape`` (error): one name, different shapes; ``dtype`` (warning): one name, different dtypes or
  quantisation types (a comparison across precisions is a comparison of roundings too);
- ``format`` (warning): a GGUF file against a safetensors checkpoint (their tensor names differ by design).

`unchanged_matrices` is the cheap pairwise check the probe runs before it captures anything: studied matrices
whose ΔW is exactly zero, by byte comparison that stops at the first differing block (a changed matrix costs one
64 KiB read per side), or in memory for loaded models.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from .._progress import quiet
from ..errors import RwasymError

__all__ = [
    "AuditResult",
    "Finding",
    "Fingerprint",
    "TensorRecord",
    "audit",
    "fingerprint",
    "unchanged_between",
    "unchanged_matrices",
    "warn_unchanged",
]

_READ = 16 << 20  # bytes per read while hashing
_FIRST = 64 << 10  # the first block compared: a changed tensor almost always differs here
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class _Where:
    """Where one tensor's bytes are: file, absolute offset and length."""

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRecord:
    """One stored tensor: dtype as the file names it (safetensors ``F32``, ``BF16``…; GGUF ``Q4_K``, ``F16``…),
    shape as stored (GGUF lists dimensions innermost first), bytes and the SHA-256 of those bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: str

    def same(self, other: "TensorRecord") -> bool:
        return (self.dtype, self.shape, self.sha256) == (other.dtype, other.shape, other.sha256)


@dataclass(frozen=True)
class Fingerprint:
    """A checkpoint's tensors by name (`TensorRecord`), its resolved files and format."""

    source: str
    format: str  # "safetensors" | "gguf"
    files: tuple[str, ...]
    tensors: dict[str, TensorRecord]

    @property
    def sha256(self) -> str:
        """One hash of the whole content: SHA-256 over the sorted lines ``name dtype shape sha256``."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name} {t.dtype} {list(t.shape)} {t.sha256}\n".encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class Finding:
    """One audit finding: ``kind`` (module docstring), ``severity`` (``error`` | ``warning``), the checkpoints it
    concerns (indices into the audited list), the tensors (empty when the whole checkpoint), and a message."""

    kind: str
    severity: str
    checkpoints: tuple[int, ...]
    tensors: tuple[str, ...]
    message: str


@dataclass
class AuditResult:
    """`audit`'s answer: the fingerprints (in the order given) and the findings."""

    fingerprints: list[Fingerprint]
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No finding of severity ``error``."""
        return not any(f.severity == "error" for f in self.findings)

    def to_dicts(self) -> list[dict]:
        """One dict per finding."""
        return [{**asdict(f), "checkpoints": list(f.checkpoints), "tensors": list(f.tensors)} for f in self.findings]

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The findings and every checkpoint's per-tensor hashes as JSON (written to ``path`` if given)."""
        doc = {
            "checkpoints": [
                {
                    "source": fp.source,
                    "format": fp.format,
                    "files": list(fp.files),
                    "sha256": fp.sha256,
                    "nbytes": fp.nbytes,
                    "tensors": {n: {**asdict(t), "shape": list(t.shape)} for n, t in sorted(fp.tensors.items())},
                }
                for fp in self.fingerprints
            ],
            "findings": self.to_dicts(),
            "ok": self.ok,
        }
        text = json.dumps(doc, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_dataframe(self):
        """The findings as a pandas DataFrame (one row per finding)."""
        import pandas as pd

        return pd.DataFrame(self.to_dicts(), columns=["kind", "severity", "checkpoints", "tensors", "message"])

    def summary(self) -> str:
        lines = [
            f"[{i}] {fp.source}: {len(fp.tensors)} tensors, {fp.nbytes / 2**20:.1f} MiB, sha256 {fp.sha256[:16]}"
            for i, fp in enumerate(self.fingerprints)
        ]
        if not self.findings:
            lines.append("no findings: every checkpoint differs from the one before it, with matching tensors")
        lines += [f"{f.severity}: {f.kind}: {f.message}" for f in self.findings]
        return "\n".join(lines)


# -- reading the files --------------------------------------------------------------------------
def _safetensors_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], _Where]]:
    """{name: (dtype, shape, where)} from a safetensors file's header (8-byte little-endian length, JSON)."""

    def corrupt(why: str) -> RwasymError:
        return RwasymError(f"{str(path)!r} is not a readable safetensors file ({why}); re-save or re-download it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise corrupt(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except OSError as err:
        raise RwasymError(f"cannot read {str(path)!r} ({err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise corrupt(f"its header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype, shape = str(meta["dtype"]), tuple(int(x) for x in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has no valid dtype, shape and data_offsets") from None
        if not 0 <= begin <= end or 8 + n + end > size:
            raise corrupt(f"tensor {name!r} lies beyond the end of the file (truncated)")
        out[name] = (dtype, shape, _Where(str(path), 8 + n + begin, end - begin))
    return out


def _gguf_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], _Where]]:
    try:
        import gguf
    except ImportError:
        raise RwasymError("auditing GGUF files needs the gguf package: pip install 'rwasym[real]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # truncated / corrupt files raise ValueError, IndexError, struct.error, ...
        raise RwasymError(f"{str(path)!r} is a corrupt or truncated GGUF file ({type(err).__name__}: {err})") from None
    return {
        t.name: (
            t.tensor_type.name,
            tuple(int(x) for x in t.shape),
            _Where(str(path), int(t.data_offset), int(t.n_bytes)),
        )
        for t in reader.tensors
    }


def _files(source: Any) -> tuple[str, list[Path]]:
    """(format, files) of a checkpoint source (module docstring)."""
    from . import gguf
    from .checkpoint import _weight_map
    from .loading import checkpoint_folder, split_revision

    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        if gguf.is_gguf(path):
            return "gguf", [path]
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        raise RwasymError(f"{str(path)!r} is neither a GGUF nor a safetensors file; pass a checkpoint folder or file")
    if not path.is_dir():
        folder = checkpoint_folder(source)
        if folder is None:
            raise RwasymError(
                f"{os.fspath(source)!r} is no local folder or file, and no hub name with a safetensors snapshot "
                "(downloaded, or in huggingface_hub's cache); pass a folder, a .gguf/.safetensors file or "
                f"NAME[@REVISION]{' (revision ' + repr(split_revision(source)[1]) + ')' if '@' in str(source) else ''}"
            )
        path = folder
    if (path / _INDEX_FILE).exists():  # a sharded checkpoint: its index, checked as streaming checks it
        return "safetensors", [path / s for s in sorted(set(_weight_map(path).values()))]
    if (path / _SINGLE_FILE).exists():
        return "safetensors", [path / _SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return "safetensors", files
    ggufs = sorted(p for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs
    raise RwasymError(
        f"folder {str(path)!r} holds no safetensors or GGUF weights; the audit reads safetensors (convert once with "
        "save_pretrained(folder, safe_serialization=True)) and GGUF files"
    )


def _index(source: Any) -> tuple[str, list[Path], dict[str, tuple[str, tuple[int, ...], _Where]]]:
    fmt, files = _files(source)
    entries: dict = {}
    for f in files:
        part = _safetensors_index(f) if fmt == "safetensors" else _gguf_index(f)
        twice = sorted(set(part) & set(entries))
        if twice:
            raise RwasymError(f"tensor {twice[0]!r} is stored in two files of {os.fspath(source)!r}; re-save it")
        entries.update(part)
    return fmt, files, entries


def _chunks(where: _Where, first: int = _READ):
    """The bytes of one tensor, in reads of ``first`` then `_READ` bytes."""
    with open(where.path, "rb") as fh:
        fh.seek(where.offset)
        left, size = where.nbytes, first
        while left > 0:
            block = fh.read(min(size, left))
            if not block:
                raise RwasymError(f"{where.path!r} ends inside a tensor (truncated); re-download it")
            left -= len(block)
            size = _READ
            yield block


def _sha256(where: _Where, cache: dict, bar: Any) -> str:
    key = (os.path.realpath(where.path), where.offset, where.nbytes)  # one file reached twice is hashed once
    if key not in cache:
        h = hashlib.sha256()
        for block in _chunks(where):
            h.update(block)
            bar.update(len(block))
        cache[key] = h.hexdigest()
    return cache[key]


def _same_bytes(a: _Where, b: _Where) -> bool:
    """Byte equality of two stored tensors; stops at the first differing block."""
    if a.nbytes != b.nbytes:
        return False
    if (os.path.realpath(a.path), a.offset) == (os.path.realpath(b.path), b.offset):
        return True
    return all(x == y for x, y in zip(_chunks(a, _FIRST), _chunks(b, _FIRST)))


# -- public -------------------------------------------------------------------------------------
def fingerprint(source: Any, *, progress: bool | None = None, _cache: dict | None = None) -> Fingerprint:
    """Every tensor of one checkpoint (module docstring) with its dtype, shape, bytes and SHA-256."""
    fmt, files, entries = _index(source)
    cache = {} if _cache is None else _cache
    total = sum(w.nbytes for _, _, w in entries.values())
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"audit {Path(os.fspath(source)).name}", disable=quiet(progress)
    ) as bar:
        tensors = {
            name: TensorRecord(name, dtype, shape, where.nbytes, _sha256(where, cache, bar))
            for name, (dtype, shape, where) in entries.items()
        }
    return Fingerprint(os.fspath(source), fmt, tuple(str(f) for f in files), tensors)


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def audit(sources: Sequence[Any], *, progress: bool | None = None) -> AuditResult:
    """Fingerprint each checkpoint and compare them (module docstring): each with the one before it (unchanged,
    missing, extra, shape, dtype, format) and every two for identity. Files reached twice (one hub blob under two
    revisions, one folder given twice) are read once."""
    if len(sources) < 1:
        raise RwasymError("audit needs at least one checkpoint (a folder, a hub NAME[@REVISION] or a GGUF file)")
    cache: dict = {}
    fps = [fingerprint(s, progress=progress, _cache=cache) for s in sources]
    findings: list[Finding] = []
    groups: dict[str, list[int]] = {}
    for i, fp in enumerate(fps):
        groups.setdefault(fp.sha256, []).append(i)
    identical = [g for g in groups.values() if len(g) > 1]
    for g in identical:
        findings.append(
            Finding(
                "identical",
                "error",
                tuple(g),
                (),
                f"checkpoints {', '.join(f'[{i}] {fps[i].source}' for i in g)} hold the same tensors (all "
                f"{len(fps[g[0]].tensors)} equal in dtype, shape and bytes): a comparison between them measures "
                "nothing; check the upload, revision or folder",
            )
        )
    twins = {i for g in identical for i in g}
    for i in range(1, len(fps)):
        a, b = fps[i - 1], fps[i]
        pair, tag = (i - 1, i), f"[{i - 1}] → [{i}]"
        if a.format != b.format:
            findings.append(
                Finding(
                    "format",
                    "warning",
                    pair,
                    (),
                    f"{tag}: {a.format} against {b.format}; tensor names differ between the formats, so they are not "
                    "compared: de-quantize the GGUF file (rwasym.load) or compare two files of one format",
                )
            )
            continue
        if i - 1 in twins and i in twins and a.sha256 == b.sha256:
            continue  # reported as identical
        only_a = sorted(set(a.tensors) - set(b.tensors))
        only_b = sorted(set(b.tensors) - set(a.tensors))
        common = [n for n in a.tensors if n in b.tensors]
        if only_a:
            findings.append(
                Finding(
                    "missing",
                    "warning",
                    pair,
                    tuple(only_a),
                    f"{tag}: {len(only_a)} tensors only in [{i - 1}]: {_listed(only_a)}",
                )
            )
        if only_b:
            findings.append(
                Finding(
                    "extra",
                    "warning",
                    pair,
                    tuple(only_b),
                    f"{tag}: {len(only_b)} tensors only in [{i}]: {_listed(only_b)}",
                )
            )
        shapes = [n for n in common if a.tensors[n].shape != b.tensors[n].shape]
        if shapes:
            n0 = shapes[0]
            findings.append(
                Finding(
                    "shape",
                    "error",
                    pair,
                    tuple(shapes),
                    f"{tag}: {len(shapes)} tensors change shape, e.g. {n0} {list(a.tensors[n0].shape)} → "
                    f"{list(b.tensors[n0].shape)}: these are not checkpoints of one architecture",
                )
            )
        dtypes = [n for n in common if a.tensors[n].dtype != b.tensors[n].dtype]
        if dtypes:
            n0 = dtypes[0]
            findings.append(
                Finding(
                    "dtype",
                    "warning",
                    pair,
                    tuple(dtypes),
                    f"{tag}: {len(dtypes)} tensors change dtype, e.g. {n0} {a.tensors[n0].dtype} → "
                    f"{b.tensors[n0].dtype}: ΔW then includes the rounding between the two precisions",
                )
            )
        same = [n for n in common if a.tensors[n].same(b.tensors[n])]
        if same:
            matrices = [n for n in same if len(a.tensors[n].shape) >= 2]
            findings.append(
                Finding(
                    "unchanged",
                    "warning",
                    pair,
                    tuple(same),
                    f"{tag}: {len(same)} of {len(common)} tensors unchanged ({len(matrices)} matrices), e.g. "
                    f"{_listed(matrices or same)}: their ΔW is exactly zero",
                )
            )
    return AuditResult(fps, findings)


def unchanged_matrices(base: Any, tuned: Any, names: Iterable[str], *, until_changed: bool = False) -> list[str] | None:
    """The matrices of ``names`` whose ΔW = W_tuned − W_base is exactly zero, or None when it cannot be told cheaply.

    base, tuned: two loaded `rwasym.Model` (compared in memory, host tensors, no float64 copy); two
    `rwasym.models.checkpoint.CheckpointWeights` (each matrix's host tensor compared byte for byte in its files,
    stopping at the first differing 64 KiB; equal bytes with equal dtype and shape are equal values; a fused
    host (qkv, gate-up) counts as unchanged only when the whole fused tensor is); or a loaded base and a
    `CheckpointWeights` tuned side (W_tuned read from its files, compared with W_base in float64, exact for
    fp32 / fp16 / bf16 files) only with ``until_changed``. Other combinations: None.
    until_changed: stop at the first changed matrix (the answer to "is every ΔW zero?" at the cost of one
    matrix when they are not).
    """
    from .checkpoint import CheckpointWeights
    from .host import host_linear
    from .registry import Model

    names = list(names)
    if isinstance(base, Model) and isinstance(tuned, CheckpointWeights) and until_changed:
        out = []
        for name in names:
            if name not in tuned or not torch.equal(base.weight(name), tuned[name]):
                break
            out.append(name)
        return out
    if isinstance(base, Model) and isinstance(tuned, Model):
        out = []
        for name in names:
            layout = base.host_layout(name)
            if layout.rows is not None or layout.expert is not None:  # a fused host: this matrix's part only (float64)
                same = bool(torch.equal(base.weight(name), tuned.weight(name)))
            else:
                a = cast(torch.Tensor, host_linear(base.bridge, base.matrix(name).component).weight).detach()
                b = cast(torch.Tensor, host_linear(tuned.bridge, tuned.matrix(name).component).weight).detach()
                same = a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
            if not same and until_changed:
                break
            if same:
                out.append(name)
        return out
    if isinstance(base, CheckpointWeights) and isinstance(tuned, CheckpointWeights):
        out, headers = [], {}
        for name in names:
            b_entry, t_entry = base._entries.get(name), tuned._entries.get(name)
            if b_entry is None or t_entry is None:
                continue
            where = []
            for folder, entry in ((base.folder, b_entry), (tuned.folder, t_entry)):
                path = folder / entry.file
                if path not in headers:
                    headers[path] = _safetensors_index(path)
                where.append(headers[path][entry.key])
            (da, sa, wa), (db, sb, wb) = where
            if (da, sa) == (db, sb) and _same_bytes(wa, wb):
                out.append(name)
            elif until_changed:
                break
        return out
    return None


def _readable(source: Any) -> dict | None:
    """A source's tensor index, or None when it is not a checkpoint on disk (a loaded model, a config)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return _index(source)[2]
    except RwasymError:
        return None


def unchanged_between(sources: Sequence[Any]) -> list[tuple[int, list[str], bool]]:
    """For each consecutive pair (i − 1, i) of checkpoints on disk: ``(i, unchanged, identical)`` — the tensors
    stored unchanged (same dtype, shape and bytes; a changed one costs one 64 KiB read per side) and whether the
    two checkpoints are identical (the same names, every tensor unchanged). Pairs with a source that is not a
    checkpoint on disk (a loaded model, a config) are left out. The cheap check a checkpoint series gets before
    anything is loaded (spectra lifecycle and geometry); `audit` is the full one."""
    indexes = [_readable(s) for s in sources]
    out = []
    for i in range(1, len(sources)):
        a, b = indexes[i - 1], indexes[i]
        if a is None or b is None:
            continue
        same = [n for n in a if n in b and a[n][:2] == b[n][:2] and _same_bytes(a[n][2], b[n][2])]
        out.append((i, same, len(same) == len(a) == len(b)))
    return out


def warn_unchanged(sources: Sequence[Any], labels: Sequence[Any] | None = None, *, what: str = "this analysis") -> list:
    """`unchanged_between` as warnings (an identical pair, or the unchanged matrices of a pair), returned too."""
    import warnings

    labels = list(range(len(sources))) if labels is None else list(labels)
    found = unchanged_between(sources)
    for i, same, identical in found:
        pair = f"checkpoints {labels[i - 1]!r} and {labels[i]!r}"
        if identical:
            warnings.warn(
                f"rwasym: {pair} are identical (every tensor equal): {what} shows no change between "
                "them; check the upload or revision (`rwasym audit` lists every finding)",
                stacklevel=3,
            )
        elif same:
            warnings.warn(
                f"rwasym: {len(same)} tensors are unchanged between {pair} ({_listed(same)}): their ΔW is exactly zero",
                stacklevel=3,
            )
    return found
