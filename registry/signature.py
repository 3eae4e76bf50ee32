"""What a model takes and returns: tensor names, dtypes and shapes, -1 where a dimension is free.

Found by dry runs, on the meta device when the forward allows it (no memory, no compute) and
on the CPU otherwise (a forward with data-dependent control flow, as FixedHiddenMLP's loop):
a dimension is free when it changes between two input shapes (the batch sizes b and b+1), and
an output's batch dimension is the one that followed the inputs' rows.

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

_DRY_RUN_ERRORS = (RuntimeError, NotImplementedError, ValueError, IndexError, TypeError, KeyError)


@dataclass(frozen=True)
class TensorSignature:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # -1: any size
    batch_dim: int = 0  # where rows are: requests are merged and split along it


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    batchable: bool

    def output_index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.outputs)}


def tuple_output_name(index: int) -> str:
    """The name of a tuple's ``index``-th output when the architecture declares none."""
    return f"OUTPUT{index}"


def named_outputs(result, declared: Sequence[str], model: str) -> list[tuple[str, torch.Tensor]]:
    """A forward's result as (name, tensor) pairs: a tensor, a tuple/list, or a dict."""
    if isinstance(result, torch.Tensor):
        pairs = [(declared[0] if declared else OUTPUT_NAME, result)]
    elif isinstance(result, (tuple, list)):
        pairs = [
            (declared[i] if declared else tuple_output_name(i), t) for i, t in enumerate(result)
        ]
    elif isinstance(result, dict):
        if declared and set(declared) != set(result):
            raise FailedPrecondition(
                f"model {model!r} returns outputs {list(result)[:20]}, its architecture "
                f"declares {list(declared)}; make them agree"
            )
        pairs = [(str(n), result[n]) for n in (declared or result)]
    else:
        raise FailedPrecondition(
            f"model {model!r} returns {type(result).__name__}; paramserve serves modules whose "
            "forward returns a tensor, a tuple of tensors or a dict of tensors"
        )
    if declared and len(pairs) != len(declared):
        raise FailedPrecondition(
            f"model {model!r} returns {len(pairs)} outputs, its architecture declares "
            f"{len(declared)}: {list(declared)}"
        )
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise FailedPrecondition(
                f"model {model!r} returns {type(tensor).__name__} as output {name!r}, not a tensor"
            )
    if not pairs:
        raise FailedPrecondition(f"model {model!r} returns no output")
    return pairs


def output_signatures(
    build: Callable[[str | None], nn.Module],
    inputs: Sequence[TensorSignature],
    examples: Sequence[Sequence[int]],
    declared: Sequence[str],
    model: str,
) -> tuple[TensorSignature, ...]:
    """Every output's name, dtype, shape and batch dim, from forwards at the examples' batch
    sizes b and b+1 (each input grown along its batch dim)."""
    runs = [[tuple(e) for e in examples]]
    if all(runs[0]):
        runs.append([_grown(e, spec.batch_dim) for e, spec in zip(runs[0], inputs)])
    for device in ("meta", None):
        try:
            results = [
                named_outputs(_forward(build(device), shapes, inputs, device), declared, model)
                for shapes in runs
            ]
            break
        except _DRY_RUN_ERRORS as err:
            if device is None:
                raise FailedPrecondition(
                    f"model {model!r} cannot run its example input of shape"
                    f" {[list(s) for s in runs[0]] if len(inputs) > 1 else list(runs[0][0])}:"
                    f" {(str(err).splitlines() or [''])[0][:200]}; check its architecture and "
                    "config"
                ) from err
    rows = runs[0][0][inputs[0].batch_dim] if runs[0][0] else 1
    signatures = []
    for i, (name, first) in enumerate(results[0]):
        others = [r[i][1] for r in results[1:]]
        shape = first.shape
        if any(o.dim() != first.dim() for o in others):
            free = [-1] * first.dim()
        else:
            free = [a if all(o.shape[d] == a for o in others) else -1 for d, a in enumerate(shape)]
        grew = [d for d, a in enumerate(free) if a == -1]
        batch_dim = next((d for d in grew if shape[d] == rows), grew[0] if grew else 0)
        signatures.append(TensorSignature(name, first.dtype, tuple(free), batch_dim))
    return tuple(signatures)


def output_signature(
    build: Callable[[str | None], nn.Module],
    example_shape: Sequence[int],
    dtype: torch.dtype,
    model: str,
) -> TensorSignature:
    """The one output of a one-input model (kept for callers of the single-tensor form)."""
    spec = TensorSignature(INPUT_NAME, dtype, tuple(example_shape))
    return output_signatures(build, [spec], [example_shape], (), model)[0]


def _grown(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return (*shape[:dim], shape[dim] + 1, *shape[dim + 1 :])


def _forward(module: nn.Module, shapes, inputs: Sequence[TensorSignature], device):
    with torch.no_grad():
        return module(
            *(torch.zeros(s, dtype=spec.dtype, device=device) for s, spec in zip(shapes, inputs))
        )
