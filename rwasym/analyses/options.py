"""The config-dataclass pattern of every command (`SweepConfig`, `ProbeConfig`): one field gives the
default, the help, the command-line flag (`rwasym.app.cli.add_config_flags`) and its part of the
result's recorded configuration."""

from dataclasses import field, fields, replace
from typing import Any

from ..errors import RwasymError


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field whose comment is also its command-line help (``cli``: argparse extras such as
    ``type``, ``choices`` or ``list_of`` for comma-separated values)."""
    return field(default=default, metadata=dict(help=help, **cli))


def resolve_config(config_class: Any, config: Any, overrides: dict[str, Any], command: str) -> Any:
    """``config`` (default: ``config_class()``) with keyword ``overrides`` of its fields, as an entry point
    takes them (``probe(..., k=16)``); an unknown keyword names the fields there are."""
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise RwasymError(f"{command} got unknown options {unknown}; the configuration fields are {', '.join(names)}")
    return replace(config if config is not None else config_class(), **overrides)
