"""Client methods of the learning RPCs (gradients, updates, diff, history).

A mixin ``Client`` inherits: it uses ``self._call``, ``self.registry`` and ``self.timeout_s``.
Like the client, nothing heavy at import: numpy and torch only inside the calls that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class GradientStat:
    """One gradient's summary as the server computed it (float64)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    norm: float
    min: float
    max: float
    mean: float
    tied_with: tuple[str, ...] = ()


@dataclass
class GradientsResult:
    """``loss``: None when grad_outputs seeded the backward. ``grads``: by state_dict key
    (empty with ``stats_only``): numpy arrays, or torch tensors when the inputs were torch.
    ``stats``: every gradient's shape, norm, min, max, mean. ``version``: what answered."""

    loss: float | None
    grads: dict[str, Any]
    stats: dict[str, GradientStat]
    version: int = 0


class GradientsClient:
    """``Registry.Gradients``; ``LearningClient`` inherits it."""

    def gradients(
        self,
        name: str,
        inputs,
        loss: str | None = None,
        targets=None,
        grad_outputs=None,
        params: list[str] | str | None = None,
        stats_only: bool = False,
        ref: str | int | None = None,
    ) -> GradientsResult:
        """The gradients of ``loss`` (``"mse"``, ``"cross_entropy"``, ``"sum"``: the seeds'
        ``net(X).sum().backward()``) of ``inputs`` against ``targets``, or of the outputs
        seeded with ``grad_outputs`` (a tensor, or a sequence of one per output), for
        ``params`` (state_dict keys or submodule paths; default: every parameter). Nothing
        is stored. ``inputs``: a tensor/array, or a dict by input name. Neither loss nor
        grad_outputs: ``"sum"``. Torch inputs give torch gradients, as ``infer`` does."""
        from paramserve.protos import registry_pb2 as pb
        from paramserve.registry.values import INPUT_NAME

        from .client_files import is_torch_tensor, torch_module

        named = dict(inputs) if isinstance(inputs, dict) else {INPUT_NAME: inputs}
        uses_torch = any(is_torch_tensor(v) for v in named.values())
        if loss is None and grad_outputs is None:
            loss = "sum"
        if grad_outputs is not None and not isinstance(grad_outputs, (list, tuple)):
            grad_outputs = [grad_outputs]
        request = pb.GradientsRequest(
            model=name,
            ref="" if ref is None else str(ref),
            inputs=[_input_tensor(str(k), v) for k, v in named.items()],
            loss=loss or "",
            grad_outputs=[
                _input_tensor(f"grad_outputs[{i}]", g) for i, g in enumerate(grad_outputs or ())
            ],
            params=[params] if isinstance(params, str) else list(params or ()),
            stats_only=stats_only,
        )
        if targets is not None:
            request.target.CopyFrom(_input_tensor("target", targets))
        header, data = self._gradient_stream(request)
        return _gradients_result(header, data, torch_module() if uses_torch else None, stats_only)

    def _gradient_stream(self, request):
        """The header and the data bytes; a watchdog (as downloads have) ends a stalled one."""
        import grpc

        from .client import ServerError, _raise_from
        from .client_streams import Stall

        header, parts = None, []
        call = self.registry.Gradients(request, timeout=None, metadata=self.metadata)
        stall = None
        try:
            with Stall(call, self.timeout_s) as stall:
                for chunk in call:
                    stall.progress()
                    if chunk.WhichOneof("kind") == "header":
                        header = chunk.header
                    else:
                        parts.append(chunk.data)
        except grpc.RpcError as err:
            if stall is not None and stall.fired:
                raise ServerError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"gradients of {request.model!r} received nothing for "
                    f"{self.timeout_s:g} s (the client's timeout_s); retry, or raise it",
                ) from None
            _raise_from(err)
        return header, b"".join(parts)


def _input_tensor(name: str, value):
    """Torch tensors in their dtype; anything else as ``infer`` sends it (Python floats as
    float32; Python ints stay int64 for class indices)."""
    from paramserve.protos import registry_pb2 as pb

    from . import wire
    from .client import _as_array
    from .client_files import is_torch_tensor

    if is_torch_tensor(value):
        from . import convert

        return convert.tensor_to_proto(name, value.detach().cpu().contiguous())
    array = _as_array(value)
    return pb.Tensor(
        name=name, dtype=wire.safetensors_name(array), shape=list(array.shape), data=array.tobytes()
    )


def _gradients_result(header, data: bytes, torch, stats_only: bool) -> GradientsResult:
    from paramserve.registry.errors import DataLoss

    from . import wire

    if header is None:
        raise DataLoss("the gradients stream ended without its header; retry")
    grads, stats, at = {}, {}, 0
    for g in header.gradients:
        stats[g.name] = GradientStat(
            tuple(g.shape), g.dtype, g.norm, g.min, g.max, g.mean, tuple(g.tied_with)
        )
        if stats_only:
            continue
        carried = wire.bits(g.dtype, data[at : at + g.size_bytes], g.shape, f"gradient {g.name!r}")
        at += g.size_bytes
        carried = carried.copy()
        if torch is None:
            grads[g.name] = wire.to_numpy(g.dtype, carried)
        else:
            value = torch.from_numpy(carried)
            grads[g.name] = value.view(torch.bfloat16) if g.dtype == "BF16" else value
    if at != len(data):
        raise DataLoss(f"the gradients stream held {len(data)} bytes, its header {at}; retry")
    return GradientsResult(
        header.loss if header.HasField("loss") else None, grads, stats, header.version
    )


