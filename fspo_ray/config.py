"""Typed configs filled from the DPO codebase's `key=value` override syntax.

Each job declares its config as a dataclass (the one place its defaults live); `parse_overrides`
applies `key=value`, `group.key=value` and `list=[a,b]` overrides with OmegaConf, which type-checks
them and suggests close matches for unknown keys. A `config=FILE.yaml` override loads a file first,
so a user can keep a run's settings in one copyable file and still override single keys.

A field's documentation is the comment on its line, written once; `--help` lists every key with its
default and that comment.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import sys
import tokenize
from collections.abc import Callable, Sequence
from typing import TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")


class InputError(ValueError):
    """Something the user gave is wrong; the message says what, and where."""


class ConfigError(InputError):
    """A bad override or config file; the message names the key and the value."""


def refuse_overwrite(path: str, overwrite: bool) -> None:
    """Jobs that write `out=` never replace earlier results unasked."""
    holds = os.path.isfile(path) and os.path.getsize(path) > 0 or os.path.isdir(path) and bool(os.listdir(path))
    if holds and not overwrite:
        raise ConfigError(f"out={path} already holds results: pass overwrite=true to replace them, "
                          "or choose another out")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def _field_comments(schema: type) -> dict[str, str]:
    """{field name: the comment on the line that declares it} from the dataclass's source."""
    comments, names = {}, {f.name for f in dataclasses.fields(schema)}
    source = inspect.getsource(schema)
    line_names = {}
    for number, line in enumerate(source.splitlines(), 1):
        name = line.strip().split(":", 1)[0]
        if name in names and name not in line_names.values():
            line_names[number] = name
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in line_names:
            comments[line_names[token.start[0]]] = token.string.lstrip("# ").strip()
    return comments


def config_help(schema: type, prefix: str = "") -> list[str]:
    """One line per key: `key=default  meaning`, nested configs as `group.key`."""
    lines, comments = [], _field_comments(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory):  # a nested config: its keys as group.key
            lines += config_help(f.default_factory, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = "(required)" if default is MISSING else ("null" if default is None else default)
        key = f"{prefix}{f.name}={shown}"
        lines.append(f"  {key:<38} {comments.get(f.name, '')}".rstrip())
    return lines


def parse_overrides(schema: type[T], argv: Sequence[str], groups: dict[str, str] | None = None) -> T:
    """`groups` maps a Hydra-style group choice to the key it sets: {"loss": "name"} reads `loss=ipo`
    as `loss.name=ipo`. Hydra's `+key=` and `++key=` prefixes are accepted and mean `key=`.
    `--help` (or `-h`) prints every key and exits."""
    if any(arg in ("-h", "--help") for arg in argv):
        groups_note = "".join(f"\n  {g}=X means {g}.{k}=X" for g, k in (groups or {}).items())
        print(f"usage: key=value ... (OmegaConf overrides; config=FILE.yaml loads a file first){groups_note}\n")
        print("\n".join(config_help(schema)))
        raise SystemExit(0)
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
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)} (see --help)")
    try:
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing required key: {_first_line(e)} (see --help)") from None


def run_job(main: Callable[[list[str]], object]) -> None:
    """Run a job's `main(argv)`; a user's mistake ends it with one clear line, not a traceback."""
    try:
        main(sys.argv[1:])
    except InputError as e:
        sys.exit(f"error: {e}")
