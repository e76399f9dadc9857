"""The config-dataclass pattern of every command (`SweepConfig`, `ProbeConfig`): one field gives the
default, the help, the command-line flag (`rwasym.app.cli.add_config_flags`) and its part of the
result's recorded configuration."""

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field whose comment is also its command-line help (``cli``: argparse extras such as
    ``type``, ``choices`` or ``list_of`` for comma-separated values)."""
    return field(default=default, metadata=dict(help=help, **cli))
