"""``--access-log``: one info line per RPC, written when it ends::

    rpc ModelInfer model=mlp status=OK ms=1.84

Logger ``paramserve.access``; with ``--log-format json`` the fields (method, model, status,
ms) are keys of the line. The model is read from the request (``model_name``, ``model`` or
``name``; a stream's first message), ``-`` when it has none. An interceptor, so every service
is covered and nothing is added to the hot path when the flag is off.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

log = logging.getLogger("paramserve.access")
MODEL_FIELDS = ("model_name", "model", "name")


def model_of(message) -> str:
    """The model a request names, looking one level into set sub-messages (an upload's
    header)."""
    if message is None:
        return "-"
    fields = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
    for name in MODEL_FIELDS:
        if name in fields and isinstance(getattr(message, name), str) and getattr(message, name):
            return getattr(message, name)
    for descriptor, value in message.ListFields() if hasattr(message, "ListFields") else ():
        if (
            descriptor.message_type is not None
            and not isinstance(value, (list, tuple))
            and hasattr(value, "DESCRIPTOR")
            and descriptor.label != descriptor.LABEL_REPEATED
        ):
            found = model_of(value)
            if found != "-":
                return found
    return "-"


def access_line(method: str, model: str, status: str, ms: float) -> str:
    return f"rpc {method} model={model} status={status} ms={ms:.2f}"


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary(handler.unary_unary, method, False))
        if handler.stream_unary:
            return handler._replace(stream_unary=_unary(handler.stream_unary, method, True))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream(handler.unary_stream, method, False))
        return handler._replace(stream_stream=_stream(handler.stream_stream, method, True))


class _Call:
    """One RPC's record: when it began and which model it named."""

    def __init__(self, method: str):
        self.method, self.model, self.start = method, "-", time.perf_counter()

    def requests(self, request, streaming: bool):
        if not streaming:
            self.model = model_of(request)
            return request
        return self._first_of(request)

    async def _first_of(self, iterator):
        async for message in iterator:
            if self.model == "-":
                self.model = model_of(message)
            yield message

    def done(self, context, error: BaseException | None) -> None:
        status = _status(context, error)
        ms = (time.perf_counter() - self.start) * 1e3
        log.info(
            access_line(self.method, self.model, status, ms),
            extra={
                "fields": {
                    "method": self.method,
                    "model": self.model,
                    "status": status,
                    "ms": round(ms, 3),
                }
            },
        )


def _status(context, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpcio versions give the raw number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    if error is None:
        return "OK"
    import asyncio

    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


def _unary(behavior, method: str, streaming: bool):
    async def logged(request, context):
        call = _Call(method)
        try:
            response = await behavior(call.requests(request, streaming), context)
        except BaseException as err:
            call.done(context, err)
            raise
        call.done(context, None)
        return response

    return logged


def _stream(behavior, method: str, streaming: bool):
    if not inspect.isasyncgenfunction(behavior):  # it writes with context.write (guard's
        return _unary(behavior, method, streaming)  # wrapper): awaited, not iterated

    async def logged(request, context):
        call = _Call(method)
        try:
            async for response in behavior(call.requests(request, streaming), context):
                yield response
        except BaseException as err:
            call.done(context, err)
            raise
        call.done(context, None)

    return logged
