"""The versioned parameter store: models, versions, aliases, and the operations that make versions.

Usable from a Python prompt with no server::

    from paramserve.registry import Store
    store = Store(data_dir="./data")                  # sqlite:///./data/registry.db + ./data/blobs
    store.create_model("mlp", architecture="mlp")
    v = store.upload("mlp", "mlp.safetensors", alias="production")
    net = store.load("mlp", "production")             # an nn.Module holding version v
    store.initialize("mlp", "normal(0, 0.01)", module_path="hidden")   # → a new version
    store.patch("mlp", "hidden.weight", 42.0, index="0, 0")            # → a new version

Every version is immutable: initializing or patching writes a new one with its parent recorded.
A version's blob is on disk (fsynced) before its row commits, so a row always has its blob.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from torch import nn

from . import architectures
from .blobs import BlobRef, BlobStore
from .database import Transactions, ensure_schema, make_engine
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .inspect import parameter_infos
from .schema import AliasRow, ModelRow, RegistryState, VersionRow
from .schemes import apply_scheme, parse_scheme
from .shapes import ShapeOracle
from .signature import Signature
from .slicing import parse_index, select as select_index
from .statedict import (Source, canonical_plan, load_into, module_upload, open_upload,
                        read_state_dict, validate, write_canonical)
from .uploads import StreamedUpload
from .values import ManifestEntry, ModelInfo, ParameterInfo, TensorSpec, VersionInfo

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LATEST = "latest"
PATCH_OPS = ("set", "add", "mul")


def default_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'registry.db'}"


class Store:
    """Models, versions and aliases in a SQL database; parameters in content-addressed blobs."""

    def __init__(self, url: str | None = None, data_dir: str | Path = "./data"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = url or default_url(self.data_dir)
        self.engine = make_engine(self.url)
        ensure_schema(self.engine, self.url)
        self.tx = Transactions(self.engine)
        self.blobs = BlobStore(self.data_dir / "blobs")
        self._first_version_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.shapes = ShapeOracle()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generation(self) -> int:
        """A number that grows with every change to the registry (by any process)."""
        with self.engine.connect() as connection:
            return connection.scalar(select(RegistryState.generation)
                                     .where(RegistryState.id == 1))

    # ---- models -------------------------------------------------------------------------

    def create_model(self, name: str, architecture: str, config: Mapping[str, Any] | None = None,
                     init: str = "default", seed: int = 0, description: str = "") -> ModelInfo:
        """Register a model: an architecture, its config, an init policy and a seed."""
        _check_name(name, "model name")
        arch = architectures.get(architecture)
        resolved = arch.resolve_config(config)
        scheme = parse_scheme(init)
        arch.build(resolved, device="meta")  # a bad config is refused now, not at first use
        try:
            with self.tx() as session:
                row = ModelRow(name=name, architecture=architecture, config=resolved,
                               init=str(scheme), seed=int(seed), description=description,
                               next_version=1)
                session.add(row)
                session.flush()
                _bump_generation(session)
                return self._model_info(session, row)
        except IntegrityError:
            raise AlreadyExists(f"model {name!r} already exists; pick another name or delete it "
                                "first") from None

    def get_model(self, name: str) -> ModelInfo:
        with self.tx() as session:
            return self._model_info(session, self._model_row(session, name))

    def list_models(self) -> list[ModelInfo]:
        with self.tx() as session:
            rows = session.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [self._model_info(session, row) for row in rows]

    def delete_model(self, name: str) -> None:
        with self.tx() as session:
            row = self._model_row(session, name)
            shas = {v.sha256 for v in row.versions}
            session.delete(row)
            _bump_generation(session)
        self._delete_unreferenced_blobs(shas)

    # ---- versions -----------------------------------------------------------------------

    def upload(self, name: str, source: Source, alias: str | None = None) -> VersionInfo:
        """Store a state_dict as the next version. Nothing is written unless it fits strictly.

        ``source``: safetensors bytes or file, a ``torch.save``'d state_dict (bytes or file,
        read with ``weights_only=True``), or a mapping of names to tensors.
        """
        model = self.get_model(name)
        if alias is not None:
            _check_alias(alias)
        upload = open_upload(source)
        try:
            expected = self.shapes.expected_state(model, upload.specs)
            validate(name, upload, expected)
            plan = canonical_plan(upload, expected)
            blob = self.blobs.write(lambda out: write_canonical(out, upload, plan))
        finally:
            upload.close()
        return self._add_version(name, blob, plan.manifest, "upload", None, alias)

    def begin_upload(self, name: str, size_bytes: int, alias: str | None = None,
                     spool_dir: str | Path | None = None) -> StreamedUpload:
        """An upload of ``size_bytes`` that arrives in chunks (a network stream): feed it with
        ``write``, end it with ``finish(sha256)`` → the new version, or ``abort()``.

        Checked as ``upload`` checks; a canonical safetensors stream is written straight into
        its blob, anything else is spooled (to ``<data-dir>/spool`` by default) and then
        uploaded from there.
        """
        model = self.get_model(name)
        if alias is not None:
            _check_alias(alias)
        return StreamedUpload(self, model, size_bytes, alias,
                              Path(spool_dir) if spool_dir else self.data_dir / "spool")

    def list_versions(self, name: str) -> list[VersionInfo]:
        with self.tx() as session:
            model = self._model_row(session, name)
            return [self._version_info(row, model) for row in model.versions]

    def resolve(self, name: str, ref: int | str | None = None) -> VersionInfo:
        """A version by number, alias, or the latest (``None``, ``""`` or ``"latest"``)."""
        with self.tx() as session:
            model = self._model_row(session, name)
            return self._version_info(self._resolve_row(session, model, ref), model)

    def delete_version(self, name: str, number: int) -> None:
        with self.tx() as session:
            model = self._model_row(session, name)
            row = self._resolve_row(session, model, int(number))
            sha = row.sha256
            session.delete(row)
            _bump_generation(session)
        self._delete_unreferenced_blobs({sha})

    def set_alias(self, name: str, alias: str, number: int) -> VersionInfo:
        """Point ``alias`` at version ``number`` (moving it if it exists)."""
        _check_alias(alias)
        with self.tx() as session:
            model = self._model_row(session, name)
            version = self._resolve_row(session, model, int(number))
            self._point_alias(session, model, alias, version)
            session.flush()
            _bump_generation(session)
            return self._version_info(version, model)

    def delete_alias(self, name: str, alias: str) -> None:
        with self.tx() as session:
            model = self._model_row(session, name)
            row = session.scalar(select(AliasRow).where(AliasRow.model_id == model.id,
                                                        AliasRow.name == alias))
            if row is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}; "
                               f"its aliases: {[a.name for a in model.aliases]}")
            session.delete(row)
            _bump_generation(session)

    # ---- reading parameters -------------------------------------------------------------

    def load(self, name: str, ref: int | str | None = None) -> nn.Module:
        """The module of a version, parameters loaded (on the CPU, in eval mode)."""
        model = self.get_model(name)
        return self.load_version(model, self.resolve(name, ref))

    def load_version(self, model: ModelInfo, version: VersionInfo) -> nn.Module:
        arch = architectures.get(model.architecture)
        module = arch.build(model.config, device="meta")
        if _has_non_persistent_buffers(module):
            module = arch.build(model.config)  # those are not in the blob: compute them for real
        with self.blobs.open(version.sha256) as reader:
            load_into(module, reader, model.name)
        return module.eval()

    def state_dict(self, name: str, ref: int | str | None = None) -> dict[str, torch.Tensor]:
        """A version's state_dict; tied keys map to one tensor."""
        version = self.resolve(name, ref)
        with self.blobs.open(version.sha256) as reader:
            return read_state_dict(reader)

    def open_blob(self, name: str, ref: int | str | None = None):
        """``(version, reader)`` for streaming a version's safetensors bytes; the reader checks
        the sha256 in ``finish()``."""
        version = self.resolve(name, ref)
        return version, self.blobs.open(version.sha256)

    def parameters(self, name: str, ref: int | str | None = None,
                   stats: bool = False) -> list[ParameterInfo]:
        """Every state_dict entry: spec, kind, requires_grad, ties, lazy state, optional stats.

        A model with no version yet (and no ``ref``) describes its freshly built module, so
        a lazy model reports its parameters as uninitialized.
        """
        return parameter_infos(self._module_for_query(name, ref), with_stats=stats)

    def tensor(self, name: str, param: str, ref: int | str | None = None,
               index: str | None = None) -> torch.Tensor:
        """One state_dict entry, or a slice of it (``index="0, :2"``), as a new tensor."""
        version = self.resolve(name, ref)
        with self.blobs.open(version.sha256) as reader:
            state = read_state_dict(reader)
        if param not in state:
            raise NotFound(f"version {version.number} of {name!r} has no entry {param!r}; "
                           f"entries: {list(state)}")
        return select_index(state[param], parse_index(index), param).clone()

    def module_tree(self, name: str, ref: int | str | None = None) -> str:
        """The module as ``print(module)`` shows it."""
        return str(self._module_for_query(name, ref))

    def signature(self, model: ModelInfo, version: VersionInfo | None = None) -> Signature:
        """Input and output names, dtypes and shapes (-1: free) of a model at a version."""
        return self.shapes.signature(model, version)

    # ---- operations that create versions ------------------------------------------------

    def materialize(self, name: str, input_shape: Sequence[int]) -> VersionInfo:
        """Lazy initialization: the first input's shape fixes the lazy shapes; the model's init
        policy and seed fill them; the result is stored as a version (origin ``lazy-init``).

        Returns the existing latest version when there is one, so concurrent first callers (in
        this process or in other replicas) all get the one version that was created first.
        """
        with self._first_version_locks[name]:
            existing = self.latest_or_none(name)
            if existing is not None:
                return existing
            model = self.get_model(name)
            if not model.lazy:
                raise FailedPrecondition(
                    f"model {name!r} has fixed shapes and no version; upload parameters "
                    f"(`paramserve upload {name} FILE`) or initialize it (`paramserve init "
                    f"{name} SCHEME`)")
            module = self.shapes.fresh_module(model, input_shape)
            blob, manifest = self._write_module(module)
            return self._add_version(name, blob, manifest, "lazy-init", None, None,
                                     first_only=True)

    def initialize(self, name: str, scheme: str, ref: int | str | None = None,
                   module_path: str | None = None, seed: int | None = None,
                   input_shape: Sequence[int] | None = None) -> VersionInfo:
        """Apply an init scheme to the whole module or to ``module_path`` → a new version.

        Starts from version ``ref`` (default: the latest). A model with no version starts from
        its freshly built module; a lazy one then needs ``input_shape`` to fix its shapes.
        """
        parsed = parse_scheme(scheme)
        model = self.get_model(name)
        base = self.version_or_none(name, ref)
        if base is not None:
            module = self.load_version(model, base)
        elif model.lazy and input_shape is None:
            raise FailedPrecondition(
                f"lazy model {name!r} has no shapes yet; pass an input shape or send it a first "
                "inference request")
        else:
            module = self.shapes.fresh_module(model, input_shape)
        target = _submodule(module, module_path, name)
        apply_scheme(target, parsed, model.seed if seed is None else seed)
        return self._save_module(name, module, "init", base)

    def patch(self, name: str, param: str, value: Any, ref: int | str | None = None,
              index: str | None = None, op: str = "set") -> VersionInfo:
        """Set (or add to, or multiply) one tensor, a slice or one element → a new version.

        ``patch("m", "0.weight", 42, index="0, 0")`` is the guide's ``weight.data[0, 0] = 42``;
        ``patch("m", "0.weight", 1, index=":", op="add")`` is ``weight.data[:] += 1``.
        A tied parameter changes under every name that shares it.
        """
        if op not in PATCH_OPS:
            raise InvalidArgument(f"patch op {op!r} is not one of {PATCH_OPS}")
        model = self.get_model(name)
        base = self.resolve(name, ref)
        module = self.load_version(model, base)
        state = module.state_dict(keep_vars=True)
        if param not in state:
            raise NotFound(f"model {name!r} has no parameter {param!r}; entries: {list(state)}")
        target = select_index(state[param].data, parse_index(index), param)
        update = _as_value(value, target, param)
        with torch.no_grad():
            {"set": target.copy_, "add": target.add_, "mul": target.mul_}[op](update)
        return self._save_module(name, module, "patch", base)

    # ---- internals ----------------------------------------------------------------------

    def _save_module(self, name: str, module: nn.Module, origin: str,
                     parent: VersionInfo | None) -> VersionInfo:
        blob, manifest = self._write_module(module)
        return self._add_version(name, blob, manifest, origin,
                                 parent.number if parent else None, None)

    def _write_module(self, module: nn.Module) -> tuple[BlobRef, list[ManifestEntry]]:
        """A module's state as a new blob; returns the blob and its manifest."""
        upload, expected = module_upload(module)
        plan = canonical_plan(upload, expected)
        blob = self.blobs.write(lambda out: write_canonical(out, upload, plan))
        return blob, plan.manifest

    def _add_version(self, name: str, blob: BlobRef, manifest: list[ManifestEntry], origin: str,
                     parent: int | None, alias: str | None, first_only: bool = False
                     ) -> VersionInfo:
        """Insert the next version row (its blob is already on disk). With ``first_only``, an
        existing version wins and is returned instead (the lazy-init race)."""
        for _attempt in range(10):
            try:
                with self.tx() as session:
                    model = self._model_row(session, name)
                    latest = _latest_row(session, model) if first_only else None
                    if latest is not None:
                        return self._version_info(latest, model)
                    number = model.next_version
                    model.next_version = number + 1
                    row = VersionRow(model_id=model.id, number=number,
                                     sha256=blob.sha256, size_bytes=blob.size_bytes,
                                     manifest=[_manifest_json(e) for e in manifest],
                                     origin=origin, parent=parent)
                    session.add(row)
                    session.flush()
                    if alias is not None:
                        self._point_alias(session, model, alias, row)
                        session.flush()
                    _bump_generation(session)
                    return self._version_info(row, model)
            except IntegrityError:
                continue  # another writer took the number (PostgreSQL); take the next one
        raise FailedPrecondition(f"could not allocate a version number for {name!r}: too many "
                                 "concurrent writers; retry")

    def version_or_none(self, name: str, ref: int | str | None) -> VersionInfo | None:
        """Version ``ref``; for no ref (or "latest") the newest, or ``None`` when there is
        none yet. An explicit ref that does not exist is still ``NotFound``."""
        if ref in (None, "", LATEST):
            return self.latest_or_none(name)
        return self.resolve(name, ref)

    def latest_or_none(self, name: str) -> VersionInfo | None:
        """The newest version, or ``None`` when the model has none yet."""
        with self.tx() as session:
            model = self._model_row(session, name)
            row = _latest_row(session, model)
            return None if row is None else self._version_info(row, model)

    def _module_for_query(self, name: str, ref: int | str | None) -> nn.Module:
        model = self.get_model(name)
        version = self.version_or_none(name, ref)
        if version is None:
            return self.shapes.fresh_module(model)
        return self.load_version(model, version)

    def _point_alias(self, session: Session, model: ModelRow, alias: str,
                     version: VersionRow) -> None:
        row = session.scalar(select(AliasRow).where(AliasRow.model_id == model.id,
                                                    AliasRow.name == alias))
        if row is None:
            session.add(AliasRow(model_id=model.id, name=alias, version_id=version.id))
        else:
            row.version_id = version.id

    def _delete_unreferenced_blobs(self, shas: Iterable[str]) -> None:
        with self.tx() as session:
            referenced = set(session.scalars(select(VersionRow.sha256)
                                             .where(VersionRow.sha256.in_(list(shas)))))
        for sha in set(shas) - referenced:
            self.blobs.delete(sha)

    @staticmethod
    def _model_row(session: Session, name: str) -> ModelRow:
        row = session.scalar(select(ModelRow).where(ModelRow.name == name))
        if row is None:
            raise NotFound(f"model {name!r} not found; create it with `paramserve create {name} "
                           "--architecture ARCH` (list models with `paramserve models`)")
        return row

    @staticmethod
    def _resolve_row(session: Session, model: ModelRow, ref: int | str | None) -> VersionRow:
        """One indexed lookup; the listing in the error message is read only on failure."""
        query = select(VersionRow).where(VersionRow.model_id == model.id)
        if ref is None or ref == "" or ref == LATEST:
            row = session.scalar(query.order_by(VersionRow.number.desc()).limit(1))
            if row is None:
                raise NotFound(f"model {model.name!r} has no versions yet; upload parameters "
                               f"with `paramserve upload {model.name} FILE`")
            return row
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            row = session.scalar(query.where(VersionRow.number == int(ref)))
            if row is None:
                raise NotFound(f"model {model.name!r} has no version {int(ref)}; versions: "
                               f"{_some(session, VersionRow.number, model)}")
            return row
        row = session.scalar(query.join(AliasRow, AliasRow.version_id == VersionRow.id)
                             .where(AliasRow.model_id == model.id, AliasRow.name == ref))
        if row is None:
            raise NotFound(f"model {model.name!r} has no alias {ref!r}; aliases: "
                           f"{_some(session, AliasRow.name, model)}")
        return row

    @staticmethod
    def _model_info(session: Session, row: ModelRow) -> ModelInfo:
        arch = architectures.get(row.architecture) if row.architecture else None
        return ModelInfo(
            name=row.name, architecture=row.architecture, config=dict(row.config),
            init=row.init, seed=row.seed, description=row.description,
            created_at=_utc(row.created_at), lazy=bool(arch and arch.is_lazy(row.config)),
            aliases={a.name: a.version.number for a in row.aliases},
            latest_version=session.scalar(select(func.max(VersionRow.number))
                                          .where(VersionRow.model_id == row.id)))

    @staticmethod
    def _version_info(row: VersionRow, model: ModelRow) -> VersionInfo:
        return VersionInfo(
            model=model.name, number=row.number, sha256=row.sha256, size_bytes=row.size_bytes,
            origin=row.origin, parent=row.parent, created_at=_utc(row.created_at),
            manifest=tuple(ManifestEntry(e["name"], TensorSpec(tuple(e["shape"]), e["dtype"]),
                                         e.get("tied_to")) for e in row.manifest),
            aliases=tuple(sorted(a.name for a in model.aliases if a.version_id == row.id)))


