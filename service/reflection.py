"""gRPC server reflection (v1 and v1alpha, one servicer) answered from paramserve's descriptor
set (protos/health.proto says why not grpcio-reflection): grpcurl and Postman list and call the
services without the .proto files, and see their comments."""

from __future__ import annotations

import grpc

from paramserve import protos
from paramserve.protos import reflection_v1_pb2, reflection_v1alpha_pb2

PACKAGES = {
    "grpc.reflection.v1": reflection_v1_pb2,
    "grpc.reflection.v1alpha": reflection_v1alpha_pb2,
}
SERVICE_NAMES = tuple(f"{package}.ServerReflection" for package in PACKAGES)
# A name a client sends is echoed in errors: this many characters of it at most.
MAX_ECHO_CHARS = 200


class ReflectionServicer:
    """Serves ``service_names`` and the files of the descriptor set. ``messages``: the
    generated module of the reflection package this instance is registered for."""

    def __init__(self, service_names: list[str], messages):
        self.service_names = sorted(service_names)
        self.files = protos.serialized_files()
        self.pb = messages

    async def ServerReflectionInfo(self, request_iterator, context):
        async for request in request_iterator:
            yield self.answer(request)

    def answer(self, request):
        pb = self.pb
        reply = pb.ServerReflectionResponse(
            valid_host=request.host[:MAX_ECHO_CHARS], original_request=_bounded(request, pb)
        )
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                reply.list_services_response.service.extend(
                    pb.ServiceResponse(name=name) for name in self.service_names
                )
            elif kind == "file_by_filename":
                reply.file_descriptor_response.CopyFrom(self._files(request.file_by_filename))
            elif kind == "file_containing_symbol":
                file = _file_containing(request.file_containing_symbol)
                reply.file_descriptor_response.CopyFrom(self._files(file.name))
            elif kind == "file_containing_extension":
                raise KeyError(request.file_containing_extension.containing_type)  # none here
            elif kind == "all_extension_numbers_of_type":
                message = protos.pool().FindMessageTypeByName(request.all_extension_numbers_of_type)
                reply.all_extension_numbers_response.base_type_name = message.full_name
            else:
                reply.error_response.CopyFrom(
                    pb.ErrorResponse(
                        error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        error_message="the request names nothing to reflect on",
                    )
                )
        except KeyError as err:
            name = str(err.args[0] if err.args else "")[:MAX_ECHO_CHARS]
            reply.error_response.CopyFrom(
                pb.ErrorResponse(
                    error_code=grpc.StatusCode.NOT_FOUND.value[0],
                    error_message=f"not found: {name}",
                )
            )
        return reply

    def _files(self, name: str):
        """The file and, after it, every file it imports (transitively), once each."""
        order, pending = [], [name]
        while pending:
            current = pending.pop()
            if current in order:
                continue
            if current not in self.files:
                raise KeyError(current)
            order.append(current)
            pending.extend(d.name for d in protos.pool().FindFileByName(current).dependencies)
        return self.pb.FileDescriptorResponse(file_descriptor_proto=[self.files[n] for n in order])


def _file_containing(symbol: str):
    """The file of a message, enum, field, service or method (``<package>.<service>.<method>``,
    which protobuf's pool does not look up itself)."""
    try:
        return protos.pool().FindFileContainingSymbol(symbol)
    except KeyError:
        service, _, method = symbol.rpartition(".")
        try:
            found = protos.pool().FindServiceByName(service)
        except KeyError:
            raise KeyError(symbol) from None
        if method not in found.methods_by_name:
            raise KeyError(symbol) from None
        return found.file


def _bounded(request, pb):
    """The request as echoed back: names cut to MAX_ECHO_CHARS."""
    echoed = pb.ServerReflectionRequest()
    echoed.CopyFrom(request)
    kind = request.WhichOneof("message_request")
    if kind in (
        "file_by_filename",
        "file_containing_symbol",
        "all_extension_numbers_of_type",
        "list_services",
    ):
        setattr(echoed, kind, getattr(request, kind)[:MAX_ECHO_CHARS])
    echoed.host = request.host[:MAX_ECHO_CHARS]
    return echoed
