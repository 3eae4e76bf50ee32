"""Gradients of a loss with respect to a module's parameters, on a copy of the module.

The served module is never touched: it is deep-copied (ties kept: ``deepcopy`` shares one
memo, so a tied parameter stays one ``Parameter`` under each of its names), the copy runs the
forward with autograd in ``eval()`` mode, and the copy is dropped. ``eval()`` because that is
the mode the server serves in, so the gradient is the one of the function inference computes;
the built-ins have no dropout or batch norm, where the two modes agree anyway.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgument, NotFound

LOSSES = ("mse", "cross_entropy", "sum")


@dataclass
class GradientResult:
    """``loss``: None when grad_outputs seeded the backward. ``grads``: by state_dict key
    (a tied name maps to the same tensor as its twins); ``tied``: name → its other names."""

    loss: float | None
    grads: dict[str, torch.Tensor]
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)


def gradients(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    loss: str | None,
    targets: torch.Tensor | None = None,
    grad_outputs: tuple[torch.Tensor, ...] | None = None,
    params: list[str] | None = None,
    output_names: tuple[str, ...] = (),
) -> GradientResult:
    """The gradients of ``loss(module(*inputs), targets)`` (or of the outputs seeded with
    ``grad_outputs``) for ``params`` (state_dict keys or submodule paths; None: every
    parameter), computed on a deep copy of ``module``. A parameter the output does not
    depend on gets zeros (``p.grad`` would be None in-process). Raises ``InvalidArgument``
    for a bad loss, target or grad_outputs, ``NotFound`` for an unknown name."""
    if (loss is None) == (grad_outputs is None):
        raise InvalidArgument(
            f"gradients need a loss ({', '.join(LOSSES)}) or grad_outputs, exactly one of them"
        )
    if loss is not None and loss not in LOSSES:
        raise InvalidArgument(f"unknown loss {str(loss)[:40]!r}; use one of {', '.join(LOSSES)}")
    with torch.inference_mode(False), torch.enable_grad():
        work = _copy(module)
        named = _selected(work, params)
        device = _device_of(work)
        xs = tuple(x.to(device) for x in inputs)
        ys = _as_tuple(work(*xs), output_names)
        value = None
        if loss is not None:
            total = _loss(loss, ys, targets)
            value = float(total.detach())
            if total.requires_grad:  # else no parameter: nothing to differentiate
                total.backward()
        else:
            seeds = _check_grad_outputs(ys, grad_outputs)
            pairs = [(y, g.to(device)) for y, g in zip(ys, seeds) if y.requires_grad]
            if pairs:
                outputs, seeds_of = zip(*pairs)
                torch.autograd.backward(list(outputs), list(seeds_of))
        grads: dict[str, torch.Tensor] = {}
        of_param: dict[int, torch.Tensor] = {}  # a tied parameter: one tensor, every name
        for name, param in named:
            if id(param) not in of_param:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                of_param[id(param)] = grad.detach().cpu()
            grads[name] = of_param[id(param)]
        by_param: dict[int, list[str]] = {}  # every name, so a tie outside the selection shows
        for name, param in work.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(param), []).append(name)
    tied = {
        name: tuple(n for n in names if n != name)
        for names in by_param.values()
        if len(names) > 1
        for name in names
        if name in grads
    }
    return GradientResult(value, grads, tied)


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval() mode whose parameters are ordinary (not inference) tensors."""
    work = copy.deepcopy(module)
    fresh: dict[int, nn.Parameter] = {}  # one replacement per parameter: ties stay ties
    for _, submodule in work.named_modules(remove_duplicate=False):
        for key, param in list(submodule._parameters.items()):
            if param is not None and param.is_inference():
                if id(param) not in fresh:
                    fresh[id(param)] = nn.Parameter(param.clone(), param.requires_grad)
                submodule._parameters[key] = fresh[id(param)]
    work.eval()
    work.zero_grad(set_to_none=True)
    return work


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _selected(work: nn.Module, params: list[str] | None) -> list[tuple[str, nn.Parameter]]:
    """(state_dict key, parameter) for every name asked, in state_dict order; a submodule
    path ("2") selects every parameter under it, as ListParameters' path does."""
    every = list(work.named_parameters(remove_duplicate=False))
    if not params:
        return [(n, p) for n, p in every if p.requires_grad]
    keys = {n for n, _ in every}
    buffers = {n for n, _ in work.named_buffers(remove_duplicate=False)}
    modules = {n for n, _ in work.named_modules(remove_duplicate=False) if n}
    wanted: set[str] = set()
    for path in params:
        if path in keys:
            wanted.add(path)
        elif path in buffers:
            raise InvalidArgument(f"{path!r} is a buffer, not a parameter: it has no gradient")
        elif path in modules:
            wanted.update(n for n in keys if n.startswith(path + "."))
        else:
            nearby = difflib.get_close_matches(str(path)[:200], sorted(keys | modules), n=6)
            raise NotFound(
                f"the module has no parameter or submodule {str(path)[:80]!r}; nearby: "
                f"{nearby or sorted(keys)[:10]} (a state_dict key like '0.weight' or a "
                "submodule path like '0')"
            )
    chosen = [(n, p) for n, p in every if n in wanted]
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise InvalidArgument(f"parameters {frozen[:10]} have requires_grad=False: no gradient")
    return chosen


