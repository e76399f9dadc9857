"""`rwasym audit`: per-tensor content hashes of checkpoints and what differs between them (no model is loaded)."""

import argparse
from typing import Any


def add_audit_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "audit",
        help="hash every tensor of checkpoints (folders, hub NAME@REVISION, GGUF) and flag identical checkpoints, "
        "unchanged matrices, missing or extra tensors, shape and dtype mismatches",
    )
    p.add_argument("sources", nargs="+", help="checkpoints in order: folders, hub names (NAME[@REVISION]), .gguf files")
    p.add_argument("--out", default=None, help="write the findings and every tensor's SHA-256 as JSON here")
    p.add_argument(
        "--figure", default=None, help="write the unchanged-tensor grid (consecutive pairs × layers) as a PNG here"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_audit)
    return p


def run_audit(args: argparse.Namespace) -> int:
    """Exit status 0 when no finding is an error, 1 when one is (identical checkpoints, shape mismatches)."""
    from ...models.audit import audit

    result = audit(args.sources, progress=False if args.quiet else None)
    print(result.summary())
    if args.out:
        result.to_json(args.out)
        print(f"wrote {args.out}")
    if args.figure and len(result.fingerprints) > 1:
        from ... import report

        report.audit_grid(result, args.figure)
        print(f"wrote {args.figure}")
    return 0 if result.ok else 1
