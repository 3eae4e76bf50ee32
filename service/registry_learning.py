"""Servicer-side functions of the learning RPCs (Gradients, ApplyUpdate, Train, Diff …).

Each takes the ``RegistryServicer`` (its store, manager, worker pool) and the request;
``registry_service`` delegates to them in one line each, so the learning RPCs live beside
each other without growing the main servicer.
"""

from __future__ import annotations

# ---- gradients (L1) ---------------------------------------------------------------------

GRADIENT_CHUNK_BYTES = 1 << 20
MAX_GRADIENT_CHUNK_BYTES = 16 << 20
MAX_GRADIENT_NAMES = 10_000  # names or paths in one request (a model has fewer)
MAX_NAME_CHARS = 1000


async def gradients(servicer, request, context):
    """Registry.Gradients: a header (loss, each gradient's shape and stats), then unless
    stats_only the gradients' bytes, concatenated in the header's order, in chunks.

    Bounded before any work: name count and length, chunk size, and each input, target and
    grad_outputs tensor by --max-tensor-elements (the codec's inference checks). The module
    is the one inference serves (a lazy model's first request materializes it, as inference
    does), deep-copied on the device's compute thread; the copy is dropped after."""
    import asyncio

    from paramserve.protos import registry_pb2 as pb
    from paramserve.registry.errors import InvalidArgument, ResourceExhausted

    chunk_bytes = request.chunk_bytes or GRADIENT_CHUNK_BYTES
    if not 0 < chunk_bytes <= MAX_GRADIENT_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_bytes must be 1..{MAX_GRADIENT_CHUNK_BYTES}")
    if len(request.params) > MAX_GRADIENT_NAMES:
        raise ResourceExhausted(
            f"{len(request.params)} parameter names; at most {MAX_GRADIENT_NAMES} (name a "
            "submodule path to select many)"
        )
    if any(len(p) > MAX_NAME_CHARS for p in request.params):
        raise InvalidArgument(f"a parameter name is over {MAX_NAME_CHARS} characters")
    limit = getattr(servicer, "max_tensor_elements", 1 << 28)
    manager = servicer.manager
    wire_inputs = _kserve_view(request.model, request.inputs)
    if await manager.resolve(request.model, request.ref) is None:  # lazy: check, then make one
        _, _, signature = await manager.signature(request.model, "")
        _decode_inputs(wire_inputs, signature, limit)
    shape = tuple(request.inputs[0].shape) if request.inputs else None
    loaded = await manager.get(request.model, request.ref, shape)
    signature = loaded.signature
    inputs = tuple(_decode_inputs(wire_inputs, signature, limit).values())
    target = _free_tensor(request.target, "target", limit) if request.HasField("target") else None
    seeds = tuple(
        _free_tensor(g, f"grad_outputs[{i}]", limit) for i, g in enumerate(request.grad_outputs)
    )
    result = await asyncio.get_running_loop().run_in_executor(
        loaded.runner,
        _compute,
        loaded,
        inputs,
        request.loss or None,
        target,
        seeds or None,
        list(request.params) or None,
    )
    header = pb.GradientsHeader(version=loaded.version.number)
    if result.loss is not None:
        header.loss = result.loss
    for name, grad in result.grads.items():
        entry = header.gradients.add(
            name=name, shape=list(grad.shape), tied_with=result.tied.get(name, ())
        )
        _fill_stats(entry, grad)
        if not request.stats_only:
            entry.size_bytes = grad.numel() * grad.element_size()
    yield pb.GradientsChunk(header=header)
    if request.stats_only:
        return
    for grad in result.grads.values():  # one gradient's bytes at a time: no second copy of all
        data = memoryview(_grad_bytes(grad))
        for at in range(0, len(data), chunk_bytes):
            yield pb.GradientsChunk(data=bytes(data[at : at + chunk_bytes]))


def _compute(loaded, inputs, loss, target, seeds, params):
    """On the device's compute thread: gradients of the served module's copy."""
    from paramserve.registry.errors import NotFound
    from paramserve.registry.gradients import gradients

    try:
        return gradients(
            loaded.module,
            inputs,
            loss=loss,
            targets=target,
            grad_outputs=seeds,
            params=params,
            output_names=tuple(t.name for t in loaded.signature.outputs),
        )
    except NotFound as err:
        raise NotFound(f"model {loaded.model.name!r}: {err}") from None


def _kserve_view(model: str, tensors):
    """Registry ``Tensor`` messages seen as a KServe request (name, datatype, shape, raw
    contents), so the inference codec checks them against the signature as it checks
    inference inputs: names, datatypes, shapes, element counts, rows."""
    from types import SimpleNamespace

    from paramserve.registry.errors import InvalidArgument

    from .wire import SAFETENSORS_OF

    kserve_of = {st: kserve for kserve, st in SAFETENSORS_OF.items()}
    inputs = []
    for t in tensors:
        if t.dtype not in kserve_of:
            raise InvalidArgument(
                f"input {t.name[:80]!r} has dtype {t.dtype[:20]!r}; use one of {sorted(kserve_of)}"
            )
        inputs.append(SimpleNamespace(name=t.name, datatype=kserve_of[t.dtype], shape=t.shape))
    return SimpleNamespace(
        model_name=model, inputs=inputs, raw_input_contents=[t.data for t in tensors]
    )


def _decode_inputs(view, signature, limit: int):
    from . import codec

    return codec.decode_inputs(view, signature, limit)


