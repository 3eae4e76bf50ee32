"""gRPC status codes ⇄ paramserve's error classes: the part both sides need, without torch.

The server maps each class to one code (``errors.STATUS_OF`` starts from ``CORE_STATUS``); the
client turns a code back into the class (``ERROR_OF``), so a caller catches ``NotFound``
whether it runs the core in-process or talks to a server.
"""

from __future__ import annotations

import grpc

from paramserve.registry.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ParamserveError,
    ResourceExhausted,
    Unavailable,
)


class DeadlineExceeded(ParamserveError):
    """The caller's deadline passed while the request waited; it never ran."""


CORE_STATUS: dict[type[ParamserveError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Aborted: grpc.StatusCode.ABORTED,
}
# The client's way back: a status code → the class (UNAVAILABLE, the core's Unavailable
# included, stays a ServerError: it is also what an unreachable server gives).
ERROR_OF: dict[grpc.StatusCode, type[ParamserveError]] = {
    code: cls for cls, code in CORE_STATUS.items() if cls is not Unavailable
}


def code_of(error: BaseException) -> grpc.StatusCode | None:
    """The code ``error``'s class (or a base of it) maps to; None for foreign errors. The
    server's ``errors.status_of`` adds torch's and the OS's; this one needs neither."""
    for cls in type(error).__mro__:
        if cls in CORE_STATUS:
            return CORE_STATUS[cls]
    return None
