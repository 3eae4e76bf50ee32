"""The shapes of a model: its module built fresh, lazy shapes fixed by dry runs, what an upload
must hold, and the signature a server reports.

Lazy architectures leave the input width open until a first input (or an upload) fixes it. The
dimensions that follow the width are found once per config, by building at two widths and
comparing; an upload's shapes at those dimensions then say which width it was made for.

Every shape question is answered on the meta device first (shapes, no memory), so a client
cannot make the server allocate by naming a shape: a real build happens only once the meta
build has counted its elements within ``Limits.max_init_elements``.
"""

from __future__ import annotations

import json
import math
import operator
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

# torch's parameter.pyi omits the mixin that the lazy parameters and buffers share
from torch.nn.parameter import UninitializedTensorMixin, is_lazy  # type: ignore[attr-defined]

from . import architectures
from .architectures import Architecture, seeded
from .errors import InvalidArgument, ResourceExhausted
from .limits import DEFAULT_LIMITS, Limits, brief, flag, over
from .schemes import apply_scheme, parse_scheme
from .signature import INPUT_NAME, Signature, TensorSignature, output_signatures
from .statedict import ExpectedState
from .values import ModelInfo, TensorSpec, VersionInfo

# What a forward that cannot run on the meta device raises: a kernel with no meta version, or
# data-dependent control flow (``Tensor.item()``). Other errors mean the input does not fit.
_DRY_RUN_ERRORS = (RuntimeError, ValueError, IndexError, NotImplementedError)


