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

This class is a facade: SQL lives in ``repository``, blob lifetimes in ``gc``, the operations
that make versions in ``operations``, read-only queries in ``queries``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import architectures
from .blobs import BlobStore
from .blobstore import Blobs, BlobWriter, open_blob_store
from .database import ensure_schema, make_engine
from .gc import BlobCollector
from .inspect import parameter_infos
from .limits import DEFAULT_LIMITS, Limits, check_config, check_description
from .names import check_alias, check_name, check_text
from .operations import Operations
from .provenance import check_author, check_note, check_provenance
from .queries import module_tree_of, parameter_infos_of, read_tensor
from .refs import parse_ref
from .repository import Repository
from .schemes import parse_scheme
from .shapes import ShapeOracle
from .signature import Signature
from .slicing import parse_index
from .slicing import select as select_index
from .statedict import (
    CanonicalPlan,
    Source,
    UploadedState,
    canonical_plan,
    load_into,
    module_upload,
    open_upload,
    read_state_dict,
    validate,
    write_canonical,
)
from .uploads import StreamedUpload
from .values import ManifestEntry, ModelInfo, ParameterInfo, VersionInfo


def default_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'registry.db'}"


class Store:
    """Models, versions and aliases in a SQL database; parameters in content-addressed blobs."""

    def __init__(
        self,
        url: str | None = None,
        data_dir: str | Path = "./data",
        limits: Limits = DEFAULT_LIMITS,
        blob_url: str | None = None,
        s3_endpoint_url: str | None = None,
    ):
        """``blob_url``: where blobs live, ``s3://BUCKET/PREFIX`` or a directory (default
        ``<data_dir>/blobs``); ``s3_endpoint_url`` for an object store other than AWS."""
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = url or default_url(self.data_dir)
        self.limits = limits
        self.engine = make_engine(self.url)
        ensure_schema(self.engine, self.url)
        self.repository = Repository(self.engine)
        self.tx = self.repository.tx
        try:
            self.blobs: Blobs = open_blob_store(blob_url, self.data_dir / "blobs", s3_endpoint_url)
        except BaseException:
            self.engine.dispose()
            raise
        self.collector = BlobCollector(self.repository, self.blobs)
        self.shapes = ShapeOracle(limits)
        self.operations = Operations(self)

    def close(self) -> None:
        self.blobs.close()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generation(self) -> int:
        """A number that grows with every change to the registry (by any process)."""
        return self.repository.generation()

    # ---- models -------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        architecture: str,
        config: Mapping[str, Any] | None = None,
        init: str = "default",
        seed: int = 0,
        description: str = "",
    ) -> ModelInfo:
        """Register a model: an architecture, its config, an init policy and a seed."""
        check_name(name)
        check_text(description, "a model's description")
        check_description(description, self.limits)
        if config is not None:
            check_config(config, self.limits)
        arch = architectures.get(architecture)
        resolved = arch.resolve_config(config)
        scheme = parse_scheme(init, self.limits)
        meta = self.shapes.check_build(arch, resolved)  # a bad or too big config: refused now
        info = self.repository.create_model(
            name, architecture, resolved, str(scheme), int(seed), description
        )
        if not arch.is_lazy(resolved) and not meta.state_dict():
            # Nothing to upload (Triton's ``simple``, CenteredLayer): version 1 is made now,
            # so the model is servable at once.
            self.save_module(name, self.shapes.fresh_module(info), "init", None, first_only=True)
            info = self.get_model(name)
        return info

    def get_model(self, name: str) -> ModelInfo:
        return self.repository.get_model(name)

    def list_models(self) -> list[ModelInfo]:
        return self.repository.list_models()

    def delete_model(self, name: str) -> None:
        self.collector.collect(self.repository.delete_model(name))

    # ---- versions -----------------------------------------------------------------------

    def upload(
        self,
        name: str,
        source: Source,
        alias: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
    ) -> VersionInfo:
        """Store a state_dict as the next version. Nothing is written unless it fits strictly.

        ``source``: safetensors bytes or file, a ``torch.save``'d state_dict (bytes or file,
        read with ``weights_only=True``), or a mapping of names to tensors. ``provenance``:
        what the client says it sent (``{"file": ..., "file_sha256": ...}``); the kind is
        ``upload`` whatever it says.
        """
        model = self.get_model(name)
        if alias is not None:
            check_alias(alias)
        record = check_provenance({**(provenance or {}), "kind": "upload"})
        note, author = check_note(note), check_author(author)
        upload = open_upload(source, self.limits)
        try:
            expected = self.shapes.expected_state(model, upload.specs)
            validate(name, upload, expected)
            plan = canonical_plan(upload, expected)
            blob = self._write_blob(upload, plan)
        finally:
            upload.close()
        return self.add_version(
            name,
            blob,
            plan.manifest_with(blob.segment_sha256),
            "upload",
            alias=alias,
            provenance=record,
            note=note,
            author=author,
        )

    def begin_upload(
        self,
        name: str,
        size_bytes: int,
        alias: str | None = None,
        spool_dir: str | Path | None = None,
        sha256: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
    ) -> StreamedUpload:
        """An upload of ``size_bytes`` that arrives in chunks (a network stream): feed it with
        ``write``, end it with ``finish(sha256)`` → the new version, or ``abort()``.

        Checked as ``upload`` checks; a canonical safetensors stream is written straight into
        its blob, anything else is spooled (to ``<data-dir>/spool`` by default) and then
        uploaded from there. ``sha256``: the digest declared before the bytes (an upload
        header's), which lets an object store stream them straight under their key.
        ``provenance``, ``note``, ``author``: as for ``upload``, checked now.
        """
        model = self.get_model(name)
        if alias is not None:
            check_alias(alias)
        record = check_provenance({**(provenance or {}), "kind": "upload"})
        return StreamedUpload(
            self,
            model,
            size_bytes,
            alias,
            Path(spool_dir) if spool_dir else self.data_dir / "spool",
            sha256,
            provenance=record,
            note=check_note(note),
            author=check_author(author),
        )

    def add_version(
        self,
        name: str,
        blob: BlobWriter,
        manifest: Sequence[ManifestEntry],
        origin: str,
        parent: int | None = None,
        alias: str | None = None,
        first_only: bool = False,
        *,
        provenance: Mapping[str, Any] | None = None,
        note: str = "",
        author: str = "",
        optimizer_sha256: str | None = None,
    ) -> VersionInfo:
        """Store a written blob (``blobs.create()``, not yet committed) as the next version.

        The blob is held before its file is placed and until its row commits, so no
        concurrent deletion collects it (``gc``). With ``first_only`` an existing version
        wins and is returned (the lazy-init race); the blob is then collected.
        ``provenance`` (what made it, ``{"kind": origin, ...}``), ``note`` and ``author`` are
        recorded with the row; ``optimizer_sha256``: an ``update``'s optimizer-state blob.
        """
        record = check_provenance({"kind": origin, **(provenance or {})})
        note, author = check_note(note), check_author(author)

        def insert(ref, hold_id):
            return self.repository.insert_version(
                name,
                ref.sha256,
                ref.size_bytes,
                manifest,
                origin,
                parent,
                alias,
                hold_id,
                first_only,
                provenance=record,
                note=note,
                author=author,
                optimizer_sha256=optimizer_sha256,
            )

        return self.collector.publish(blob, insert)

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
        optimizer_sha256: str | None = None,
    ) -> VersionInfo:
        """A module's state as the next version (``operations`` make versions this way);
        ``provenance``, ``note``, ``author``, ``optimizer_sha256`` as for ``add_version``."""
        check_provenance(provenance)
        note, author = check_note(note), check_author(author)
        upload, expected = module_upload(module)
        plan = canonical_plan(upload, expected)
        blob = self._write_blob(upload, plan)
        return self.add_version(
            name,
            blob,
            plan.manifest_with(blob.segment_sha256),
            origin,
            parent.number if parent else None,
            first_only=first_only,
            provenance=provenance,
            note=note,
            author=author,
            optimizer_sha256=optimizer_sha256,
        )

    def save_update(
        self,
        name: str,
        module: nn.Module,
        base: VersionInfo,
        provenance: Mapping[str, Any],
        state_bytes: bytes | None,
        keep_state_sha: str | None,
        alias: str | None,
        check_latest: bool,
        note: str = "",
        author: str = "",
    ) -> VersionInfo:
        """An ``update`` version (``updates``): the module's state, parent ``base``, and its
        optimizer state (``state_bytes``, or the parent's blob ``keep_state_sha``), committed
        only while ``alias`` / the latest still names ``base`` (else ``Aborted``).

        The state blob is held from before its file is placed until after the row's commit
        (then collected if no row refers to it: an aborted update leaves nothing behind)."""
        record = check_provenance({**provenance, "kind": "update"})
        note, author = check_note(note), check_author(author)
        hold_id, state_sha = None, keep_state_sha
        held = state_sha
        if state_bytes is not None:
            writer = self.blobs.create()
            try:
                writer.write(state_bytes)
                hold_id = self.repository.add_hold(writer.sha256)
            except BaseException:
                writer.discard()
                raise
            state_sha = held = self.blobs.commit(writer).sha256
        elif state_sha is not None:
            hold_id = self.repository.add_hold(state_sha)
            if not self.blobs.exists(state_sha):  # the parent went meanwhile: start fresh
                state_sha = None
        try:
            upload, expected = module_upload(module)
            plan = canonical_plan(upload, expected)
            blob = self._write_blob(upload, plan)
            manifest = plan.manifest_with(blob.segment_sha256)

            def insert(ref, param_hold_id):
                return self.repository.insert_version(
                    name,
                    ref.sha256,
                    ref.size_bytes,
                    manifest,
                    "update",
                    base.number,
                    alias,
                    param_hold_id,
                    provenance=record,
                    note=note,
                    author=author,
                    optimizer_sha256=state_sha,
                    head=(alias, check_latest, base.number),
                )

            return self.collector.publish(blob, insert)
        finally:
            if hold_id is not None and held is not None:
                self.collector.release(held, hold_id)

    def _write_blob(self, upload: UploadedState, plan: CanonicalPlan) -> BlobWriter:
        writer = self.blobs.create(plan.segments)
        try:
            write_canonical(writer, upload, plan)
        except BaseException:
            writer.discard()
            raise
        return writer

    def list_versions(self, name: str) -> list[VersionInfo]:
        return self.repository.list_versions(name)

    def resolve(self, name: str, ref: int | str | None = None) -> VersionInfo:
        """A version by number, alias, or the latest (``None``, ``""`` or ``"latest"``)."""
        return self.repository.resolve(name, ref)

    def version_or_none(self, name: str, ref: int | str | None) -> VersionInfo | None:
        """Version ``ref``; for no ref (or "latest") the newest, or ``None`` when there is
        none yet. An explicit ref that does not exist is still ``NotFound``."""
        parsed = parse_ref(ref)
        if parsed is None:
            return self.latest_or_none(name)
        return self.resolve(name, parsed)

    def latest_or_none(self, name: str) -> VersionInfo | None:
        """The newest version, or ``None`` when the model has none yet."""
        return self.repository.latest_or_none(name)

    def delete_version(self, name: str, number: int, force: bool = False) -> list[str]:
        """Delete one version; refused (``FailedPrecondition`` naming them) while aliases point
        at it, unless ``force``, which removes those aliases. Returns the aliases removed."""
        shas, removed = self.repository.delete_version(name, number, force)
        self.collector.collect(shas)
        return removed

    def set_alias(self, name: str, alias: str, number: int) -> VersionInfo:
        """Point ``alias`` at version ``number`` (moving it if it exists)."""
        return self.repository.set_alias(name, alias, number)

    def delete_alias(self, name: str, alias: str) -> None:
        self.repository.delete_alias(name, alias)

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
        """``(version, reader)`` for streaming a version's safetensors bytes (a download); the
        reader checks the sha256 in ``finish()`` and drops a local blob's pages from the page
        cache behind it (``VerifyingReader.drop_behind``)."""
        version = self.resolve(name, ref)
        reader = self.blobs.open(version.sha256)
        reader.drop_behind()
        return version, reader

    def parameters(
        self, name: str, ref: int | str | None = None, stats: bool = False
    ) -> list[ParameterInfo]:
        """Every state_dict entry: spec, kind, requires_grad, ties, lazy state, optional stats.

        A stored version is described from its manifest, statistics streamed from its blob.
        A model with no version yet (and no ``ref``) describes its freshly built module, so
        a lazy model reports its parameters as uninitialized.
        """
        model = self.get_model(name)
        version = self.version_or_none(name, ref)
        if version is None:
            return parameter_infos(self.shapes.fresh_module(model), with_stats=stats)
        return parameter_infos_of(model, version, self._blobs_for_queries(), with_stats=stats)

    def tensor(
        self, name: str, param: str, ref: int | str | None = None, index: str | None = None
    ) -> torch.Tensor:
        """One state_dict entry, or a slice of it (``index="0, :2"``), as a new tensor; only
        that entry's bytes are read."""
        model = self.get_model(name)
        version = self.resolve(name, ref)
        selector = parse_index(index, self.limits)
        tensor = read_tensor(self._blobs_for_queries(), model, version, param)
        return select_index(tensor, selector, param).clone()

    def _blobs_for_queries(self) -> BlobStore:
        """``queries`` annotates its blob store as the local one; it reads through the
        ``Blobs`` interface only (open, open_raw, path), which both stores have."""
        return cast(BlobStore, self.blobs)

    def module_tree(self, name: str, ref: int | str | None = None) -> str:
        """The module as ``print(module)`` shows it (no tensor data is read)."""
        model = self.get_model(name)
        version = self.version_or_none(name, ref)
        if version is None:
            return str(self.shapes.fresh_module(model))
        return module_tree_of(model, version)

    def signature(self, model: ModelInfo, version: VersionInfo | None = None) -> Signature:
        """Input and output names, dtypes and shapes (-1: free) of a model at a version."""
        return self.shapes.signature(model, version)

    # ---- operations that create versions (``operations``) ------------------------------

    def materialize(self, name: str, input_shape: Sequence[int], author: str = "") -> VersionInfo:
        return self.operations.materialize(name, input_shape, author=author)

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
        return self.operations.initialize(
            name, scheme, ref, module_path, seed, input_shape, note=note, author=author
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
        return self.operations.patch(name, param, value, ref, index, op, note=note, author=author)

    def apply_update(
        self,
        name: str,
        values: Mapping[str, Any],
        optimizer: str | None = None,
        ref: int | str | None = None,
        deltas: bool = False,
        note: str = "",
        author: str = "",
        parent: int | None = None,
    ) -> VersionInfo:
        """Gradients by parameter name and an optimizer step (``"sgd(lr=0.1)"``), or with
        ``deltas`` values added as they are → a new ``update`` version (see ``updates``).
        ``parent``: the version they were computed from, which ``ref`` must still name."""
        from .updates import update_version

        return update_version(
            self, name, values, optimizer, ref, deltas, note, author, parent=parent
        )

    materialize.__doc__ = Operations.materialize.__doc__
    initialize.__doc__ = Operations.initialize.__doc__
    patch.__doc__ = Operations.patch.__doc__


def _has_non_persistent_buffers(module: nn.Module) -> bool:
    return any(sub._non_persistent_buffers_set for sub in module.modules())
