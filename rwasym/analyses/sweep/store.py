"""The sweep file: a JSON-lines header and one row per edit, flushed as measured; resuming, repairing a killed
file, and merging torchrun rank files."""

import glob
import json
import os
import warnings
from pathlib import Path

from ...errors import RwasymError
from .config import FORMAT, stable_hash


# --------------------------------------------------------------------------------- the file
def read_sweep(path: str | os.PathLike, *, repair: bool = False) -> tuple[dict | None, list[dict]]:
    """(header, rows) of a sweep file. A half-written last line is dropped with a warning (and
    cut from the file when ``repair``); a corrupt complete line raises RwasymError."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None, []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        warnings.warn(
            f"rwasym: dropping a half-written last line of {str(path)!r} ({len(raw) - end} bytes, "
            "from an interrupted run); it will be recomputed",
            stacklevel=2,
        )
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    records = []
    for number, line in enumerate(raw[:end].decode().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RwasymError(
                f"{str(path)!r} line {number} is corrupt ({err}); it is not a file this "
                "version of rwasym wrote, or it was edited: move it away and re-run"
            ) from None
    if not records:
        return None, []
    header = records[0]
    if not isinstance(header, dict) or header.get("rwasym_sweep") != FORMAT:
        raise RwasymError(
            f"{str(path)!r} is not an rwasym sweep file (its first line is not a header); choose another --out path"
        )
    return header, records[1:]


def _require_config(path: Path, header: dict | None, config: dict) -> None:
    """Raise unless the sweep file's header (None: no file yet) was written by ``config``."""
    if header is not None and header.get("config_hash") != stable_hash(config):
        old = header.get("config", {})
        diffs = [
            f"{k}: file has {old.get(k)!r}, this run has {config.get(k)!r}"
            for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)
        ]
        raise RwasymError(
            f"sweep file {str(path)!r} was written by a different configuration ("
            f"{'; '.join(diffs) or 'config hash differs'}); use another out path, or delete "
            "the file to start over"
        )


class Store:
    """The append-only JSON-lines file of one sweep configuration."""

    def __init__(self, path: str | os.PathLike, config: dict, reference: dict):
        self.path = Path(path)
        digest = stable_hash(config)
        header, rows = read_sweep(self.path, repair=True)
        _require_config(self.path, header, config)
        self.rows = {r["id"]: r for r in rows}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        if header is None:
            self._fh.truncate(0)
            self._write({"rwasym_sweep": FORMAT, "config_hash": digest, "config": config, "reference": reference})

    def _write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, row: dict) -> None:
        self._write(row)
        self.rows[row["id"]] = row

    def close(self) -> None:
        self._fh.close()


def rank_path(out: str | os.PathLike, rank: int) -> Path:
    """``<out>.rank<r>.jsonl``: the rows rank r measured (``sweep.jsonl`` → ``sweep.jsonl.rank1.jsonl``)."""
    return Path(f"{out}.rank{rank}.jsonl")


def shard_files(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    found = out.parent.glob(f"{glob.escape(out.name)}.rank*.jsonl")
    return sorted(
        (p for p in found if p.name[len(out.name) + 5 : -6].isdigit()),
        key=lambda p: int(p.name[len(out.name) + 5 : -6]),
    )


def finished_rows(out: str | os.PathLike, config: dict) -> dict[str, dict]:
    """id → row of every row already in ``<out>`` or a ``<out>.rank<r>.jsonl`` file (read only;
    a file of another configuration raises as `Store` does). A resume may use another world size."""
    rows: dict[str, dict] = {}
    for path in [Path(out)] + shard_files(out):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a half-written line is dropped; its owner warns and repairs it
            header, found = read_sweep(path)
        _require_config(path, header, config)
        rows.update({r["id"]: r for r in found})
    return rows


def merge_shards(out: str | os.PathLike, config: dict, reference: dict, ids: list[str]) -> None:
    """Write ``<out>`` as an uninterrupted single-process run would have (header, then the rows in
    plan order) from ``<out>`` and the rank files, atomically, then delete the rank files."""
    shards = shard_files(out)
    rows = finished_rows(out, config)
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RwasymError(
            f"cannot merge the sweep shards into {str(out)!r}: {len(missing)} of {len(ids)} rows "
            f"are in no rank file (e.g. id {missing[0]}); re-run the same command to finish them"
        )
    header = {"rwasym_sweep": FORMAT, "config_hash": stable_hash(config), "config": config, "reference": reference}
    tmp = Path(f"{out}.merging")
    with open(tmp, "w") as fh:
        for record in [header] + [rows[i] for i in ids]:
            fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    for path in shards:
        path.unlink()
