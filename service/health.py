"""The standard gRPC health service (grpc.health.v1) on paramserve's own messages (protos/
health.proto says why not grpcio-health-checking's): one status per service name, Check and
Watch, and a graceful shutdown that turns every name NOT_SERVING for good."""

from __future__ import annotations

import asyncio

import grpc

from paramserve.protos import health_pb2, health_pb2_grpc

Status = health_pb2.HealthCheckResponse
# Watch streams last as long as the client keeps them: a bound on how many are open at once.
MAX_WATCHERS = 64


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, max_watchers: int = MAX_WATCHERS):
        self._status: dict[str, int] = {}
        self._watchers: set[asyncio.Queue] = set()
        self._max_watchers = max_watchers
        self._stopping = False

    async def set(self, service: str, status: int) -> None:
        """Record ``service``'s status; ignored once a graceful shutdown began."""
        if self._stopping:
            return
        self._set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Every known service NOT_SERVING, and nothing changes it back."""
        for service in list(self._status):
            self._set(service, Status.NOT_SERVING)
        self._stopping = True
        self._wake()  # each Watch sends the last status and ends

    def _wake(self) -> None:
        for wakeups in self._watchers:
            wakeups.put_nowait(True)

    def _set(self, service: str, status: int) -> None:
        self._status[service] = status
        self._wake()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no health status for service {request.service[:200]!r}"
            )
        return Status(status=status)

    async def Watch(self, request, context):
        if len(self._watchers) >= self._max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._max_watchers} health watches are open; use Check",
            )
        wakeups: asyncio.Queue = asyncio.Queue()  # one item per change of any service
        self._watchers.add(wakeups)
        try:
            last = None
            while True:
                status = self._status.get(request.service, Status.SERVICE_UNKNOWN)
                if status != last:
                    yield Status(status=status)
                    last = status
                if self._stopping:
                    return
                await wakeups.get()
        finally:
            self._watchers.discard(wakeups)
