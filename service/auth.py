"""Optional bearer-token auth: ``authorization: Bearer <token>`` metadata on every RPC.

The token file holds one token per line; ``<token> read`` marks a read-only token, and a last
word ``name=NAME`` names it (default ``token-LINE``): the name is recorded as the author of
the versions the token makes (``current_author()`` while its call runs). Mutating
Registry RPCs need a full token; with ``open_reads`` the read-only RPCs (inference, listings,
downloads) need none. Health and reflection stay open so probes and tools work. A missing or
unknown token is UNAUTHENTICATED; a read-only token on a mutating RPC is PERMISSION_DENIED.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from paramserve.registry.errors import InvalidArgument

ALWAYS_OPEN = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
READ_ONLY_METHODS = {
    "/inference.GRPCInferenceService/" + m
    for m in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    )
} | {
    "/paramserve.v1.Registry/" + m
    for m in (
        "ListArchitectures",
        "GetModel",
        "ListModels",
        "DownloadVersion",
        "ListVersions",
        "ListParameters",
        "GetTensor",
        "DescribeModule",
        "Gradients",
        "Diff",
    )
}
# The name of the token of the call being served ("" without tokens): set by the interceptor's
# wrapper around the handler, read by the servicer (a contextvar: each call runs in its task).
_AUTHOR: contextvars.ContextVar[str] = contextvars.ContextVar("paramserve_author", default="")
MAX_TOKEN_NAME_CHARS = 200


def current_author() -> str:
    """The token name of the call being served; "" when the server checks no tokens."""
    return _AUTHOR.get()


@dataclass(frozen=True)
class Tokens:
    full: tuple[str, ...]
    read_only: tuple[str, ...]
    names: dict[str, str] = field(default_factory=dict)  # token → its name

    @classmethod
    def from_file(cls, path: str | Path) -> Tokens:
        """Read the token file; refuse it (naming the file and line) when a token is not
        printable ASCII, the only thing gRPC metadata can carry."""
        full: list[str] = []
        read_only: list[str] = []
        names: dict[str, str] = {}
        try:
            lines = Path(path).read_bytes().splitlines()
        except OSError as err:
            raise InvalidArgument(f"cannot read --auth-token-file {path}: {err.strerror}") from err
        for number, raw in enumerate(lines, 1):
            parts = raw.split()
            if not parts or parts[0].startswith(b"#"):
                continue
            if not all(_printable_ascii(part) for part in parts):
                raise InvalidArgument(
                    f"--auth-token-file {path}, line {number}: a token must be "
                    "printable ASCII (gRPC metadata carries nothing else); "
                    "write it with letters, digits and punctuation only"
                )
            words = [part.decode("ascii") for part in parts]
            name = f"token-{number}"
            if len(words) > 1 and words[-1].startswith("name="):
                name = words.pop()[len("name=") :]
                if not 0 < len(name) <= MAX_TOKEN_NAME_CHARS:
                    raise InvalidArgument(
                        f"{path}:{number}: a token's name= is 1..{MAX_TOKEN_NAME_CHARS} characters"
                    )
            if len(words) > 2 or (len(words) == 2 and words[1] != "read"):
                raise InvalidArgument(
                    f"{path}:{number}: write TOKEN or 'TOKEN read', optionally then name=NAME"
                )
            (read_only if len(words) == 2 else full).append(words[0])
            names[words[0]] = name
        if not full and not read_only:
            raise InvalidArgument(f"--auth-token-file {path} holds no token")
        return cls(tuple(full), tuple(read_only), names)

    def name_of(self, token: str) -> str:
        """The name of a known token (call after ``role`` accepted it)."""
        return self.names.get(token, "")

    def role(self, token: str) -> str | None:
        """'full', 'read' or None, comparing in constant time."""
        found = None
        given = token.encode("utf-8", "surrogateescape")  # bytes: any text compares, no raise
        for candidate in self.full:
            if hmac.compare_digest(candidate.encode("ascii"), given):
                found = "full"
        for candidate in self.read_only:
            if hmac.compare_digest(candidate.encode("ascii"), given) and found is None:
                found = "read"
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens, open_reads: bool):
        self.tokens = tokens
        self.open_reads = open_reads

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(ALWAYS_OPEN):
            return handler
        reading = method in READ_ONLY_METHODS
        if reading and self.open_reads:
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        role = self.tokens.role(token)
        if role == "full" or (role == "read" and reading):
            return _as_author(handler, self.tokens.name_of(token))
        if role == "read":
            return _refusing(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} changes the registry; this token is "
                "read-only: use a full token",
            )
        return _refusing(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or unknown token: send 'authorization: Bearer <token>' "
            "metadata (paramserve --token / PARAMSERVE_TOKEN)",
        )


def _printable_ascii(word: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in word)


def _bearer(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return ""


def _as_author(handler, name: str):
    """The handler, run with ``current_author()`` answering ``name``."""

    def unary(behaviour):
        async def run(request, context):
            _AUTHOR.set(name)  # the call's own task context: gone with the call
            return await behaviour(request, context)

        return run

    def streaming(behaviour):
        if not inspect.isasyncgenfunction(behaviour):  # it writes with context.write
            return unary(behaviour)  # (errors.py's guard): awaited, not iterated

        async def run(request, context):
            _AUTHOR.set(name)
            async for item in behaviour(request, context):
                yield item

        return run

    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    return handler._replace(stream_stream=streaming(handler.stream_stream))


def _refusing(handler, code: grpc.StatusCode, message: str):
    async def refuse_unary(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    if handler.unary_unary:
        return handler._replace(unary_unary=refuse_unary)
    if handler.stream_unary:
        return handler._replace(stream_unary=refuse_unary)
    if handler.unary_stream:
        return handler._replace(unary_stream=refuse_stream)
    return handler._replace(stream_stream=refuse_stream)
