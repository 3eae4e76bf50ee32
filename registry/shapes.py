"""The shapes of a model: its module built fresh, lazy shapes fixed by dry runs, what an upload
must hold, and the signature a server reports.

Lazy architectures leave the input width open until a first input (or an upload) fixes it. The
dimensions that follow the width are found once per config, by building at two widths and
comparing; an upload's shapes at those dimensions then say which width it was made for.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import torch
from torch import nn

from . import architectures
from .architectures import Architecture, seeded
from .errors import InvalidArgument
from .schemes import apply_scheme, parse_scheme
from .signature import INPUT_NAME, Signature, TensorSignature, output_signature
from .statedict import ExpectedState
from .values import ModelInfo, VersionInfo


class ShapeOracle:
    """Shape questions about models; caches, per architecture and config, the free dims."""

    def __init__(self):
        self._free_dims: dict[str, list[tuple[str, int]]] = {}

    def fresh_module(self, model: ModelInfo,
                     input_shape: Sequence[int] | None = None) -> nn.Module:
        """Built from the model's seed; lazy shapes fixed by a dry run on ``input_shape``; the
        init policy applied once every shape is known."""
        arch = architectures.get(model.architecture)
        with seeded(model.seed):
            module = arch.build(model.config)
            if input_shape is not None:
                dry_run(module, arch, model, input_shape)
        scheme = parse_scheme(model.init)
        if scheme.name != "default" and (input_shape is not None or not model.lazy):
            apply_scheme(module, scheme, model.seed)
        return module

    def expected_state(self, model: ModelInfo, given: Mapping[str, tuple]) -> ExpectedState:
        """What an upload must hold; for a lazy model, at the input width the upload implies."""
        arch = architectures.get(model.architecture)
        if not model.lazy:
            return ExpectedState.of(arch.build(model.config, device="meta"))
        example = arch.example_input(model.config)
        width = self.implied_width(model, arch, given) or example.shape[-1]
        shape = (*example.shape[:-1], width)
        return ExpectedState.of(self.fresh_module(model, shape))

    def implied_width(self, model: ModelInfo, arch: Architecture,
                      given: Mapping[str, tuple]) -> int | None:
        """The input width that a lazy model's upload implies, read off the dimensions that
        change with it (found once per config by two dry runs)."""
        key = json.dumps([model.architecture, model.config], sort_keys=True)
        if key not in self._free_dims:
            example = arch.example_input(model.config)
            width = example.shape[-1]
            at_width = ExpectedState.of(self.fresh_module(model, example.shape)).specs
            try:
                wider = ExpectedState.of(self.fresh_module(
                    model, (*example.shape[:-1], width + 1))).specs
            except InvalidArgument:
                wider = at_width  # the model accepts one width only: nothing is free
            self._free_dims[key] = [
                (name, dim) for name, spec in at_width.items()
                for dim, (a, b) in enumerate(zip(spec.shape, wider[name].shape)) if a != b]
        widths = {given[name][1][dim] for name, dim in self._free_dims[key]
                  if name in given and len(given[name][1]) > dim}
        return widths.pop() if len(widths) == 1 else None

    def signature(self, model: ModelInfo, version: VersionInfo | None = None) -> Signature:
        """Input and output names, dtypes and shapes (-1: free) of a model at a version.

        A lazy model with no version has its input width free; with a version, the width is
        the one its stored parameters imply.
        """
        arch = architectures.get(model.architecture)
        input_shape = list(arch.input_shape(model.config))
        if model.lazy and version is not None:
            given = {e.name: (None, e.spec.shape) for e in version.manifest}
            input_shape[-1] = self.implied_width(model, arch, given) or input_shape[-1]
        # The leading dimension (rows) is free for every architecture; only batchable ones may
        # have requests merged along it.
        if input_shape:
            input_shape[0] = -1
        example = [d if d >= 0 else e for d, e in zip(input_shape, arch.example_input_shape)]

        def build(device):
            if device == "meta":
                return arch.build(model.config, device="meta")
            return self.fresh_module(model)

        output = output_signature(build, example, arch.input_dtype, model.name)
        return Signature(inputs=(TensorSignature(INPUT_NAME, arch.input_dtype,
                                                 tuple(input_shape)),),
                         outputs=(output,), batchable=arch.batchable)


def dry_run(module: nn.Module, arch: Architecture, model: ModelInfo,
             input_shape: Sequence[int]) -> None:
    """One forward on zeros: lazy layers take their shapes from it (the guide's apply_init)."""
    shape = tuple(int(d) for d in input_shape)
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"input shape {list(shape)} for {model.name!r} must be positive")
    try:
        with torch.no_grad():
            module(torch.zeros(shape, dtype=arch.input_dtype))
    except (RuntimeError, ValueError, IndexError) as err:
        raise InvalidArgument(f"input shape {list(shape)} does not fit model {model.name!r} "
                              f"(example input shape {list(arch.example_input_shape)}): "
                              f"{str(err).splitlines()[0]}") from err
