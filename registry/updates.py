"""Pushed updates: gradients (or deltas) applied to a version by an optimizer step → a new version.

A step runs ``torch.optim.SGD`` / ``torch.optim.Adam`` on a CPU copy of the parent version, so
its result is what the same step gives in-process. The optimizer's state (SGD's momentum
buffers, Adam's ``exp_avg``/``exp_avg_sq``/``step``) is versioned with the parameters: after a
step it is written as a safetensors blob in the blob store, whose sha256 is the new version's
``optimizer_sha256``; the next step from that version loads it and continues exactly. A step
from a version without state (or with another optimizer's) starts fresh. State is kept per
parameter name, so a step on some parameters carries the others' state forward unchanged.

Concurrency (parameter-server semantics, like ``git push``): an update names a ref. When the ref
moves (the latest, or an alias), the new version commits only if the ref still names the parent
the update was computed from, in the same transaction that makes the row (and moves the alias);
otherwise ``Aborted`` says which version to rebase onto. Gradients computed from a stale version
are thus never silently applied to a newer one. An explicit version number never moves: the
update commits as a branch from it.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgument, NotFound, ResourceExhausted
from .limits import brief
from .refs import parse_ref
from .values import VersionInfo

OPTIMIZERS = ("sgd", "adam")
STATE_FORMAT = "paramserve.optimizer/1"
MAX_PROVENANCE_PARAMS = 64  # names listed in a version's provenance; the count is always there


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed, validated optimizer step, e.g. ``sgd(lr=0.03, momentum=0.9)``."""

    kind: str
    hyper: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{self.kind}({args})"

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(params, **self.hyper)
        return torch.optim.Adam(params, **self.hyper)


_POSITIONAL = {"sgd": ("lr", "momentum", "weight_decay"), "adam": ("lr", "betas", "eps")}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "weight_decay": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
}


def parse_optimizer(text: str, max_chars: int = 256) -> OptimizerSpec:
    """``sgd(lr, momentum=0, weight_decay=0)`` or ``adam(lr, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0)``; ``lr`` is required. Literals only: nothing is evaluated."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(
            "an optimizer is needed, e.g. 'sgd(lr=0.03)', 'sgd(lr=0.1, momentum=0.9)' or "
            "'adam(lr=0.001)'"
        )
    if len(text) > max_chars:
        raise InvalidArgument(f"optimizer spec is {len(text)} characters; at most {max_chars}")
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            raise ValueError("not a call")
        kind = call.func.id.lower()
        if kind not in OPTIMIZERS:
            raise InvalidArgument(f"optimizer {kind[:20]!r} is not one of {OPTIMIZERS}")
        names = _POSITIONAL[kind]
        if len(call.args) > len(names):
            raise ValueError(f"{kind} takes at most {len(names)} positional arguments")
        given = {n: ast.literal_eval(a) for n, a in zip(names, call.args, strict=False)}
        for kw in call.keywords:
            if kw.arg is None or kw.arg in given:
                raise ValueError(f"argument {kw.arg!r} given twice (or **)")
            given[kw.arg] = ast.literal_eval(kw.value)
    except InvalidArgument:
        raise
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as err:
        raise InvalidArgument(
            f"optimizer {brief(text)}: {err}; write e.g. 'sgd(lr=0.03, momentum=0.9)' or "
            "'adam(lr=0.001, betas=(0.9, 0.999))'"
        ) from None
    unknown = set(given) - {"lr", *_DEFAULTS[kind]}
    if unknown:
        raise InvalidArgument(
            f"{kind} has no argument {sorted(unknown)[0][:40]!r}; it takes lr, "
            f"{', '.join(_DEFAULTS[kind])}"
        )
    if "lr" not in given:
        raise InvalidArgument(f"{kind} needs a learning rate: e.g. '{kind}(lr=0.01)'")
    hyper: dict[str, Any] = {"lr": _number(given["lr"], "lr", low=0.0, low_open=True)}
    for key, default in _DEFAULTS[kind].items():
        value = given.get(key, default)
        if key == "betas":
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise InvalidArgument(f"adam betas must be two numbers, not {brief(value)}")
            hyper[key] = tuple(_number(b, "betas", 0.0, high=1.0) for b in value)
        elif key == "momentum":
            hyper[key] = _number(value, key, 0.0, high=1.0)
        elif key == "eps":
            hyper[key] = _number(value, key, 0.0, low_open=True)
        else:
            hyper[key] = _number(value, key, 0.0)
    return OptimizerSpec(kind, hyper)


def _number(value: Any, what: str, low: float, low_open: bool = False, high=None) -> float:
    """A finite float in [low, high) (or (low, …) with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"optimizer {what} must be a number, not {brief(value)}")
    number = float(value)
    if not math.isfinite(number) or number < low or (low_open and number == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidArgument(f"optimizer {what} must be finite and {bound}, not {value!r}")
    if high is not None and number >= high:
        raise InvalidArgument(f"optimizer {what} must be in [{low}, {high}), not {value!r}")
    return number


# ---- optimizer state as a blob ------------------------------------------------------------


@dataclass
class OptimizerState:
    """Per parameter name, the optimizer's state tensors; ``step``: steps in this lineage."""

    kind: str
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]

    def to_bytes(self, hyper: Mapping[str, Any]) -> bytes:
        from safetensors.torch import save

        flat = {
            f"{name}/{key}": t.detach().contiguous().clone()
            for name, state in sorted(self.tensors.items())
            for key, t in sorted(state.items())
        }
        meta = {
            "format": STATE_FORMAT,
            "optimizer": self.kind,
            "step": str(self.step),
            "hyper": json.dumps(dict(hyper)),
        }
        return save(flat, metadata=meta)