def _as_tuple(y, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    if isinstance(y, torch.Tensor):
        return (y,)
    if isinstance(y, dict):
        return tuple(y[n] for n in names) if names else tuple(y.values())
    return tuple(y)


def _loss(loss: str, ys: tuple[torch.Tensor, ...], target: torch.Tensor | None) -> torch.Tensor:
    if loss == "sum":  # the seeds' net(X).sum().backward(); several outputs: every one's sum
        if target is not None:
            raise InvalidArgument("loss 'sum' takes no target")
        total = ys[0].sum()
        for y in ys[1:]:
            total = total + y.sum()
        return total
    if target is None:
        raise InvalidArgument(f"loss {loss!r} needs a target")
    if len(ys) != 1:
        raise InvalidArgument(
            f"loss {loss!r} needs a model with one output (this one has {len(ys)}); "
            "send grad_outputs instead"
        )
    (y,) = ys
    target = target.to(y.device)
    if loss == "mse":
        if tuple(target.shape) != tuple(y.shape):
            raise InvalidArgument(
                f"mse: the target's shape {list(target.shape)} is not the output's {list(y.shape)}"
            )
        return F.mse_loss(y, target.to(y.dtype))
    return _cross_entropy(y, target)


def _cross_entropy(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class indices (integers, shape of y without its class dim 1) or probabilities
    (floats, y's shape), as ``F.cross_entropy`` takes them."""
    if y.dim() < 1:
        raise InvalidArgument("cross_entropy needs an output with a class dimension")
    if target.is_floating_point():
        if tuple(target.shape) != tuple(y.shape):
            raise InvalidArgument(
                f"cross_entropy: probabilities of shape {list(target.shape)} must have the "
                f"output's shape {list(y.shape)}"
            )
        return F.cross_entropy(y, target.to(y.dtype))
    expected = (y.shape[0], *y.shape[2:]) if y.dim() > 1 else ()
    if tuple(target.shape) != tuple(expected):
        raise InvalidArgument(
            f"cross_entropy: class indices of shape {list(target.shape)} must have shape "
            f"{list(expected)} (the output {list(y.shape)} without its class dim)"
        )
    classes = y.shape[1] if y.dim() > 1 else y.shape[0]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise InvalidArgument(f"cross_entropy: class indices must be in 0..{classes - 1}")
    return F.cross_entropy(y, target.long())


def _check_grad_outputs(ys, grad_outputs) -> tuple[torch.Tensor, ...]:
    if len(grad_outputs) != len(ys):
        raise InvalidArgument(
            f"grad_outputs holds {len(grad_outputs)} tensors; the model has {len(ys)} outputs"
        )
    for i, (y, g) in enumerate(zip(ys, grad_outputs)):
        if tuple(g.shape) != tuple(y.shape):
            raise InvalidArgument(
                f"grad_outputs[{i}] has shape {list(g.shape)}; output {i} has {list(y.shape)}"
            )
    return tuple(g.to(y.dtype) for y, g in zip(ys, grad_outputs))
