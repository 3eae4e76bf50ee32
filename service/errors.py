"""Errors → gRPC status codes, in one table, applied to every RPC by one wrapper.

Unknown exceptions become INTERNAL with a generic message (the traceback goes to the log), so a
bug never leaks internals to a client. Every message a client gets is one line of at most
``EdgeLimits.max_status_chars`` characters, whatever input it quotes. The same wrapper records
each RPC's status and latency for the metrics, and enforces the edge's limits for paramserve's
own services: RPCs in flight (``--max-concurrent-rpcs``, per method for streams) and how long a
stream may wait on a silent client (``--stream-idle-timeout-s``). Health and reflection are not
wrapped, so probes are answered whatever the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import torch

from paramserve.registry.errors import ParamserveError, ResourceExhausted

from .loaded import ModelUnavailable
from .status import CORE_STATUS, ERROR_OF, DeadlineExceeded  # noqa: F401  (ERROR_OF: old home)

log = logging.getLogger("paramserve")

_OOM = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)
_CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory")

STATUS_OF: dict[type[BaseException], grpc.StatusCode] = {
    **{cls: code for cls, code in CORE_STATUS.items()},  # (a copy mypy types as the wider dict)
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    # Not ours, but the caller's to fix: input nested past Python's stack, a device too small.
    RecursionError: grpc.StatusCode.INVALID_ARGUMENT,
    **{cls: grpc.StatusCode.RESOURCE_EXHAUSTED for cls in _OOM},
}
# OSErrors that are the machine's state, not a bug: said to the client as such.
OS_ERRORS: dict[int, str] = {
    errno.ENOSPC: "the server's disk is full",
    errno.EDQUOT: "the server's disk quota is used up",
    errno.EMFILE: "the server has too many files open",
    errno.ENFILE: "the server's machine has too many files open",
}
MAX_STATUS_CHARS = 1000


@dataclass(frozen=True)
class EdgeLimits:
    """What the wrapper bounds. ``per_method``: method → (most in flight, the flag naming it)."""

    max_concurrent_rpcs: int = 0  # 0: no limit
    per_method: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    stream_idle_timeout_s: float = 30.0  # 0: wait forever
    max_status_chars: int = MAX_STATUS_CHARS


class Edge:
    """The state the wrapped RPCs of every servicer share: how many are in flight."""

    def __init__(self, limits: EdgeLimits = EdgeLimits(), metrics=None):
        self.limits, self.metrics = limits, metrics
        self.in_flight = 0
        self.in_flight_of: dict[str, int] = {}

    def enter(self, method: str) -> None:
        """Count one RPC in, or refuse it with ResourceExhausted (before it does anything)."""
        limit = self.limits.max_concurrent_rpcs
        if limit and self.in_flight >= limit:
            raise ResourceExhausted(
                f"the server is serving {self.in_flight} requests, its "
                f"limit (--max-concurrent-rpcs {limit}); retry later"
            )
        method_limit, flag = self.limits.per_method.get(method, (0, ""))
        count = self.in_flight_of.get(method, 0)
        if method_limit and count >= method_limit:
            raise ResourceExhausted(
                f"{count} {method} streams are open, the server's limit "
                f"({flag} {method_limit}); retry later"
            )
        self.in_flight += 1
        self.in_flight_of[method] = count + 1

    def leave(self, method: str) -> None:
        self.in_flight -= 1
        self.in_flight_of[method] -= 1


def out_of_memory(error: BaseException) -> bool:
    """Torch's out-of-memory classes, and the CPU allocator's failure: a plain RuntimeError
    that only its message tells apart."""
    return isinstance(error, _OOM) or (
        type(error) is RuntimeError and any(m in str(error) for m in _CPU_OOM_MESSAGES)
    )


def status_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    if out_of_memory(error):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, OSError) and error.errno in OS_ERRORS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


def _status_and_message(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """A core error keeps its message; anything else is logged and answered generically."""
    code = status_of(err)
    if isinstance(err, ParamserveError):  # the core's own words, INTERNAL ones included:
        return code, str(err)  # a model that fails on an input it accepts says so, by name
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", method, exc_info=err)
        return code, f"internal error in {method}; the server log has the details"
    log.warning("%s in %s: %s", type(err).__name__, method, one_line(str(err)))
    if isinstance(err, RecursionError):
        return code, f"{method}: the input is nested too deeply to read; flatten it"
    if out_of_memory(err):
        return code, (
            f"{method} ran out of memory on the device: send a smaller request, or "
            "serve the model on a device with more free memory"
        )
    # status_of's last non-INTERNAL case: an OSError whose errno is in OS_ERRORS
    assert isinstance(err, OSError) and err.errno is not None
    return code, (
        f"{method} failed: {OS_ERRORS[err.errno]} ({errno.errorcode[err.errno]}); "
        "nothing was changed: the operator must free space or descriptors"
    )


def client_message(err: Exception, method: str, max_chars: int = MAX_STATUS_CHARS) -> str:
    """What a client is told of ``err`` where it gets no status of its own (a message of a
    ModelStreamInfer stream): the status message, one line of at most ``max_chars``."""
    return one_line(_status_and_message(err, method)[1], max_chars)


_CONTROL = {c: " " for c in [*range(32), 127]}


def one_line(text: str, max_chars: int = MAX_STATUS_CHARS) -> str:
    """``text`` as one line of at most ``max_chars`` characters: lines joined with " | ",
    control characters blanked, and a marker saying how much was cut."""
    head = text[:max_chars]  # cut before the work: a 12 MB message costs no more than 1 kB
    line = " | ".join(part.strip() for part in head.splitlines() if part.strip())
    line = line.translate(_CONTROL)
    if len(text) <= max_chars and len(line) <= max_chars:
        return line
    marker = f" … [cut: {len(text)} characters in all]"
    return line[: max(0, max_chars - len(marker))] + marker


def guard(servicer, metrics=None, edge: Edge | None = None):
    """Wrap each RPC method of ``servicer`` once, before it is added to the server: status
    codes for exceptions, request metrics and the ``edge``'s limits. Wrapping at registration
    instead of in a ``ServerInterceptor`` keeps the per-RPC cost to one extra frame; an aio
    interceptor adds a coroutine, a continuation and a handler copy to every call."""
    edge = edge or Edge(metrics=metrics)
    metrics = metrics if metrics is not None else edge.metrics
    for method in _rpc_methods(servicer):
        behavior = getattr(servicer, method)
        wrap = _wrap_stream if inspect.isasyncgenfunction(behavior) else _wrap_unary
        setattr(servicer, method, wrap(behavior, method, metrics, edge))
    return servicer


def _rpc_methods(servicer) -> list[str]:
    """The RPCs the generated base class declares (and ``servicer`` implements)."""
    base = next(
        c
        for c in type(servicer).__mro__
        if c.__name__.endswith("Servicer") and c.__module__.endswith("_pb2_grpc")
    )
    return [name for name in vars(base) if not name.startswith("_")]


DEADLINE_SLACK_S = 0.05


class _ClientGone(Exception):
    """A write failed because the call is over on the client's side: nothing to answer."""


