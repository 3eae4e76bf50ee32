"""``paramserve health``: the container health check, run every few seconds, so it imports
grpc and nothing else (no numpy, no torch, no protobuf runtime: ~40 ms of CPU a run).

The standard health service is called with bytes: ``HealthCheckRequest(service="")`` is
empty on the wire, and ``HealthCheckResponse`` holds one field, ``status = 1`` (an enum, a
varint). A test holds both to grpc_health's own messages.
"""

from __future__ import annotations

import sys

EXIT_ERROR, EXIT_UNREACHABLE = 1, 3
CHECK = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1


def cmd_health(args) -> int:
    import grpc

    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    with channel(args) as open_channel:
        try:
            reply = open_channel.unary_unary(CHECK)(b"", timeout=args.wait_s, metadata=metadata)
        except grpc.RpcError as err:
            print(f"paramserve: unhealthy: {err.code().name}", file=sys.stderr)
            return EXIT_UNREACHABLE
    status = health_status(reply)
    print(STATUS_NAMES.get(status, str(status)))
    return 0 if status == SERVING else EXIT_ERROR


def channel(args):
    """A channel as ``Client`` opens one (TLS when a CA or a certificate is given)."""
    import grpc

    if not (args.tls_ca or args.client_tls_cert):
        return grpc.insecure_channel(args.server)
    files = [_read(path) for path in (args.tls_ca, args.client_tls_key, args.client_tls_cert)]
    return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(*files))


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


def health_status(message: bytes) -> int:
    """``HealthCheckResponse.status`` from its bytes (0, UNKNOWN, when absent); fields this
    version does not know are skipped, as protobuf does."""
    position, status = 0, 0
    while position < len(message):
        key, position = _varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(message, position)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, position = _varint(message, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"the health service answered a malformed message: {message!r}")
    return status


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data):
            raise ValueError(f"the health service answered a truncated message: {data!r}")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