def _bump_generation(session: Session) -> None:
    session.execute(update(RegistryState).where(RegistryState.id == 1)
                    .values(generation=RegistryState.generation + 1))


def _latest_row(session: Session, model: ModelRow) -> VersionRow | None:
    return session.scalar(select(VersionRow).where(VersionRow.model_id == model.id)
                          .order_by(VersionRow.number.desc()).limit(1))


def _some(session: Session, column, model: ModelRow, limit: int = 20) -> list:
    """Up to ``limit`` values of ``column`` for ``model``, for error messages."""
    table = column.class_
    return list(session.scalars(select(column).where(table.model_id == model.id)
                                .order_by(column).limit(limit)))


def _utc(when: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _manifest_json(entry: ManifestEntry) -> dict[str, Any]:
    return {"name": entry.name, "shape": list(entry.spec.shape or ()), "dtype": entry.spec.dtype,
            "tied_to": entry.tied_to}


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgument(f"{what} {name!r} is invalid: use 1-128 letters, digits, '_', '-'"
                              " or '.', starting with a letter or digit")


def _check_alias(alias: str) -> None:
    _check_name(alias, "alias")
    if alias == LATEST or alias.isdigit():
        raise InvalidArgument(f"alias {alias!r} is reserved: 'latest' and numbers already "
                              "name versions; pick a word like 'production'")


def _has_non_persistent_buffers(module: nn.Module) -> bool:
    return any(sub._non_persistent_buffers_set for sub in module.modules())


def _submodule(module: nn.Module, path: str | None, model: str) -> nn.Module:
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n][:20]
        raise NotFound(f"model {model!r} has no submodule {path!r}; submodules: {names}") from None


def _as_value(value: Any, target: torch.Tensor, param: str) -> torch.Tensor:
    try:
        update = torch.as_tensor(value, dtype=target.dtype)
        torch.broadcast_shapes(update.shape, target.shape)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgument(f"value for {param!r} must be a number or an array that "
                              f"broadcasts to shape {list(target.shape)}: {err}") from err
    if torch.broadcast_shapes(update.shape, target.shape) != target.shape:
        raise InvalidArgument(f"value of shape {list(update.shape)} does not broadcast to "
                              f"{param!r}{list(target.shape)}")
    return update
