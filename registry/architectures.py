"""Architectures: code that builds an ``nn.Module`` from a small JSON-able config.

Register one with the decorator; the name is what models refer to::

    from paramserve.registry.architectures import architecture

    @architecture("wide_mlp", defaults={"in_features": 32, "hidden": 512},
                  doc="Two-layer MLP", example_input_shape=(2, 32))
    def wide_mlp(in_features, hidden):
        first = nn.LazyLinear(hidden) if in_features is None else nn.Linear(in_features, hidden)
        return nn.Sequential(first, nn.ReLU(), nn.Linear(hidden, 1))

Convention: a config key ``in_features`` sets the last input dimension, and ``None`` there
selects the lazy variant (shapes inferred from the first input).

Users add architectures from a module (``load_module("mypkg.models")``), whose import runs its
decorators, or from installed packages that declare an entry point in the group
``paramserve.architectures``.
"""

from __future__ import annotations

import importlib
import json
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .errors import AlreadyExists, InvalidArgument, NotFound

ENTRY_POINT_GROUP = "paramserve.architectures"

# Module construction and initialization draw from torch's global RNG; seeding it must not
# interleave between threads, or the same seed would not give the same parameters.
_RNG_LOCK = threading.RLock()


@dataclass(frozen=True)
class Architecture:
    """A registered builder and what a server needs to know about it."""

    name: str
    builder: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    doc: str
    example_input_shape: tuple[int, ...]
    batchable: bool = True
    input_dtype: torch.dtype = torch.float32
    _frozen_defaults: str = field(default="", repr=False, compare=False)

    def resolve_config(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``config``; unknown keys and non-JSON values are refused."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise InvalidArgument(
                f"architecture {self.name!r} has no config key(s) {unknown}; "
                f"valid keys and defaults: {json.dumps(dict(self.defaults))}")
        resolved = {**self.defaults, **config}
        try:
            json.dumps(resolved)
        except TypeError as err:
            raise InvalidArgument(f"config for {self.name!r} must be JSON-able: {err}") from err
        return resolved

    def is_lazy(self, config: Mapping[str, Any]) -> bool:
        return "in_features" in self.defaults and config.get("in_features") is None

    def input_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """Declared input shape for this config; -1 marks a dimension not known yet (lazy)."""
        shape = list(self.example_input_shape)
        if "in_features" in self.defaults and shape:
            shape[-1] = -1 if config.get("in_features") is None else int(config["in_features"])
        return tuple(shape)

    def example_input(self, config: Mapping[str, Any]) -> torch.Tensor:
        """A concrete input for dry runs: the declared shape, lazy dims at the example's size."""
        shape = [d if d >= 0 else e for d, e in zip(self.input_shape(config),
                                                    self.example_input_shape)]
        return torch.zeros(shape, dtype=self.input_dtype)

    def build(self, config: Mapping[str, Any] | None = None, seed: int | None = None,
              device: str | torch.device | None = None) -> nn.Module:
        """Build the module; with ``seed`` every random draw (init, constant buffers) repeats.

        ``device="meta"`` builds shapes only, allocating no memory: what the store uses to
        check uploads and before filling a module from a blob.
        """
        resolved = self.resolve_config(config)
        try:
            with seeded(seed) if seed is not None else nullcontext(), \
                    torch.device(device) if device is not None else nullcontext():
                module = self.builder(**resolved)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidArgument(
                f"architecture {self.name!r} cannot be built from config "
                f"{json.dumps(resolved)}: {err}") from err
        if not isinstance(module, nn.Module):
            raise InvalidArgument(f"architecture {self.name!r} returned {type(module).__name__}, "
                                  "not an nn.Module; fix its builder")
        return module.eval()


class seeded:
    """Context manager: torch's global RNG seeded with ``seed``, restored afterwards, one
    thread at a time."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self):
        _RNG_LOCK.acquire()
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        try:
            return self._fork.__exit__(*exc)
        finally:
            _RNG_LOCK.release()


_ARCHITECTURES: dict[str, Architecture] = {}


def architecture(name: str, *, defaults: Mapping[str, Any] | None = None, doc: str = "",
                 example_input_shape: tuple[int, ...], batchable: bool = True,
                 input_dtype: torch.dtype = torch.float32, replace: bool = False):
    """Decorator registering ``builder(**config) -> nn.Module`` under ``name``.

    ``batchable=False`` when the forward mixes rows of a batch (a mean over the whole input,
    a sum to a scalar): a server must never merge requests for those.
    """

    def register(builder: Callable[..., nn.Module]):
        if name in _ARCHITECTURES and not replace:
            raise AlreadyExists(f"architecture {name!r} is already registered; "
                                "pick another name or pass replace=True")
        _ARCHITECTURES[name] = Architecture(
            name=name, builder=builder, defaults=dict(defaults or {}),
            doc=doc or _first_line(builder.__doc__),
            example_input_shape=tuple(example_input_shape), batchable=batchable,
            input_dtype=input_dtype)
        return builder

    return register


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def get(name: str) -> Architecture:
    _ensure_builtins()
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise NotFound(f"architecture {name!r} is not registered; known: {sorted(_ARCHITECTURES)}"
                       " (add your own with --architectures your.module)") from None


def all_architectures() -> list[Architecture]:
    _ensure_builtins()
    return [_ARCHITECTURES[n] for n in sorted(_ARCHITECTURES)]


def load_module(dotted_path: str) -> None:
    """Import a user module whose ``@architecture`` decorators register more builders."""
    try:
        importlib.import_module(dotted_path)
    except ImportError as err:
        raise NotFound(f"cannot import architectures module {dotted_path!r}: {err}; "
                       "check the dotted path and that it is on PYTHONPATH") from err


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every installed entry point of ``group``; returns their names."""
    loaded = []
    for entry in metadata.entry_points(group=group):
        entry.load()
        loaded.append(entry.name)
    return loaded


def _ensure_builtins() -> None:
    from . import builtin  # noqa: F401  (registers on import)
