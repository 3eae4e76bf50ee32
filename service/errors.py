"""Core errors → gRPC status codes, in one table, applied to every RPC by one wrapper.

Unknown exceptions become INTERNAL with a generic message (the traceback goes to the log), so a
bug never leaks internals to a client. The same wrapper records request counts and latencies
for the metrics.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from paramserve.registry.errors import (AlreadyExists, DataLoss, FailedPrecondition,
                                        InvalidArgument, NotFound, ParamserveError,
                                        ResourceExhausted)

from .batcher import DeadlineExceeded

log = logging.getLogger("paramserve")

STATUS_OF: dict[type[ParamserveError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
ERROR_OF: dict[grpc.StatusCode, type[ParamserveError]] = {v: k for k, v in STATUS_OF.items()}


def _status_and_message(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """A core error keeps its message; anything else is logged and answered generically."""
    code = status_of(err)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", method, exc_info=err)
        return code, f"internal error in {method}; the server log has the details"
    return code, str(err)


def status_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def guard(servicer, metrics=None):
    """Wrap each RPC method of ``servicer`` once, before it is added to the server: status
    codes for exceptions, and request metrics. Wrapping at registration instead of in a
    ``ServerInterceptor`` keeps the per-RPC cost to one extra frame; an aio interceptor adds
    a coroutine, a continuation and a handler copy to every call."""
    for method in _rpc_methods(servicer):
        behavior = getattr(servicer, method)
        wrap = _wrap_stream if inspect.isasyncgenfunction(behavior) else _wrap_unary
        setattr(servicer, method, wrap(behavior, method, metrics))
    return servicer


def _rpc_methods(servicer) -> list[str]:
    """The RPCs the generated base class declares (and ``servicer`` implements)."""
    base = next(c for c in type(servicer).__mro__ if c.__name__.endswith("Servicer")
                and c.__module__.endswith("_pb2_grpc"))
    return [name for name in vars(base) if not name.startswith("_")]


class _Call:
    """One RPC's outcome: the status an exception maps to, and its metrics when it ends."""

    def __init__(self, method: str, metrics):
        self.method, self.metrics = method, metrics
        self.code, self.start = grpc.StatusCode.OK, time.perf_counter()

    async def fail(self, err: Exception, context) -> None:
        if isinstance(err, grpc.aio.AbortError):  # the servicer chose the status itself
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise err
        self.code, message = _status_and_message(err, self.method)
        await context.abort(self.code, message)

    def end(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_request(self.method, self.code.name,
                                         time.perf_counter() - self.start)


def _wrap_unary(behavior, method, metrics):
    async def wrapped(request, context):
        call = _Call(method, metrics)
        try:
            return await behavior(request, context)
        except Exception as err:
            await call.fail(err, context)
        finally:
            call.end()
    return wrapped


def _wrap_stream(behavior, method, metrics):
    async def wrapped(request, context):
        call = _Call(method, metrics)
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as err:
            await call.fail(err, context)
        finally:
            call.end()
    return wrapped
