"""Typed configs filled from the DPO codebase's `key=value` override syntax.

Each job declares its config as a dataclass (the one place its defaults live); `parse_overrides`
applies `key=value`, `group.key=value` and `list=[a,b]` overrides with OmegaConf, which type-checks
them and suggests close matches for unknown keys. A `config=FILE.yaml` override loads a file first,
so a user can keep a run's settings in one copyable file and still override single keys.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class InputError(ValueError):
    """Something the user gave is wrong; the message says what, and where."""


class ConfigError(InputError):
    """A bad override or config file; the message names the key and the value."""


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def parse_overrides(schema: type[T], argv: Sequence[str], groups: dict[str, str] | None = None) -> T:
    """`groups` maps a Hydra-style group choice to the key it sets: {"loss": "name"} reads `loss=ipo`
    as `loss.name=ipo`. Hydra's `+key=` and `++key=` prefixes are accepted and mean `key=`."""
    merged = OmegaConf.structured(schema)
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {arg!r}")
        if groups and key in groups:
            key = f"{key}.{groups[key]}"
        arg = f"{key}={value}"
        if key == "config":
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(value))
            except OmegaConfBaseException as e:
                raise ConfigError(f"config file {value}: {_first_line(e)}") from None
            except OSError as e:
                raise ConfigError(f"config file {value}: {e.strerror}") from None
        else:
            overrides.append(arg)
    for arg in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override {arg!r}: {_first_line(e)}") from None
    return OmegaConf.to_object(merged)


def run_job(main: Callable[[list[str]], object]) -> None:
    """Run a job's `main(argv)`; a user's mistake ends it with one clear line, not a traceback."""
    try:
        main(sys.argv[1:])
    except InputError as e:
        sys.exit(f"error: {e}")
