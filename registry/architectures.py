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

Several inputs are declared by name, dtype, shape (-1: free) and batch dimension; the forward
takes them positionally in that order and may return a tensor, a tuple or a dict::

    @architecture("pair", inputs=[Input("a", torch.float32, (-1, 4)),
                                  Input("b", torch.float32, (-1, 4))],
                  outputs=["sum", "max"])
    def pair():
        return PairModule()  # forward(a, b) -> (a + b, torch.maximum(a, b))

Outputs are named by ``outputs``; undeclared, a dict's keys name them, a tuple's are
``OUTPUT0``, ``OUTPUT1``, … and a lone tensor is ``output``.

Users add architectures from a module (``load_module("mypkg.models")``), whose import runs its
decorators, or from installed packages that declare an entry point in the group
``paramserve.architectures``.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

from .errors import AlreadyExists, InvalidArgument, NotFound
from .limits import INT64_MAX, INT64_MIN, brief

ENTRY_POINT_GROUP = "paramserve.architectures"
LAZY_KEY = "in_features"  # None there selects the lazy variant

# Module construction and initialization draw from torch's global RNG; seeding it must not
# interleave between threads, or the same seed would not give the same parameters.
_RNG_LOCK = threading.RLock()


@dataclass(frozen=True)
class Input:
    """One declared input: ``shape`` holds -1 where a size is free; ``batch_dim`` is the
    dimension along which requests are merged (its size is always free); ``example`` is the
    concrete shape dry runs use (default: free sizes at 2)."""

    name: str
    dtype: torch.dtype = torch.float32
    shape: tuple[int, ...] = (-1,)
    batch_dim: int = 0
    example: tuple[int, ...] | None = None

    def example_shape(self) -> tuple[int, ...]:
        if self.example is not None:
            return tuple(self.example)
        return tuple(2 if d < 0 else d for d in self.shape)


