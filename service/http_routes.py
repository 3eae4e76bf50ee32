"""The KServe v2 REST routes (and Triton's REST extensions): each one call into InferenceCore,
JSON in and out (service/http_codec.py converts); http_server.py serves them.

Errors are ``{"error": "..."}`` with one HTTP status per gRPC code (``HTTP_STATUS``), so an
error class means the same on both ports: the gRPC table (errors.status_of, built on
status.CORE_STATUS) picks the code, this one the status. RESOURCE_EXHAUSTED is 429 (Google's
mapping of the codes, RFC 6585), except a body over the limit, 413. Requests are counted with
gRPC's in the ``--max-concurrent-rpcs`` limit (one ``Edge``) and in the request metrics as
``HTTP <verb> <route>``; with ``--auth-token-file`` a route needs the bearer token its gRPC
twin needs (auth.READ_ONLY_METHODS).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from paramserve.protos import inference_pb2 as pb
from paramserve.registry.errors import InvalidArgument
from paramserve.registry.limits import Limits

from . import http_codec
from .auth import READ_ONLY_METHODS, Tokens, _bearer
from .errors import Edge, _status_and_message, one_line

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}  # anything else (INTERNAL, DATA_LOSS, UNKNOWN): 500
SERVICE = "/inference.GRPCInferenceService/"
JSON = "application/json"


@dataclass(frozen=True)
class HttpSettings:
    max_body_bytes: int
    max_json_bytes: int  # the JSON part of an inference request: parsing costs ~10x its size
    keepalive_timeout_s: float
    body_timeout_s: float  # a body that takes longer to arrive is answered 408
    grace_s: float
    limits: Limits
    max_status_chars: int


def error_response(err: Exception, route: str, max_chars: int) -> tuple[web.Response, str]:
    """The JSON error for ``err`` and the gRPC code name it maps to (for the metrics)."""
    code, message = _status_and_message(err, route)
    return _error(HTTP_STATUS.get(code, 500), one_line(message, max_chars)), code.name


def _error(status: int, message: str, **headers: str) -> web.Response:
    body = http_codec.json.dumps({"error": message}).encode()
    return web.Response(status=status, body=body, content_type=JSON, headers=headers)


def _json(doc, status: int = 200) -> web.Response:
    return web.Response(status=status, body=http_codec.json.dumps(doc).encode(), content_type=JSON)


class HttpFrontEnd:
    """The routes, over one InferenceCore; ``edge`` is the gRPC services' (one count)."""

    def __init__(self, core, settings: HttpSettings, edge: Edge, metrics, tokens, open_reads):
        self.core, self.settings, self.edge, self.metrics = core, settings, edge, metrics
        self.tokens: Tokens | None = tokens
        self.open_reads = open_reads

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body_bytes, middlewares=[self._not_found]
        )
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        routes = [
            ("GET", "/v2/health/live", "ServerLive", self.live, "health live"),
            ("GET", "/v2/health/ready", "ServerReady", self.ready, "health ready"),
            ("GET", "/v2", "ServerMetadata", self.server_metadata, "server metadata"),
            ("GET", "/v2/models/stats", "ModelStatistics", self.statistics, "stats"),
            ("POST", "/v2/repository/index", "RepositoryIndex", self.index, "repository index"),
            ("POST", "/v2/repository/models/{name}/load", "RepositoryModelLoad", self.load, "load"),
            (
                "POST",
                "/v2/repository/models/{name}/unload",
                "RepositoryModelUnload",
                self.unload,
                "unload",
            ),
            (
                "GET",
                "/v2/systemsharedmemory/status",
                "SystemSharedMemoryStatus",
                self.shm_status,
                "shm status",
            ),  # noqa: E501
            (
                "GET",
                "/v2/systemsharedmemory/region/{region}/status",
                "SystemSharedMemoryStatus",
                self.shm_status,
                "shm status",
            ),  # noqa: E501
            (
                "POST",
                "/v2/systemsharedmemory/region/{region}/register",
                "SystemSharedMemoryRegister",
                self.shm_register,
                "shm register",
            ),  # noqa: E501
            (
                "POST",
                "/v2/systemsharedmemory/unregister",
                "SystemSharedMemoryUnregister",
                self.shm_unregister,
                "shm unregister",
            ),  # noqa: E501
            (
                "POST",
                "/v2/systemsharedmemory/region/{region}/unregister",
                "SystemSharedMemoryUnregister",
                self.shm_unregister,
                "shm unregister",
            ),  # noqa: E501
        ]
        for base in (model, versioned):
            routes += [
                ("GET", base, "ModelMetadata", self.model_metadata, "model metadata"),
                ("GET", base + "/ready", "ModelReady", self.model_ready, "model ready"),
                ("GET", base + "/config", "ModelConfig", self.model_config, "model config"),
                ("GET", base + "/stats", "ModelStatistics", self.statistics, "stats"),
                ("POST", base + "/infer", "ModelInfer", self.infer, "infer"),
            ]
        for verb, path, rpc, handler, label in routes:
            app.router.add_route(verb, path, self._wrap(handler, rpc, f"HTTP {verb} {label}"))
        return app

    # ---- what every route goes through -----------------------------------------------------
    def _wrap(self, handler, rpc: str, label: str):
        reading = SERVICE + rpc in READ_ONLY_METHODS
        counted = rpc not in ("ServerLive", "ServerReady")  # probes: answered whatever the load

        async def route(request: web.Request) -> web.StreamResponse:
            start, code, entered = time.perf_counter(), "OK", False
            try:
                refused = self._refused(request, rpc, reading)
                if refused is not None:
                    code = refused[1]
                    return refused[0]
                if counted:
                    self.edge.enter(label)
                    entered = True
                response = await handler(request)
                if response.status != 200:
                    code = "UNAVAILABLE"
                return response
            except web.HTTPRequestEntityTooLarge:
                code = "RESOURCE_EXHAUSTED"
                limit, size = self.settings.max_body_bytes, request.content_length
                told = size if size is not None and size > limit else None  # else: decoded
                return _error(413, http_codec.body_too_large(told, limit))
            except http_codec.JsonTooLarge as err:
                code = "RESOURCE_EXHAUSTED"
                return _error(413, one_line(str(err), self.settings.max_status_chars))
            except _BodyTimeout:
                code = "DEADLINE_EXCEEDED"
                return _error(
                    408,
                    f"the request body took over {self.settings.body_timeout_s:g} s to "
                    "arrive (--stream-idle-timeout-s); send it faster or in smaller requests",
                )
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away under the handler
                raise
            except web.HTTPException as err:  # aiohttp's own (a body it cannot decode): as JSON
                code = "INVALID_ARGUMENT" if err.status < 500 else "INTERNAL"
                return _error(err.status, one_line(err.text or err.reason, 200))
            except Exception as err:
                response, code = error_response(err, label, self.settings.max_status_chars)
                return response
            finally:
                if entered:
                    self.edge.leave(label)
                if self.metrics is not None:
                    self.metrics.observe_request(label, code, time.perf_counter() - start)

        return route

    def _refused(self, request: web.Request, rpc: str, reading: bool):
        """A 401/403 (and its code name) when the token file says no; None to go on."""
        if self.tokens is None or (reading and self.open_reads):
            return None
        role = self.tokens.role(
            _bearer([("authorization", request.headers.get("Authorization", ""))])
        )
        if role == "full" or (role == "read" and reading):
            return None
        if role == "read":
            message = f"{rpc} changes the server's state; this token is read-only: use a full token"
            return _error(403, message), "PERMISSION_DENIED"
        message = (
            "missing or unknown token: send the header 'Authorization: Bearer <token>' "
            "(a token of the server's --auth-token-file)"
        )
        return _error(401, message, **{"WWW-Authenticate": "Bearer"}), "UNAUTHENTICATED"

    @web.middleware
    async def _not_found(self, request: web.Request, handler):
        """aiohttp's own 404/405 (no route) as the JSON errors every route answers."""
        try:
            return await handler(request)
        except web.HTTPException as err:
            if err.status < 400:
                raise
            what = "no such endpoint" if err.status == 404 else f"{request.method} is not allowed"
            return _error(
                err.status, f"{what}: {request.method} {request.path[:200]} (KServe v2 REST)"
            )

    async def _body(self, request: web.Request) -> bytes:
        """The whole body, refused before it is read when its length says it is too large."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(limit, request.content_length)
        try:
            async with asyncio.timeout(self.settings.body_timeout_s or None):
                return await request.read()
        except TimeoutError:
            raise _BodyTimeout() from None
        except (RequestPayloadError, HttpProcessingError) as err:  # gzip that does not decode, …
            raise InvalidArgument(
                f"the request body cannot be read: {one_line(str(err), 200)}"
            ) from None

    async def _json_body(self, request: web.Request, what: str) -> dict:
        raw = await self._body(request)
        if not raw.strip():
            return {}
        return http_codec.json_object(http_codec.loads(raw, what, self.settings.limits), what)

    # ---- the routes ------------------------------------------------------------------------
    async def live(self, request):
        return _json({"live": (await self.core.server_live(pb.ServerLiveRequest())).live})

    async def ready(self, request):
        ready = (await self.core.server_ready(pb.ServerReadyRequest())).ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request):
        reply = await self.core.server_metadata(pb.ServerMetadataRequest())
        return _json(http_codec.message_json(reply))

    def _model(self, request) -> tuple[str, str]:
        return request.match_info["name"], request.match_info.get("version", "")

    async def model_metadata(self, request):
        name, version = self._model(request)
        reply = await self.core.model_metadata(pb.ModelMetadataRequest(name=name, version=version))
        return _json(http_codec.message_json(reply))

    async def model_ready(self, request):
        name, version = self._model(request)
        reply = await self.core.model_ready(pb.ModelReadyRequest(name=name, version=version))
        return _json({"name": name, "ready": reply.ready}, 200 if reply.ready else 503)

    async def model_config(self, request):
        name, version = self._model(request)
        reply = await self.core.model_config(pb.ModelConfigRequest(name=name, version=version))
        return _json(http_codec.message_json(reply.config))

    async def statistics(self, request):
        name = request.match_info.get("name", "")
        version = request.match_info.get("version", "")
        reply = await self.core.model_statistics(
            pb.ModelStatisticsRequest(name=name, version=version)
        )
        return _json(http_codec.message_json(reply))

    async def infer(self, request):
        name, version = self._model(request)
        body = await self._body(request)
        message, binary_output, binary_of = http_codec.infer_request(
            body,
            request.headers.get(http_codec.HEADER_LENGTH),
            name,
            version,
            self.settings.limits,
            self.settings.max_json_bytes,
        )
        reply = await self.core.infer(message, _timeout_s(message))
        out, header_length = http_codec.infer_response(reply, binary_output, binary_of)
        if header_length is None:
            return web.Response(body=out, content_type=JSON)
        return web.Response(
            body=out,
            content_type="application/octet-stream",
            headers={http_codec.HEADER_LENGTH: str(header_length)},
        )

    async def index(self, request):
        doc = await self._json_body(request, "the repository index request")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        reply = await self.core.repository_index(pb.RepositoryIndexRequest(ready=ready))
        return _json(http_codec.message_json(reply)["models"])  # Triton answers the list

    async def load(self, request):
        doc = await self._json_body(request, "the load request")
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["name"])
        for key, value in http_codec.json_object(
            doc.get("parameters", {}), "the load request's parameters"
        ).items():
            param = message.parameters[key]
            if isinstance(value, bool):
                param.bool_param = value
            elif isinstance(value, int):
                param.int64_param = value
            elif isinstance(value, str):
                param.string_param = value
            else:
                raise InvalidArgument(f"load parameter {key!r} must be a string, bool or integer")
        await self.core.repository_model_load(message)
        return _json({})

    async def unload(self, request):
        await self._json_body(request, "the unload request")  # unload_dependents: none here
        name = request.match_info["name"]
        await self.core.repository_model_unload(pb.RepositoryModelUnloadRequest(model_name=name))
        return _json({})

    async def shm_status(self, request):
        name = request.match_info.get("region", "")
        reply = await self.core.system_shared_memory_status(
            pb.SystemSharedMemoryStatusRequest(name=name)
        )
        regions = http_codec.message_json(reply)["regions"]
        return _json([regions[key] for key in sorted(regions)])  # Triton answers a list

    async def shm_register(self, request):
        doc = await self._json_body(request, "the register request")
        key, offset, size = doc.get("key"), doc.get("offset", 0), doc.get("byte_size")
        if not isinstance(key, str):
            raise InvalidArgument("the register request needs 'key': the shm_open name")
        for field, value in (("offset", offset), ("byte_size", size)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
                raise InvalidArgument(f"the register request needs '{field}': a byte count")
        await self.core.system_shared_memory_register(
            pb.SystemSharedMemoryRegisterRequest(
                name=request.match_info["region"], key=key, offset=offset, byte_size=size
            )
        )
        return _json({})

    async def shm_unregister(self, request):
        name = request.match_info.get("region", "")
        await self.core.system_shared_memory_unregister(
            pb.SystemSharedMemoryUnregisterRequest(name=name)
        )
        return _json({})


class _BodyTimeout(Exception):
    pass


def _timeout_s(message) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds) as the core's deadline."""
    if "timeout" not in message.parameters:
        return None
    microseconds = message.parameters["timeout"].int64_param
    return microseconds / 1e6 if microseconds > 0 else None
