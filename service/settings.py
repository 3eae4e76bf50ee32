"""Settings, each defined once: a dataclass field whose ``option(...)`` metadata gives its help.

From the field come its flag (``max_batch_size`` → ``--max-batch-size``), its environment
variable (``PARAMSERVE_MAX_BATCH_SIZE``), its type, and the default ``--help`` shows. Flags win
over variables, variables over the field's default. A bad value is one line naming the flag or
the variable (``SettingError``; the CLI exits 2). The settings themselves are in ``config``.

Why dataclass metadata and not click or pydantic-settings: every ``paramserve`` command imports
this, the Docker health check included (``paramserve health`` must start in well under 0.3 s),
so it uses only the standard library (argparse, dataclasses, os) and adds no dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import field
from typing import Any

ENV_PREFIX = "PARAMSERVE_"
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # not given as a flag
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
_KINDS = {
    "str": str,
    "str | None": str,
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[str, ...]": tuple,
}


class SettingError(ValueError):
    """A flag or ``PARAMSERVE_*`` value that cannot be used; the message names which."""


def option(
    default: Any = None,
    help: str = "",
    *,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    sep: str = ",",
    shown: str | None = None,
    flag: str | None = None,
):
    """A settings field: ``minimum`` bounds a number; ``sep`` splits a repeatable flag's
    variable; ``shown`` replaces the default in ``--help``; ``flag`` overrides the name."""
    meta = {
        "help": help,
        "minimum": minimum,
        "choices": choices,
        "metavar": metavar,
        "sep": sep,
        "shown": shown,
        "flag": flag,
    }
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"setting": meta})
    return field(default=default, metadata={"setting": meta})


def settings_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "setting" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["setting"]["flag"] or "--" + f.name.replace("_", "-")


def env_of(f: dataclasses.Field) -> str:
    return ENV_PREFIX + f.name.upper()


def default_of(f: dataclasses.Field) -> Any:
    factory = f.default_factory
    return factory() if callable(factory) else f.default


def kind_of(f: dataclasses.Field) -> type:
    """The field's Python type (its annotation is text: ``from __future__ import annotations``)."""
    return _KINDS[str(f.type)]


def convert(f: dataclasses.Field, text: str) -> Any:
    """The value of one flag argument or variable; ``ValueError`` says what is expected."""
    meta, kind = f.metadata["setting"], kind_of(f)
    if kind is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(f"must be one of {', '.join(_TRUE + _FALSE[:-1])}, not {text!r}")
    if kind is tuple:
        return tuple(v for v in text.split(meta["sep"]) if v)
    if meta["choices"] and text not in meta["choices"]:
        raise ValueError(f"must be one of {', '.join(meta['choices'])}, not {text!r}")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(
                f"must be {'an integer' if kind is int else 'a number'}, not {text!r}"
            ) from None
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ValueError(f"must be at least {meta['minimum']}, not {text!r}")
        return value
    return text


def add_flags(parser: argparse.ArgumentParser, fields, guest: bool = False) -> None:
    """One flag per field. Unset flags read ``UNSET`` until ``resolve``; a ``guest`` copy (a
    global flag repeated after the subcommand) leaves the attribute alone unless given."""
    for f in fields:
        meta = f.metadata["setting"]
        kind = kind_of(f)
        default = argparse.SUPPRESS if guest else (None if kind is tuple else UNSET)
        shown = meta["shown"] if meta["shown"] is not None else default_of(f)
        parts = [] if shown in (None, False, (), "") else [f"default {shown}"]
        sep = f", separated by '{meta['sep']}'" if kind is tuple else ""
        parts.append(f"env {env_of(f)}{sep}")
        help_text = f"{meta['help']} ({'; '.join(parts)})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = str if kind is tuple else _flag_type(f)  # one item per flag
            kwargs["metavar"] = metavar_of(f)
            if kind is tuple:
                kwargs["action"] = "append"
        parser.add_argument(flag_of(f), **kwargs)


def metavar_of(f: dataclasses.Field) -> str:
    """What ``--help`` (and the README) shows after the flag: given, the choices, or a unit
    from the name (``_mb`` MB, ``_us`` US, ``_s`` S), else N for a count, FILE for text."""
    meta, kind = f.metadata["setting"], kind_of(f)
    if meta["metavar"] or meta["choices"]:
        return meta["metavar"] or "{" + ",".join(meta["choices"]) + "}"
    if kind in (int, float):
        units = {"_mb": "MB", "_us": "US", "_s": "S"}
        return next((unit for end, unit in units.items() if f.name.endswith(end)), "N")
    return "FILE"


def _flag_type(f: dataclasses.Field):
    def parse(text: str):
        try:
            return convert(f, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = f.name
    return parse


def resolve(namespace: argparse.Namespace, fields, environ=os.environ) -> None:
    """Fill each unset flag from its variable, else its default; raise ``SettingError``
    naming the variable for a bad one."""
    for f in fields:
        value = getattr(namespace, f.name, UNSET)
        if value is UNSET or (value is None and kind_of(f) is tuple):
            text = environ.get(env_of(f))
            if text is None:
                value = default_of(f)
            else:
                try:
                    value = convert(f, text)
                except ValueError as err:
                    raise SettingError(f"{env_of(f)}={text!r} ({flag_of(f)}): {err}") from None
        elif isinstance(value, list):
            value = tuple(value)
        setattr(namespace, f.name, value)


def from_namespace(cls, namespace: argparse.Namespace, **extra):
    return cls(**{f.name: getattr(namespace, f.name) for f in settings_of(cls)}, **extra)