def _checked_inputs(name: str, inputs) -> tuple[Input, ...]:
    """Declared inputs, refused at registration when they could not be served."""
    checked = tuple(inputs)
    names = [i.name for i in checked if isinstance(i, Input)]
    if len(names) != len(checked) or not checked:
        raise InvalidArgument(f"architecture {name!r}: inputs must be a non-empty list of Input")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgument(f"architecture {name!r}: input names must be distinct: {names}")
    for spec in checked:
        shape = tuple(spec.shape)
        if not isinstance(spec.dtype, torch.dtype) or not all(
            type(d) is int and d >= -1 and d != 0 for d in shape
        ):
            raise InvalidArgument(
                f"architecture {name!r}: input {spec.name!r} needs a torch dtype and a shape of "
                "positive sizes or -1 (free)"
            )
        if not 0 <= spec.batch_dim < max(1, len(shape)) or not shape:
            raise InvalidArgument(
                f"architecture {name!r}: input {spec.name!r} has batch_dim {spec.batch_dim} "
                f"outside its shape {list(shape)}"
            )
        example = spec.example_shape()
        if len(example) != len(shape) or any(d > 0 and e != d for d, e in zip(shape, example)):
            raise InvalidArgument(
                f"architecture {name!r}: input {spec.name!r} example {list(example)} does not "
                f"fit its shape {list(shape)}"
            )
    return checked


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
    # Inclusive ranges of integer config values: a value out of range is refused before any
    # build (``{"blocks": 8000}`` would tie a worker up building 32,000 modules).
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Declared inputs (several, named); empty: one input ``input`` of example_input_shape.
    inputs: tuple[Input, ...] = ()
    # Declared output names, in the order the forward returns them (a tuple) or by key (dict).
    outputs: tuple[str, ...] = ()
    _frozen_defaults: str = field(default="", repr=False, compare=False)

    def resolve_config(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``config``; unknown keys, non-JSON values and integers out of
        their declared ``bounds`` are refused."""
        if config is not None and not isinstance(config, Mapping):
            raise InvalidArgument(
                f"config for {self.name!r} must be a JSON object, not a {type(config).__name__}"
            )
        config = dict(config or {})
        unknown = sorted(str(k) for k in set(config) - set(self.defaults))
        if unknown:
            raise InvalidArgument(
                f"architecture {self.name!r} has no config key(s) {brief(unknown, 120)}; "
                f"valid keys and defaults: {json.dumps(dict(self.defaults))}"
            )
        resolved = {**self.defaults, **config}
        try:
            json.dumps(resolved, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as err:
            raise InvalidArgument(
                f"config for {self.name!r} must be JSON-able: {str(err)[:120]}"
            ) from None
        for key, value in resolved.items():
            self._check_value(key, value)
        return resolved

    def _check_value(self, key: str, value: Any) -> None:
        if key in self.bounds:
            low, high = self.bounds[key]
            if value is None and key == LAZY_KEY:
                return
            if type(value) is not int:
                raise InvalidArgument(
                    f"config {key!r} of {self.name!r} must be an integer in [{low}, {high}]"
                    f"{' or null (lazy)' if key == LAZY_KEY else ''}, not {brief(value, 40)}"
                )
            if not low <= value <= high:
                raise InvalidArgument(
                    f"config {key!r} of {self.name!r} is {brief(value, 30)},"
                    f" out of its range [{low}, {high}]"
                )
        elif key == LAZY_KEY and key in self.defaults:
            if value is not None and not (type(value) is int and 1 <= value <= INT64_MAX):
                raise InvalidArgument(
                    f"config {key!r} of {self.name!r} is the input width: a "
                    f"positive integer or null (lazy), not {brief(value, 40)}"
                )
        elif type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise InvalidArgument(f"config {key!r} of {self.name!r} must fit in 64 bits")

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
        shape = [
            d if d >= 0 else e for d, e in zip(self.input_shape(config), self.example_input_shape)
        ]
        return torch.zeros(shape, dtype=self.input_dtype)

    def build(
        self,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        """Build the module; with ``seed`` every random draw (init, constant buffers) repeats.

        ``device="meta"`` builds shapes only, allocating no memory: what the store uses to
        check uploads and before filling a module from a blob.
        """
        resolved = self.resolve_config(config)
        try:
            with (
                seeded(seed) if seed is not None else nullcontext(),
                torch.device(device) if device is not None else nullcontext(),
            ):
                module = self.builder(**resolved)
        except (TypeError, ValueError, RuntimeError, OverflowError, IndexError) as err:
            raise InvalidArgument(
                f"architecture {self.name!r} cannot be built from config "
                f"{brief(json.dumps(resolved), 200)}: {str(err).splitlines()[0][:200]}"
            ) from err
        if not isinstance(module, nn.Module):
            raise InvalidArgument(
                f"architecture {self.name!r} returned {type(module).__name__}, "
                "not an nn.Module; fix its builder"
            )
        return module.eval()


class seeded:
    """Context manager: torch's global RNG seeded with ``seed``, restored afterwards, one
    thread at a time."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        if not INT64_MIN <= self.seed < 1 << 64:  # what torch.manual_seed takes
            raise InvalidArgument(f"seed {brief(seed, 30)} is out of range: use a 64-bit integer")

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


def architecture(
    name: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    doc: str = "",
    example_input_shape: tuple[int, ...] | None = None,
    batchable: bool = True,
    input_dtype: torch.dtype = torch.float32,
    replace: bool = False,
    bounds: Mapping[str, tuple[int, int]] | None = None,
    inputs: Sequence[Input] | None = None,
    outputs: Sequence[str] | None = None,
):
    """Decorator registering ``builder(**config) -> nn.Module`` under ``name``.

    ``batchable=False`` when the forward mixes rows of a batch (a mean over the whole input,
    a sum to a scalar): a server must never merge requests for those.
    ``bounds={"blocks": (1, 64)}``: inclusive ranges of integer config values, checked before
    any build. Keys without a range only have to fit in 64 bits; the parameters a config
    makes are bounded separately (``Limits.max_init_elements``, counted on the meta device).
    ``inputs``/``outputs``: several named tensors (see the module docstring); then the first
    input gives ``example_input_shape`` and ``input_dtype``.
    """
    bounds = dict(bounds or {})
    declared = _checked_inputs(name, inputs) if inputs is not None else ()
    names_out = tuple(outputs or ())
    if len(set(names_out)) != len(names_out) or not all(
        isinstance(n, str) and n for n in names_out
    ):
        raise InvalidArgument(f"architecture {name!r}: output names must be distinct strings")
    if declared and LAZY_KEY in (defaults or {}):
        raise InvalidArgument(
            f"architecture {name!r}: declared inputs have their shapes; the lazy "
            f"{LAZY_KEY!r} config key is for the one-input form"
        )
    if declared:
        example_input_shape = declared[0].example_shape()
        input_dtype = declared[0].dtype
    if example_input_shape is None:
        raise InvalidArgument(f"architecture {name!r} needs example_input_shape or inputs")
    example = tuple(example_input_shape)
    unknown = sorted(set(bounds) - set(defaults or {}))
    if unknown:
        raise InvalidArgument(
            f"architecture {name!r} declares bounds for {unknown}, which are not config keys"
        )

    def register(builder: Callable[..., nn.Module]):
        if name in _ARCHITECTURES and not replace:
            raise AlreadyExists(
                f"architecture {name!r} is already registered; "
                "pick another name or pass replace=True"
            )
        _ARCHITECTURES[name] = Architecture(
            name=name,
            builder=builder,
            defaults=dict(defaults or {}),
            doc=doc or _first_line(builder.__doc__),
            example_input_shape=example,
            batchable=batchable,
            input_dtype=input_dtype,
            bounds=bounds,
            inputs=declared,
            outputs=names_out,
        )
        return builder

    return register


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def get(name: str) -> Architecture:
    _ensure_builtins()
    try:
        return _ARCHITECTURES[name]
    except (KeyError, TypeError):  # TypeError: not a name at all (unhashable)
        raise NotFound(
            f"architecture {brief(name)} is not registered; known: "
            f"{str(sorted(_ARCHITECTURES))[:600]} (add your own with "
            "--architectures your.module)"
        ) from None


def all_architectures() -> list[Architecture]:
    _ensure_builtins()
    return [_ARCHITECTURES[n] for n in sorted(_ARCHITECTURES)]


def load_module(dotted_path: str) -> None:
    """Import a user module whose ``@architecture`` decorators register more builders."""
    try:
        importlib.import_module(dotted_path)
    except ImportError as err:
        raise NotFound(
            f"cannot import architectures module {dotted_path!r}: {err}; "
            "check the dotted path and that it is on PYTHONPATH"
        ) from err


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every installed entry point of ``group``; returns their names."""
    loaded = []
    for entry in metadata.entry_points(group=group):
        entry.load()
        loaded.append(entry.name)
    return loaded


def _ensure_builtins() -> None:
    from . import builtin  # noqa: F401  (registers on import)
