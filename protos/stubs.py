"""gRPC stubs, servicer bases and ``add_*_to_server`` functions made from service descriptors:
what grpc_tools' ``_pb2_grpc`` gencode holds, without tying the package to the grpcio-tools
version of a build machine (its gencode since 1.63 refuses an older grpcio at import)."""

from __future__ import annotations

import inspect
import types

import grpc

_KINDS = {  # (client streams, server streams) → the channel's and the handler's factory names
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def services_module(module_name: str, file_proto, messages: types.ModuleType) -> types.ModuleType:
    """``<name>Stub``, ``<name>Servicer`` and ``add_<name>Servicer_to_server`` for each service
    of ``file_proto`` (a FileDescriptorProto; it says which side of each method streams)."""
    module = types.ModuleType(module_name, f"gRPC services of {file_proto.name}.")
    for service in file_proto.service:
        full_name = f"{file_proto.package}.{service.name}" if file_proto.package else service.name
        methods = {m.name: _Method(full_name, m, messages) for m in service.method}
        servicer = _servicer_base(service.name, methods, module_name)
        setattr(module, f"{service.name}Stub", _stub_class(service.name, methods, module_name))
        setattr(module, f"{service.name}Servicer", servicer)
        setattr(module, f"add_{service.name}Servicer_to_server", _adder(full_name, methods))
    return module


class _Method:
    def __init__(self, service: str, proto, messages: types.ModuleType):
        self.name = proto.name
        self.path = f"/{service}/{proto.name}"
        self.request = _message_class(messages, proto.input_type)
        self.response = _message_class(messages, proto.output_type)
        self.channel_factory, self.handler_factory = _KINDS[
            (proto.client_streaming, proto.server_streaming)
        ]


def _message_class(messages: types.ModuleType, type_name: str):
    """``.package.Outer.Inner`` → the class (every type the contract names is in its file)."""
    package = messages.DESCRIPTOR.package
    parts = type_name.lstrip(".")[len(package) + 1 if package else 0 :].split(".")
    cls = getattr(messages, parts[0])
    for part in parts[1:]:
        cls = getattr(cls, part)
    return cls


def _stub_class(service: str, methods: dict[str, _Method], module_name: str) -> type:
    def __init__(self, channel):
        for method in methods.values():
            factory = getattr(channel, method.channel_factory)
            extra = {"_registered_method": True} if _takes_registered(factory) else {}
            setattr(
                self,
                method.name,
                factory(
                    method.path,
                    request_serializer=method.request.SerializeToString,
                    response_deserializer=method.response.FromString,
                    **extra,
                ),
            )

    return type(
        f"{service}Stub",
        (),
        {"__init__": __init__, "__module__": module_name, "__doc__": f"Client stub of {service}."},
    )


def _servicer_base(service: str, methods: dict[str, _Method], module_name: str) -> type:
    def unimplemented(name):
        def method(self, request, context):
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details(f"{name} is not implemented")
            raise NotImplementedError(f"{name} is not implemented")

        method.__name__ = name
        return method

    namespace = {name: unimplemented(name) for name in methods}
    namespace.update(__module__=module_name, __doc__=f"Base of {service}'s servicer.")
    return type(f"{service}Servicer", (), namespace)


def _adder(service: str, methods: dict[str, _Method]):
    def add_to_server(servicer, server) -> None:
        handlers = {
            name: method.handler_factory(
                getattr(servicer, name),
                request_deserializer=method.request.FromString,
                response_serializer=method.response.SerializeToString,
            )
            for name, method in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.63: no lookup
            server.add_registered_method_handlers(service, handlers)

    return add_to_server


def _takes_registered(factory) -> bool:
    try:
        return "_registered_method" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