def _free_tensor(msg, what: str, limit: int):
    """A target or grad_outputs tensor: any datatype and shape, bounded like an input."""
    from paramserve.registry.signature import TensorSignature

    from . import codec

    view = _kserve_view("", [msg])
    tensor = view.inputs[0]
    tensor.name = what
    spec = TensorSignature(what, codec.TORCH_OF[tensor.datatype], (-1,) * len(msg.shape))
    return codec.decode_tensor(tensor, msg.data, spec, limit)


def _fill_stats(entry, grad) -> None:
    from paramserve.registry.tensorfile import dtype_name

    entry.dtype = dtype_name(grad.dtype)
    if grad.numel():
        wide = grad.double()
        entry.norm = float(wide.norm())
        entry.min, entry.max, entry.mean = float(wide.min()), float(wide.max()), float(wide.mean())


def _grad_bytes(grad) -> memoryview:
    from paramserve.registry.tensorfile import tensor_bytes

    return tensor_bytes(grad.contiguous())


# ---- pushed updates (L2) ----------------------------------------------------------------

MAX_UPDATE_TENSORS = 100_000  # names in one update or batch; each is also checked by name


def _tensors(servicer, messages, what: str) -> list:
    """Wire tensors, bounded like inference inputs (count, then elements) before decoding."""
    from paramserve.registry.errors import ResourceExhausted

    from . import convert

    if len(messages) > MAX_UPDATE_TENSORS:
        raise ResourceExhausted(f"{len(messages)} {what}; at most {MAX_UPDATE_TENSORS}")
    limit = getattr(servicer, "max_tensor_elements", 1 << 28)
    out = []
    for msg in messages:
        numel = 1
        for size in msg.shape:
            numel *= max(int(size), 0)
        if numel > limit:
            raise ResourceExhausted(
                f"{what} tensor {msg.name[:80]!r} has {numel} elements, over the limit of "
                f"{limit}; split it (--max-tensor-elements)"
            )
        out.append((msg.name, convert.tensor_from_proto(msg)))
    return out


async def apply_update(servicer, request, context):
    """Registry.ApplyUpdate → the new version (ABORTED when its ref moved meanwhile)."""
    from paramserve.registry.errors import InvalidArgument

    from . import convert
    from .auth import current_author

    values = _tensors(servicer, request.values, "update values")
    named = dict(values)
    if len(named) != len(values):
        raise InvalidArgument("an update names a parameter twice; send each once")
    version = await servicer.run_blocking(
        servicer.store.apply_update,
        request.model,
        named,
        optimizer=request.optimizer or None,
        ref=request.ref or None,
        deltas=request.deltas,
        note=request.note,
        author=current_author(),
        parent=request.parent or None,
    )
    servicer.manager.forget(request.model)
    return convert.version_to_proto(version)


async def train(servicer, request, context):
    """Registry.Train → the new version and the batch's loss before the step. Inputs are
    checked against the model's signature by the inference codec (names, datatypes, shapes,
    --max-tensor-elements), the target like a Gradients target, before any work."""
    from paramserve.protos import registry_pb2 as pb
    from paramserve.registry.errors import InvalidArgument, ResourceExhausted
    from paramserve.registry.updates import train_version

    from . import convert
    from .auth import current_author

    if len(request.params) > MAX_GRADIENT_NAMES:
        raise ResourceExhausted(
            f"{len(request.params)} parameter names; at most "
            f"{MAX_GRADIENT_NAMES} (name a submodule path to select many)"
        )
    if any(len(p) > MAX_NAME_CHARS for p in request.params):
        raise InvalidArgument(f"a parameter name is over {MAX_NAME_CHARS} characters")
    limit = getattr(servicer, "max_tensor_elements", 1 << 28)
    _, _, signature = await servicer.manager.signature(request.model, request.ref)
    inputs = tuple(
        _decode_inputs(_kserve_view(request.model, request.inputs), signature, limit).values()
    )
    target = _free_tensor(request.target, "target", limit) if request.HasField("target") else None
    result = await servicer.run_blocking(
        train_version,
        servicer.store,
        request.model,
        inputs,
        target,
        request.loss,
        request.optimizer,
        ref=request.ref or None,
        params=list(request.params) or None,
        note=request.note,
        author=current_author(),
    )
    servicer.manager.forget(request.model)
    return pb.TrainResponse(version=convert.version_to_proto(result.version), loss=result.loss)


# ---- diff and history (L3) ----------------------------------------------------------------


async def diff(servicer, request, context):
    """Registry.Diff: two versions compared tensor by tensor, read from their blobs in chunks
    (``registry.diff``); one blob sha256 answers "identical" without reading."""
    from paramserve.protos import registry_pb2 as pb
    from paramserve.registry.diff import diff_versions

    from . import convert

    store = servicer.store
    a = await servicer.run_blocking(store.resolve, request.model, request.ref_a or None)
    b = await servicer.run_blocking(
        store.resolve, request.model_b or request.model, request.ref_b or None
    )
    result = await servicer.run_blocking(diff_versions, store.blobs, a, b, request.all)
    return pb.DiffResponse(
        a=convert.version_to_proto(a),
        b=convert.version_to_proto(b),
        identical=result.identical,
        tensors=result.tensors,
        changed=result.changed,
        diffs=[
            pb.TensorDiff(
                name=d.name,
                changed=d.changed,
                shape=list(d.shape),
                dtype=d.dtype,
                elements=d.elements,
                changed_elements=d.changed_elements,
                max_abs_diff=d.max_abs_diff,
                l2_diff=d.l2_diff,
                relative_change=d.relative_change,
                status=d.status,
            )
            for d in result.diffs
        ],
    )