class _Call:
    """One RPC's outcome: the status an exception maps to, and its metrics when it ends."""

    def __init__(self, method: str, metrics, edge: Edge):
        self.method, self.metrics, self.edge = method, metrics, edge
        self.code, self.start = grpc.StatusCode.OK, time.perf_counter()
        self.entered = False

    def enter(self) -> None:
        self.edge.enter(self.method)
        self.entered = True

    async def fail(self, err: Exception, context) -> None:
        if isinstance(err, grpc.aio.AbortError):  # the servicer chose the status itself
            self.code = context.code() or grpc.StatusCode.UNKNOWN
            raise err
        if isinstance(err, _ClientGone):
            self.code = grpc.StatusCode.CANCELLED
            return
        self.code, message = _status_and_message(err, self.method)
        try:  # bounded: behind data a client does not read, the status would wait forever
            async with asyncio.timeout(self.edge.limits.stream_idle_timeout_s or None):
                await context.abort(self.code, one_line(message, self.edge.limits.max_status_chars))
        except TimeoutError:
            pass  # the call is over for us; gRPC drops it when the client goes

    def cancelled(self, context) -> None:
        """The call was cancelled under the handler: by the client, or by its deadline. The
        client's own timer may end the call a moment before the server's copy of the deadline
        runs out (its cancel arrives first): within DEADLINE_SLACK_S of it counts as the
        deadline."""
        remaining = context.time_remaining()
        self.code = (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if remaining is not None and remaining <= DEADLINE_SLACK_S
            else grpc.StatusCode.CANCELLED
        )

    def end(self) -> None:
        if self.entered:
            self.edge.leave(self.method)
        if self.metrics is not None:
            self.metrics.observe_request(
                self.method, self.code.name, time.perf_counter() - self.start
            )


def _wrap_unary(behavior, method, metrics, edge):
    async def wrapped(request, context):
        call = _Call(method, metrics, edge)
        try:
            call.enter()
            return await behavior(request, context)
        except asyncio.CancelledError:  # no Exception: it would be recorded as OK
            call.cancelled(context)
            raise
        except Exception as err:
            await call.fail(err, context)
        finally:
            call.end()

    return wrapped


def _wrap_stream(behavior, method, metrics, edge):
    """A server or bidirectional stream (an async generator, given the request or, for a bidi
    method, the request iterator): written here with ``context.write``, each write bounded by
    the idle timeout, so a client that stops reading frees the call (and what it holds: an
    open blob, requests in flight) in time. A bidi call counts as one RPC, whatever it
    carries; reading its requests, and the idle limit on them, is the method's."""
    idle_s = edge.limits.stream_idle_timeout_s

    async def wrapped(request, context):
        call = _Call(method, metrics, edge)
        try:
            call.enter()
            async with contextlib.aclosing(behavior(request, context)) as items:
                async for item in items:
                    await _write(context, item, idle_s, method)
        except asyncio.CancelledError:
            call.cancelled(context)
            raise
        except Exception as err:
            await call.fail(err, context)
        finally:
            call.end()

    return wrapped


async def _write(context, message, idle_s: float, method: str) -> None:
    try:
        async with asyncio.timeout(idle_s or None):
            await context.write(message)
    except TimeoutError:
        raise DeadlineExceeded(
            f"{method}: the client read nothing for {idle_s:g} s "
            "(--stream-idle-timeout-s); the stream is closed"
        ) from None
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as err:  # grpc's ExecuteBatchError: the call ended under the write
        raise _ClientGone(method) from err