class ShapeOracle:
    """Shape questions about models; caches, per architecture and config, the free dims."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._free_dims: dict[str, list[tuple[str, int]]] = {}

    def check_build(self, arch: Architecture, config: Mapping) -> nn.Module:
        """The module of ``config`` built on the meta device, refused when it has more than
        ``max_submodules`` submodules or its fixed shapes more than ``max_init_elements``
        elements: what ``create_model`` checks before a model is stored."""
        module = arch.build(config, device="meta")
        count = sum(1 for _ in module.modules())
        if count > self.limits.max_submodules:
            raise ResourceExhausted(
                over(
                    f"the submodule count of {arch.name!r} with this config",
                    count,
                    "max_submodules",
                    self.limits,
                )
            )
        self._check_elements(count_elements(module), f"architecture {arch.name!r} with this config")
        return module

    def fresh_module(self, model: ModelInfo, input_shape: Sequence[int] | None = None) -> nn.Module:
        """Built from the model's seed; lazy shapes fixed by a dry run on ``input_shape``; the
        init policy applied once every shape is known.

        The same build and dry run happen on the meta device first, and the real ones only when
        the state they make is within ``max_init_elements``.
        """
        arch = architectures.get(model.architecture)
        shape = None if input_shape is None else self.check_input_shape(model, input_shape)
        fixed, complete = self._meta_run(model, arch, shape)
        budget = self.limits.max_init_elements - fixed
        with seeded(model.seed):
            module = arch.build(model.config)
            if shape is not None:
                # A forward the meta device cannot run left lazy shapes unknown: each real
                # materialization is then counted before it allocates.
                with (
                    nullcontext()
                    if complete
                    else _materialize_budget(budget, model.name, self.limits)
                ):
                    dry_run(module, arch, model, shape)
        scheme = parse_scheme(model.init, self.limits)
        if scheme.name != "default" and (shape is not None or not model.lazy):
            apply_scheme(module, scheme, model.seed)
        return module

    def expected_state(self, model: ModelInfo, given: Mapping[str, tuple]) -> ExpectedState:
        """What an upload must hold; for a lazy model, at the input width the upload implies.
        Computed on the meta device: an upload header naming huge shapes allocates nothing."""
        arch = architectures.get(model.architecture)
        if not model.lazy:
            return ExpectedState.of(arch.build(model.config, device="meta"))
        example = _example_shape(arch, model.config)
        width = self.implied_width(model, arch, given) or example[-1]
        return self._state_at(model, arch, (*example[:-1], width))

    def implied_width(
        self, model: ModelInfo, arch: Architecture, given: Mapping[str, tuple]
    ) -> int | None:
        """The input width that a lazy model's upload implies, read off the dimensions that
        change with it (found once per config by two dry runs on the meta device)."""
        key = json.dumps([model.architecture, model.config], sort_keys=True)
        if key not in self._free_dims:
            example = _example_shape(arch, model.config)
            width = example[-1]
            at_width = self._state_at(model, arch, example).specs
            try:
                wider = self._state_at(model, arch, (*example[:-1], width + 1)).specs
            except InvalidArgument:
                wider = at_width  # the model accepts one width only: nothing is free
            self._free_dims[key] = [
                (name, dim)
                for name, spec in at_width.items()
                for dim, (a, b) in enumerate(zip(_fixed(spec), _fixed(wider[name])))
                if a != b
            ]
        widths = {
            given[name][1][dim]
            for name, dim in self._free_dims[key]
            if name in given and len(given[name][1]) > dim
        }
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

        if arch.inputs:  # declared: their shapes, the batch dim free
            inputs = tuple(
                TensorSignature(
                    i.name,
                    i.dtype,
                    tuple(-1 if d == i.batch_dim else s for d, s in enumerate(i.shape)),
                    i.batch_dim,
                )
                for i in arch.inputs
            )
            examples = [i.example_shape() for i in arch.inputs]
        else:
            inputs = (TensorSignature(INPUT_NAME, arch.input_dtype, tuple(input_shape)),)
            examples = [tuple(example)]
        outputs = output_signatures(build, inputs, examples, arch.outputs, model.name)
        return Signature(inputs=inputs, outputs=outputs, batchable=arch.batchable)

    def check_input_shape(self, model: ModelInfo, input_shape: Sequence[int]) -> tuple[int, ...]:
        """A dry run's input shape: at most ``max_input_rank`` positive dimensions whose
        product (the zeros the dry run allocates) is within ``max_init_elements``."""
        try:
            rank = len(input_shape)
        except TypeError:
            raise InvalidArgument(
                f"input shape for {model.name!r} must be a list of integers"
            ) from None
        if rank > self.limits.max_input_rank:
            raise InvalidArgument(
                f"input shape for {model.name!r} has {rank} dimensions, over "
                f"the limit of {self.limits.max_input_rank} "
                f"({flag('max_input_rank')})"
            )
        try:
            if any(isinstance(d, bool) for d in input_shape):
                raise TypeError
            shape = tuple(operator.index(d) for d in input_shape)
        except TypeError:
            raise InvalidArgument(
                f"input shape {brief(list(input_shape))} for {model.name!r} must be integers"
            ) from None
        if any(d <= 0 for d in shape):
            raise InvalidArgument(
                f"input shape {brief(list(shape))} for {model.name!r} must be positive"
            )
        limit = self.limits.max_init_elements
        elements = math.prod(min(d, limit + 1) for d in shape)  # stays small whatever the dims
        if elements > limit:
            raise ResourceExhausted(
                f"input shape {brief(list(shape))} for {model.name!r} has "
                f"over {limit} elements, the limit of a dry run's input "
                f"(raise it with {flag('max_init_elements')})"
            )
        return shape

    # ---- internals ----------------------------------------------------------------------

    def _meta_run(
        self, model: ModelInfo, arch: Architecture, shape: tuple[int, ...] | None
    ) -> tuple[int, bool]:
        """The module built and dry-run on the meta device, its elements within the limit.
        Returns the elements of its fixed shapes (before the run), and whether the run left
        no lazy shape unknown."""
        module = self.check_build(arch, model.config)
        fixed = count_elements(module)
        if shape is not None:
            _meta_dry_run(module, model, arch, shape)
        self._check_elements(
            count_elements(module),
            f"model {model.name!r} at input shape {brief(list(shape or ()))}",
        )
        return fixed, not any(is_lazy(t) for t in _tensors(module))

    def _state_at(
        self, model: ModelInfo, arch: Architecture, shape: Sequence[int]
    ) -> ExpectedState:
        """The state a lazy model has at input ``shape``, from the meta device; a real (and
        bounded) build only when the forward cannot run there before its lazy layers."""
        shape = tuple(int(d) for d in shape)
        module = arch.build(model.config, device="meta")
        _meta_dry_run(module, model, arch, shape)
        if any(is_lazy(t) for t in _tensors(module)):
            return ExpectedState.of(self.fresh_module(model, shape))
        return ExpectedState.of(module)

    def _check_elements(self, elements: int, what: str) -> None:
        if elements > self.limits.max_init_elements:
            raise ResourceExhausted(_too_many_elements(what, elements, self.limits))


def _fixed(spec: TensorSpec) -> tuple[int, ...]:
    """The shape of an entry of ``_state_at``'s state, which a dry run left with no lazy tensor."""
    assert spec.shape is not None
    return spec.shape


