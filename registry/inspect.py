"""What a user asks about a module's parameters: specs, ties, lazy state and statistics."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from .statedict import ExpectedState
from .values import ParameterInfo, TensorStats


def parameter_infos(module: nn.Module, with_stats: bool = False) -> list[ParameterInfo]:
    """Every state_dict entry of ``module``, in state_dict order."""
    expected = ExpectedState.of(module)
    twins = expected.tied_groups()
    state = module.state_dict(keep_vars=True)
    infos = []
    for name, tensor in state.items():
        initialized = not isinstance(tensor, UninitializedParameter)
        is_parameter = isinstance(tensor, nn.Parameter)
        infos.append(
            ParameterInfo(
                name=name,
                spec=expected.specs[name],
                kind="parameter" if is_parameter else "buffer",
                requires_grad=bool(is_parameter and tensor.requires_grad),
                tied_with=twins[name],
                initialized=initialized,
                stats=tensor_stats(tensor) if with_stats and initialized else None,
            )
        )
    return infos


def tensor_stats(tensor: torch.Tensor) -> TensorStats | None:
    """min/max/mean/std in float64; None for an empty tensor."""
    if tensor.numel() == 0:
        return None
    values = tensor.detach().to(torch.float64)
    std = values.std().item() if values.numel() > 1 else 0.0
    return TensorStats(values.min().item(), values.max().item(), values.mean().item(), std)
