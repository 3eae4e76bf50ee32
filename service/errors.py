"""Core errors → gRPC status codes, in one table, applied to every RPC by one interceptor.

Unknown exceptions become INTERNAL with a generic message (the traceback goes to the log), so a
bug never leaks internals to a client. The interceptor also records request counts and
latencies for the metrics.
"""

from __future__ import annotations

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


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and feeds the request metrics, for every RPC kind."""

    def __init__(self, metrics=None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))

    def _wrap_unary(self, behavior, method):
        async def wrapped(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise  # the servicer chose the status itself
            except Exception as err:
                code, message = _status_and_message(err, method)
                await context.abort(code, message)
            finally:
                self._record(method, code, context, start)
        return wrapped

    def _wrap_stream(self, behavior, method):
        async def wrapped(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                code, message = _status_and_message(err, method)
                await context.abort(code, message)
            finally:
                self._record(method, code, context, start)
        return wrapped

    def _record(self, method, code, context, start):
        if self.metrics is not None:
            if code == grpc.StatusCode.OK and context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()
            self.metrics.observe_request(method, code.name, time.perf_counter() - start)