def _wire_tensor(name: str, value):
    """A torch tensor in its own dtype, or anything ``np.asarray`` takes, as a ``Tensor``."""
    from paramserve.protos import registry_pb2 as pb

    from . import convert, wire
    from .client_files import is_torch_tensor

    if is_torch_tensor(value):
        return convert.tensor_to_proto(name, value.detach().cpu().contiguous())
    import numpy as np

    array = np.ascontiguousarray(np.asarray(value))
    return pb.Tensor(
        name=name, dtype=wire.safetensors_name(array), shape=list(array.shape), data=array.tobytes()
    )


class UpdateClient:
    """Pushed updates (``ApplyUpdate``, ``Train``); ``LearningClient`` inherits it."""

    registry: Any  # Client's Registry stub and its call wrapper (annotations only)
    _call: Callable[..., Any]

    def apply_update(
        self,
        name: str,
        grads,
        optimizer: str | None = None,
        ref: str | int | None = None,
        deltas: bool = False,
        note: str = "",
        parent: int | None = None,
    ):
        """Apply gradients by parameter name (``{"2.weight": g, ...}``: torch tensors or
        arrays) with ``optimizer`` (``"sgd(lr=0.03, momentum=0.9)"``, ``"adam(lr=1e-3)"``),
        or add them as they are with ``deltas=True`` → the new version. ``ref`` (default: the
        latest; an alias moves with the update) must still name the version the gradients
        came from (``parent``: that version's number; default: what ``ref`` names when the
        request arrives): else ``Aborted`` ("rebase onto vN"), and nothing is applied."""
        from paramserve.protos import registry_pb2 as pb

        from . import convert

        request = pb.ApplyUpdateRequest(
            model=name,
            ref="" if ref is None else str(ref),
            values=[_wire_tensor(k, v) for k, v in grads.items()],
            deltas=deltas,
            optimizer=optimizer or "",
            note=note,
            parent=parent or 0,
        )
        return convert.version_from_proto(self._call(self.registry.ApplyUpdate, request))

    def train(
        self,
        name: str,
        inputs,
        targets=None,
        loss: str = "mse",
        optimizer: str = "sgd(lr=0.01)",
        ref: str | int | None = None,
        params: list[str] | None = None,
        note: str = "",
    ):
        """One training step on the server: the ``loss`` of ``inputs`` against ``targets``,
        its gradients and an ``optimizer`` step → ``(new version, loss before the step)``.
        ``inputs``: one tensor/array, or a dict by input name."""
        from paramserve.protos import registry_pb2 as pb

        from . import convert

        named = inputs if isinstance(inputs, dict) else {"input": inputs}
        request = pb.TrainRequest(
            model=name,
            ref="" if ref is None else str(ref),
            inputs=[_wire_tensor(k, v) for k, v in named.items()],
            loss=loss,
            optimizer=optimizer,
            params=list(params or ()),
            note=note,
        )
        if targets is not None:
            request.target.CopyFrom(_wire_tensor("target", targets))
        reply = self._call(self.registry.Train, request)
        return convert.version_from_proto(reply.version), reply.loss


class HistoryClient:
    """Diffs and history (``Diff``, ``ListVersions``); ``LearningClient`` inherits it."""

    def diff(
        self,
        name: str,
        ref_a: str | int | None,
        ref_b: str | int | None,
        name_b: str | None = None,
        all_tensors: bool = False,
    ) -> dict[str, Any]:
        """Per tensor of ``name@ref_a`` vs ``name_b@ref_b`` (default: the same model): status
        (same, changed, only_a, only_b, shape), changed_elements, max_abs_diff, l2_diff,
        relative_change; changed tensors only unless ``all_tensors``."""
        from paramserve.protos import registry_pb2 as pb

        from . import convert

        msg = self._call(  # type: ignore[attr-defined]
            self.registry.Diff,  # type: ignore[attr-defined]
            pb.DiffRequest(
                model=name,
                ref_a="" if ref_a is None else str(ref_a),
                ref_b="" if ref_b is None else str(ref_b),
                model_b=name_b or "",
                all=all_tensors,
            ),
        )
        return {
            "a": convert.version_from_proto(msg.a),
            "b": convert.version_from_proto(msg.b),
            "identical": msg.identical,
            "tensors": msg.tensors,
            "changed": msg.changed,
            "diffs": [
                {
                    "name": d.name,
                    "status": d.status,
                    "shape": list(d.shape),
                    "dtype": d.dtype,
                    "elements": d.elements,
                    "changed_elements": d.changed_elements,
                    "max_abs_diff": d.max_abs_diff,
                    "l2_diff": d.l2_diff,
                    "relative_change": d.relative_change,
                }
                for d in msg.diffs
            ],
        }

    def log(self, name: str) -> list:
        """The model's versions newest first (``list_versions`` reversed), each with its
        origin, parent, author, note, provenance and aliases."""
        versions = self.list_versions(name)  # type: ignore[attr-defined]
        return sorted(versions, key=lambda v: v.number, reverse=True)


class LearningClient(GradientsClient, UpdateClient, HistoryClient):
    """Gradients, pushed updates, diffs and history; ``Client`` inherits it."""
