"""What a model takes and returns: tensor names, dtypes and shapes, -1 where a dimension is free.

Found by dry runs, on the meta device when the forward allows it (no memory, no compute) and
on the CPU otherwise (a forward with data-dependent control flow, as FixedHiddenMLP's loop):
a dimension is free when it changes between two input shapes.

>>> Signature(inputs=(TensorSignature("input", torch.float32, (-1, 20)),),
...           outputs=(TensorSignature("output", torch.float32, (-1, 10)),), batchable=True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FailedPrecondition
from .values import INPUT_NAME, OUTPUT_NAME  # noqa: F401  (defined there: no torch)


@dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    batchable: bool


def output_signature(
    build: Callable[[str | None], nn.Module],
    example_shape: Sequence[int],
    dtype: torch.dtype,
    model: str,
) -> TensorSignature:
    """The output's dtype and shape, from forwards at batch sizes b and b+1 of the example."""
    shapes = [tuple(example_shape)]
    if shapes[0]:
        shapes.append((shapes[0][0] + 1, *shapes[0][1:]))
    for device in ("meta", None):
        try:
            outputs = [_forward(build(device), shape, dtype, device) for shape in shapes]
            break
        except (RuntimeError, NotImplementedError, ValueError, IndexError, TypeError) as err:
            if device is None:
                raise FailedPrecondition(
                    f"model {model!r} cannot run its example input of shape {list(shapes[0])}:"
                    f" {(str(err).splitlines() or [''])[0][:200]}; check its architecture and "
                    "config"
                ) from err
    for out in outputs:
        if not isinstance(out, torch.Tensor):
            raise FailedPrecondition(
                f"model {model!r} returns {type(out).__name__}; paramserve serves modules whose "
                "forward returns one tensor"
            )
    first = outputs[0].shape
    free = [a if all(o.shape[i] == a for o in outputs) else -1 for i, a in enumerate(first)]
    if any(o.dim() != len(first) for o in outputs):
        free = [-1] * len(first)
    return TensorSignature(OUTPUT_NAME, outputs[0].dtype, tuple(free))


def _forward(module: nn.Module, shape, dtype, device) -> torch.Tensor:
    with torch.no_grad():
        return module(torch.zeros(shape, dtype=dtype, device=device))
