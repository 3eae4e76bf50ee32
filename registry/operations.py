"""The operations that make a version from a module: lazy init, init schemes, patches.

Each builds or loads a module, changes it, and hands its state to the store as a new version
(``VersionMaker.save_module``), parent recorded. They reach the store only through the small
``VersionMaker`` interface, so they need no SQL and no blob paths.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .errors import FailedPrecondition, InvalidArgument, NotFound
from .limits import Limits
from .provenance import check_author, check_note, patch_value
from .schemes import apply_scheme, parse_scheme
from .shapes import ShapeOracle
from .slicing import parse_index
from .slicing import select as select_index
from .values import ModelInfo, VersionInfo

PATCH_OPS = ("set", "add", "mul")
FIRST_VERSION_LOCK_STRIPES = 64  # bounded, whatever the number of models


class VersionMaker(Protocol):
    shapes: ShapeOracle
    limits: Limits

    def get_model(self, name: str) -> ModelInfo: ...
    def resolve(self, name: str, ref: int | str | None = None) -> VersionInfo: ...
    def version_or_none(self, name: str, ref: int | str | None) -> VersionInfo | None: ...
    def latest_or_none(self, name: str) -> VersionInfo | None: ...
    def load_version(self, model: ModelInfo, version: VersionInfo) -> nn.Module: ...
    def save_module(
        self,
        name: str,
        module: nn.Module,
        origin: str,
        parent: VersionInfo | None,
        first_only: bool = False,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
    ) -> VersionInfo: ...


class Operations:
    def __init__(self, store: VersionMaker):
        self.store = store
        # One lock per stripe, not per model name: a first-version race is decided by the
        # database (``first_only``); the lock only spares this process duplicate work.
        self._first_version_locks = [threading.Lock() for _ in range(FIRST_VERSION_LOCK_STRIPES)]

    def first_version_lock(self, name: str) -> threading.Lock:
        return self._first_version_locks[
            zlib.crc32(name.encode("utf-8", "replace")) % FIRST_VERSION_LOCK_STRIPES
        ]

    def materialize(self, name: str, input_shape: Sequence[int], author: str = "") -> VersionInfo:
        """Lazy initialization: the first input's shape fixes the lazy shapes; the model's init
        policy and seed fill them; the result is stored as a version (origin ``lazy-init``).

        Returns the existing latest version when there is one, so concurrent first callers (in
        this process or in other replicas) all get the one version that was created first.
        """
        store = self.store
        with self.first_version_lock(name):
            existing = store.latest_or_none(name)
            if existing is not None:
                return existing
            model = store.get_model(name)
            if not model.lazy:
                raise FailedPrecondition(
                    f"model {name!r} has fixed shapes and no version; upload parameters "
                    f"(`paramserve upload {name} FILE`) or initialize it (`paramserve init "
                    f"{name} SCHEME`)"
                )
            module = store.shapes.fresh_module(model, input_shape)
            record = {"input_shape": [int(d) for d in input_shape], "scheme": model.init}
            return store.save_module(
                name,
                module,
                "lazy-init",
                None,
                first_only=True,
                provenance=record,
                author=check_author(author),
            )

    def initialize(
        self,
        name: str,
        scheme: str,
        ref: int | str | None = None,
        module_path: str | None = None,
        seed: int | None = None,
        input_shape: Sequence[int] | None = None,
        *,
        note: str = "",
        author: str = "",
    ) -> VersionInfo:
        """Apply an init scheme to the whole module or to ``module_path`` → a new version.

        Starts from version ``ref`` (default: the latest). A model with no version starts from
        its freshly built module; a lazy one then needs ``input_shape`` to fix its shapes.
        """
        store = self.store
        parsed = parse_scheme(scheme, store.limits)
        note, author = check_note(note), check_author(author)
        model = store.get_model(name)
        base = store.version_or_none(name, ref)
        if base is not None:
            module = store.load_version(model, base)
        elif model.lazy and input_shape is None:
            raise FailedPrecondition(
                f"lazy model {name!r} has no shapes yet; pass an input shape or send it a first "
                "inference request"
            )
        else:
            module = store.shapes.fresh_module(model, input_shape)
        target = _submodule(module, module_path, name)
        used_seed = model.seed if seed is None else seed
        apply_scheme(target, parsed, used_seed)
        record: dict[str, Any] = {
            "scheme": str(parsed),
            "module": module_path or "",
            "seed": int(used_seed),
        }
        if input_shape is not None:
            record["input_shape"] = [int(d) for d in input_shape]
        return store.save_module(
            name, module, "init", base, provenance=record, note=note, author=author
        )

    def patch(
        self,
        name: str,
        param: str,
        value: Any,
        ref: int | str | None = None,
        index: str | None = None,
        op: str = "set",
        *,
        note: str = "",
        author: str = "",
    ) -> VersionInfo:
        """Set (or add to, or multiply) one tensor, a slice or one element → a new version.

        ``patch("m", "0.weight", 42, index="0, 0")`` is the guide's ``weight.data[0, 0] = 42``;
        ``patch("m", "0.weight", 1, index=":", op="add")`` is ``weight.data[:] += 1``.
        A tied parameter changes under every name that shares it.
        """
        if op not in PATCH_OPS:
            raise InvalidArgument(f"patch op {str(op)[:20]!r} is not one of {PATCH_OPS}")
        store = self.store
        note, author = check_note(note), check_author(author)
        model = store.get_model(name)
        base = store.resolve(name, ref)
        module = store.load_version(model, base)
        state = module.state_dict(keep_vars=True)
        if param not in state:
            raise NotFound(
                f"model {name!r} has no parameter {str(param)[:80]!r}; entries: {list(state)[:20]}"
            )
        target = select_index(state[param].data, parse_index(index, store.limits), param)
        update = _as_value(value, target, param)
        apply: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "set": target.copy_,
            "add": target.add_,
            "mul": target.mul_,
        }
        with torch.no_grad():
            apply[op](update)
        record = {"param": param, "index": index or "", "op": op, "value": patch_value(value)}
        return store.save_module(
            name, module, "patch", base, provenance=record, note=note, author=author
        )


def _submodule(module: nn.Module, path: str | None, model: str) -> nn.Module:
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n][:20]
        raise NotFound(
            f"model {model!r} has no submodule {str(path)[:80]!r}; submodules: {names}"
        ) from None


def _as_value(value: Any, target: torch.Tensor, param: str) -> torch.Tensor:
    try:
        update = torch.as_tensor(value, dtype=target.dtype)
        torch.broadcast_shapes(update.shape, target.shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidArgument(
            f"value for {param!r} must be a number or an array that "
            f"broadcasts to shape {list(target.shape)}: "
            f"{str(err).splitlines()[0][:120] if str(err) else ''}"
        ) from err
    if torch.broadcast_shapes(update.shape, target.shape) != target.shape:
        raise InvalidArgument(
            f"value of shape {list(update.shape)} does not broadcast to "
            f"{param!r}{list(target.shape)}"
        )
    return update