def _too_many_elements(what: str, elements: int, limits: Limits, prefix: str = "") -> str:
    return (
        f"{what} would materialize {prefix}{elements} parameter and buffer elements, over "
        f"the limit of {limits.max_init_elements} (raise it with "
        f"{flag('max_init_elements')})"
    )


def count_elements(module: nn.Module) -> int:
    """Elements of every parameter and buffer whose shape is known (shared ones once)."""
    return sum(t.numel() for t in _tensors(module) if not is_lazy(t))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _example_shape(arch: Architecture, config: Mapping) -> tuple[int, ...]:
    """The declared input shape, lazy dims at the example's size (nothing allocated)."""
    return tuple(
        d if d >= 0 else e for d, e in zip(arch.input_shape(config), arch.example_input_shape)
    )


def _meta_only(err: BaseException) -> bool:
    """An error of the meta device itself, not of the input's shape."""
    return isinstance(err, NotImplementedError) or "meta" in str(err).lower()


def _does_not_fit(
    model: ModelInfo, arch: Architecture, shape: Sequence[int], err: BaseException
) -> InvalidArgument:
    first = (str(err).splitlines() or [""])[0][:200]
    return InvalidArgument(
        f"input shape {brief(list(shape))} does not fit model {model.name!r}"
        f" (example input shape {list(arch.example_input_shape)}): {first}"
    )


def dry_run(
    module: nn.Module, arch: Architecture, model: ModelInfo, input_shape: Sequence[int]
) -> None:
    """One forward on zeros: lazy layers take their shapes from it (the guide's apply_init)."""
    shape = tuple(int(d) for d in input_shape)
    if any(d <= 0 for d in shape):
        raise InvalidArgument(
            f"input shape {brief(list(shape))} for {model.name!r} must be positive"
        )
    try:
        with torch.no_grad():
            module(torch.zeros(shape, dtype=arch.input_dtype))
    except _DRY_RUN_ERRORS as err:
        raise _does_not_fit(model, arch, shape, err) from err


_BUDGET = threading.local()


@contextmanager
def _materialize_budget(elements: int, name: str, limits: Limits):
    """While active (in this thread), every lazy materialization is counted against
    ``elements`` before it allocates; over it, ``ResourceExhausted``."""
    original = UninitializedTensorMixin.materialize

    def materialize(self, shape, device=None, dtype=None):
        left = getattr(_BUDGET, "left", None)
        if left is not None:
            wanted = math.prod(int(d) for d in shape)
            if wanted > left:
                raise ResourceExhausted(
                    _too_many_elements(
                        f"model {name!r}",
                        limits.max_init_elements - left + wanted,
                        limits,
                        "at least ",
                    )
                )
            _BUDGET.left = left - wanted
        return original(self, shape, device, dtype)

    _BUDGET.left = elements
    UninitializedTensorMixin.materialize = materialize
    try:
        yield
    finally:
        UninitializedTensorMixin.materialize = original
        _BUDGET.left = None


def _meta_dry_run(
    module: nn.Module, model: ModelInfo, arch: Architecture, shape: Sequence[int]
) -> None:
    """A forward on the meta device (no memory, no compute) to fix lazy shapes; a forward that
    cannot run there is left to a real, bounded build; one that does not fit is refused."""
    try:
        with torch.no_grad():
            module(torch.zeros(tuple(shape), dtype=arch.input_dtype, device="meta"))
    except _DRY_RUN_ERRORS as err:
        if not _meta_only(err):
            raise _does_not_fit(model, arch, shape, err) from err