def read_state(blobs, sha256: str) -> OptimizerState:
    """Load a version's optimizer state blob (its sha256 checked on the way)."""
    from safetensors.torch import load

    with blobs.open(sha256) as reader:
        data = reader.read()
        reader.finish()
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load(data).items():
        name, _, part = key.rpartition("/")
        tensors.setdefault(name, {})[part] = tensor
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    return OptimizerState(meta.get("optimizer", ""), int(meta.get("step", "0")), tensors)


# ---- the step ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """What an update did, before it is stored: the state to write and the provenance."""

    state: OptimizerState | None
    state_bytes: bytes | None
    provenance: dict[str, Any]


def named_targets(
    module: nn.Module, values: Mapping[str, torch.Tensor], model: str, what: str
) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """``(name, parameter, value)`` for each named value, checked against the module: a known
    parameter name, its shape, finite; cast to its dtype. A tied parameter named twice
    (under each of its names) is stepped once, under the first name given."""
    params = dict(module.named_parameters(remove_duplicate=False))
    if not values:
        raise InvalidArgument(f"an update of {model!r} needs {what} for at least one parameter")
    if len(values) > len(params):
        raise ResourceExhausted(
            f"{len(values)} {what} for {model!r}, which has {len(params)} parameters"
        )
    out, seen = [], set()
    for name, value in values.items():
        if name not in params:
            raise NotFound(
                f"model {model!r} has no parameter {brief(name)}; parameters: {list(params)[:20]}"
            )
        param = params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise InvalidArgument(
                f"{what} for {name!r} has shape {list(value.shape)}; the parameter's is "
                f"{list(param.shape)}"
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise InvalidArgument(f"{what} for {name!r} must be floating point, not {value.dtype}")
        value = value.to(param.dtype)
        if not bool(torch.isfinite(value).all()):
            raise InvalidArgument(f"{what} for {name!r} holds NaN or infinity; nothing applied")
        if id(param) in seen:
            continue
        seen.add(id(param))
        out.append((name, param, value))
    return out


def step_module(
    module: nn.Module,
    values: Mapping[str, torch.Tensor],
    spec: OptimizerSpec | None,
    previous: OptimizerState | None,
    model: str,
) -> StepResult:
    """Apply gradients with ``spec``'s optimizer (or, with ``spec=None``, add ``values`` as
    deltas) to ``module`` in place. ``previous``: the parent version's optimizer state."""
    what = "deltas" if spec is None else "gradients"
    targets = named_targets(module, values, model, what)
    names = [name for name, _, _ in targets]
    listed = {"params": names[:MAX_PROVENANCE_PARAMS], "params_count": len(names)}
    if spec is None:
        with torch.no_grad():
            for _name, param, delta in targets:
                param.add_(delta)
        return StepResult(None, None, {"kind": "update", "mode": "delta", **listed})
    continues = previous is not None and previous.kind == spec.kind
    carried = dict(previous.tensors) if continues and previous else {}
    params = [param for _, param, _ in targets]
    for param in module.parameters():
        param.requires_grad_(False)
        param.grad = None
    for _name, param, grad in targets:
        param.requires_grad_(True)
        param.grad = grad.clone()
    optimizer = spec.build(params)
    for name, param, _ in targets:
        if name in carried:
            optimizer.state[param] = {k: v.clone() for k, v in carried[name].items()}
    optimizer.step()
    for name, param, _ in targets:
        carried[name] = {k: v.detach().clone() for k, v in optimizer.state[param].items()}
        param.grad = None
    step = (previous.step if continues and previous else 0) + 1
    state = OptimizerState(spec.kind, step, carried)
    provenance: dict[str, Any] = {
        "kind": "update",
        "mode": "gradients",
        "optimizer": spec.kind,
        **spec.hyper,
        "step": step,
        "state": "continued" if continues else "fresh",
        **listed,
    }
    if "betas" in provenance:
        provenance["betas"] = list(provenance["betas"])
    return StepResult(state, state.to_bytes(spec.hyper), provenance)


def head_condition(name: str, ref: int | str | None, base: VersionInfo) -> tuple[str | None, bool]:
    """``(alias, check_latest)`` the commit must hold: the alias still naming ``base`` (then
    moved to the new version), or ``base`` still the latest; an explicit number: neither."""
    parsed = parse_ref(ref)
    if parsed is None:
        return None, True
    if isinstance(parsed, str):
        return parsed, False
    return None, False


def as_tensors(values: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {str(k): torch.as_tensor(v) for k, v in values.items()}


def update_version(
    store,
    name: str,
    values: Mapping[str, Any],
    optimizer: str | OptimizerSpec | None,
    ref: int | str | None = None,
    deltas: bool = False,
    note: str = "",
    author: str = "",
    module_and_base: tuple[nn.Module, VersionInfo] | None = None,
    parent: int | None = None,
) -> VersionInfo:
    """The whole update: load the parent, step, store the new version with its optimizer
    state; ``Aborted`` when ``ref`` moved meanwhile (see the module's docstring).

    ``parent``: the version the values were computed from (a worker that pulled v7 says 7);
    ``ref`` (the latest, or an alias) must still name it. Without it, the parent is what
    ``ref`` names now. ``module_and_base``: a parent already loaded (``Train``)."""
    spec = None
    if not deltas:
        spec = (
            optimizer
            if isinstance(optimizer, OptimizerSpec)
            else parse_optimizer(optimizer or "", store.limits.max_scheme_chars)
        )
    tensors = as_tensors(values)
    model = store.get_model(name)
    if module_and_base is None:
        base = store.resolve(name, ref if parent is None else parent)
        if parent is not None and isinstance(parse_ref(ref), int) and parse_ref(ref) != parent:
            raise InvalidArgument(
                f"update of {name!r}: ref {ref!r} and parent {parent} disagree; give one"
            )
        module = store.load_version(model, base)
    else:
        module, base = module_and_base
    previous = None
    if spec is not None and base.optimizer_sha256:
        previous = read_state(store.blobs, base.optimizer_sha256)
    result = step_module(module, tensors, spec, previous, name)
    alias, check_latest = head_condition(name, ref, base)
    state_sha = base.optimizer_sha256 if spec is None else None  # a delta keeps the state
    return store.save_update(
        name,
        module,
        base,
        result.provenance,
        state_bytes=result.state_bytes,
        keep_state_sha=state_sha,
        alias=alias,
        check_latest=check_latest,
        note=note,
        author=author,
    )


def check_names(values: Sequence[str], limit: int, what: str) -> None:
    if len(values) > limit:
        raise ResourceExhausted(f"{len(values)} {what}; at most {limit}")


@dataclass(frozen=True)
class TrainResult:
    version: VersionInfo
    loss: float


def train_version(
    store,
    name: str,
    inputs: Sequence[torch.Tensor],
    targets: torch.Tensor | None,
    loss: str,
    optimizer: str,
    ref: int | str | None = None,
    params: list[str] | None = None,
    note: str = "",
    author: str = "",
) -> TrainResult:
    """``Train``: the gradients of ``loss`` on one batch (``gradients``, on a copy) and the
    optimizer step, both from the one parent version ``ref`` resolves to now."""
    from .gradients import gradients

    spec = parse_optimizer(optimizer, store.limits.max_scheme_chars)
    if not loss:
        raise InvalidArgument("training needs a loss: mse, cross_entropy or sum")
    model = store.get_model(name)
    base = store.resolve(name, ref)
    module = store.load_version(model, base)
    result = gradients(
        module, tuple(inputs), loss=loss, targets=targets, grad_outputs=None, params=params
    )
    version = update_version(
        store,
        name,
        result.grads,
        spec,
        ref,
        note=note,
        author=author,
        module_and_base=(module, base),
    )
    return TrainResult(version, float(result.loss) if result.loss is not None else math.nan)
