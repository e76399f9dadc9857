"""`rwasym demo | info | audit | chain | probe | intervene | train | gradients | experiment | spectra | pair` —
the command line only calls the public API. One module per command, each an ``add_<cmd>_parser`` / ``run_<cmd>`` pair;
flags that configure an analysis come from its config dataclass (`common.add_config_flags`)."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .audit import add_audit_parser
from .chain import add_chain_parser
from .common import add_config_flags, config_from_args
from .demo import add_demo_parser
from .experiment import add_experiment_parser
from .gradients import add_gradients_parser
from .info import add_info_parser
from .intervene import add_intervene_parser
from .pair import add_pair_parser
from .probe import add_probe_parser
from .spectra import add_spectra_parser
from .train import add_train_parser

__all__ = ["add_config_flags", "add_intervene_parser", "build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwasym", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_info_parser(sub)
    add_audit_parser(sub)
    add_chain_parser(sub)
    add_probe_parser(sub)
    add_intervene_parser(sub)
    add_train_parser(sub)
    add_gradients_parser(sub)
    add_experiment_parser(sub)
    add_spectra_parser(sub)
    add_pair_parser(sub)
    add_demo_parser(sub)
    return parser


# Commands whose work splits across torchrun ranks (statistics sharded by batch, then all-reduced);
# under torchrun any other command would only repeat the same work in every process.
_DATA_PARALLEL = ("probe", "gradients", "intervene")


def _run_on_this_rank(args: argparse.Namespace) -> int:
    """Run the command; under torchrun, ranks > 0 compute their shard but write and print nothing."""
    import contextlib
    import os
    import tempfile

    from ... import distributed
    from ...errors import RwasymError

    rank, size = distributed.world()
    if size == 1 or getattr(args, "rank_aware", False):  # rank-aware commands write from rank 0 themselves
        return args.func(args)
    if args.command not in _DATA_PARALLEL:
        raise RwasymError(
            f"`rwasym {args.command}` does not split its work across processes, so each of the "
            f"{size} torchrun ranks would repeat it; run it as one process (python -m rwasym "
            f"{args.command} ...). Commands that run data-parallel: {', '.join(_DATA_PARALLEL)}"
        )
    if rank == 0:
        return args.func(args)
    with (
        tempfile.TemporaryDirectory(prefix=f"rwasym-rank{rank}-") as scratch,
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
    ):
        args.out = str(Path(scratch) / Path(args.out).name)  # rank 0 writes the real file
        return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ... import distributed

        started = distributed.init_from_env()  # torchrun: join the process group (no-op otherwise)
        try:
            return _run_on_this_rank(args)
        finally:
            if started:
                distributed.destroy()
    except Exception as err:  # RwasymError: print the message, not a traceback
        from ...errors import RwasymError

        if isinstance(err, RwasymError):
            print(f"rwasym: error: {err}", file=sys.stderr)
            return 2
        raise
