"""Start, run and stop the gRPC server: the KServe v2 and Registry services, health, reflection
and metrics, over one store. SIGTERM and SIGINT stop it gracefully: new RPCs are refused,
in-flight ones get ``grace_s`` seconds to finish, then the store closes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socketserver
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from paramserve.protos import (
    health_pb2,
    health_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    reflection_v1_pb2,
    reflection_v1_pb2_grpc,
    reflection_v1alpha_pb2,
    reflection_v1alpha_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from paramserve.registry import Store
from paramserve.registry.architectures import load_entry_points, load_module
from paramserve.registry.errors import InvalidArgument
from paramserve.registry.notify import ChangeListener

from .auth import AuthInterceptor, Tokens
from .config import (
    ServerConfig,
    join_address,
    parse_model_batching,
    split_address,
    torch_threads_for,
)
from .errors import Edge, EdgeLimits, guard
from .health import HealthServicer
from .inference import InferenceServicer
from .inference_core import InferenceCore
from .inference_stream import StreamLimits
from .metrics import Metrics
from .metrics_triton import TritonFamilies, inflight_of
from .models import BatchingPolicy, ModelManager
from .placement import Placement
from .reflection import SERVICE_NAMES as REFLECTION_SERVICES
from .reflection import ReflectionServicer
from .registry_service import RegistryServicer
from .shared_memory import SharedMemoryRegions
from .workers import refuse_if_taken

if TYPE_CHECKING:
    from .http_server import HttpServer

log = logging.getLogger("paramserve")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    store: Store
    executor: ThreadPoolExecutor
    manager: ModelManager
    inference: InferenceCore  # what the gRPC and HTTP front ends call
    health: HealthServicer
    metrics_http: socketserver.BaseServer | None  # prometheus_client's WSGIServer
    watcher: asyncio.Task | None
    listener: ChangeListener | None = None  # PostgreSQL's pushed changes (registry/notify.py)
    http: HttpServer | None = None  # KServe v2 REST (service/http_server.py)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        # both ports stop taking requests at once; in-flight ones share the one grace
        await asyncio.gather(self.server.stop(grace_s), *([self.http.stop()] if self.http else []))
        if self.watcher is not None:
            self.watcher.cancel()
        if self.listener is not None:
            await self.listener.close()
        self.executor.shutdown(wait=True)
        self.manager.shutdown()
        if self.inference.shared_memory is not None:
            self.inference.shared_memory.close()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        self.store.close()


async def start(config: ServerConfig, reuse_port: bool = False) -> RunningServer:
    """Open the store, bind the ports (port 0: a free one) and start serving.

    ``reuse_port``: share the port with sibling worker processes (``--workers``); otherwise a
    taken port is an error, not a silent second listener. Whatever fails on the way closes
    what was opened (store, threads, metrics port) before the error goes up."""
    torch.set_num_threads(torch_threads_for(config))
    for module in config.architectures:
        load_module(module)
    load_entry_points()
    placement = Placement(config.device)
    tokens = Tokens.from_file(config.auth_token_file) if config.auth_token_file else None
    credentials = server_credentials(config)
    opened: list = []  # what to close, last opened first, if the start fails
    server, http = None, None
    try:
        store = Store(
            config.registry_url,
            data_dir=config.data_dir,
            limits=config.limits,
            blob_url=config.blob_url,
            s3_endpoint_url=config.s3_endpoint_url,
        )
        opened.append(store.close)
        cleanup = getattr(store.blobs, "cleanup", None)
        if cleanup is not None:  # an object store: what killed replicas left, an hour old
            cleanup()
        executor = ThreadPoolExecutor(  # torch's thread count is per thread: set in each
            max_workers=config.worker_threads,
            thread_name_prefix="paramserve",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        opened.append(lambda: executor.shutdown(wait=True))
        batching = BatchingPolicy(
            config.max_batch_size,
            config.max_queue_delay_us,
            config.max_queue_size,
            parse_model_batching(config.model_batching),
        )
        manager = ModelManager(
            store,
            placement,
            executor,
            config.memory_budget_mb << 20,
            batching,
            config.model_control_mode,
        )
        opened.append(manager.shutdown)
        metrics = Metrics(
            loaded_models=lambda: len(manager.loaded()),
            triton=TritonFamilies(manager.stats, lambda: inflight_of(manager)),
        )
        server = _grpc_server(config, tokens, reuse_port)
        edge = Edge(edge_limits(config), metrics)
        shared_memory = shared_memory_of(config)
        if shared_memory is not None:
            opened.append(shared_memory.close)
        inference = InferenceCore(
            manager,
            config.max_batch_size,
            config.max_tensor_elements,
            metrics,
            shared_memory=shared_memory,
        )
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            guard(InferenceServicer(inference, StreamLimits.of(config)), metrics, edge), server
        )
        registry_pb2_grpc.add_RegistryServicer_to_server(
            guard(
                RegistryServicer(
                    manager,
                    str(Path(config.data_dir) / "spool"),
                    config.max_upload_mb << 20,
                    metrics,
                    config.stream_idle_timeout_s,
                    config.max_tensor_elements,
                ),
                metrics,
                edge,
            ),
            server,
        )
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = [
            inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            *REFLECTION_SERVICES,
        ]
        for module, messages in (
            (reflection_v1_pb2_grpc, reflection_v1_pb2),
            (reflection_v1alpha_pb2_grpc, reflection_v1alpha_pb2),
        ):
            module.add_ServerReflectionServicer_to_server(
                ReflectionServicer(services, messages), server
            )
        bound = _bind(server, config, credentials, reuse_port)
        metrics_http, metrics_port = None, None
        if config.metrics_listen != "off":
            try:
                metrics_http, metrics_port = metrics.serve(*split_address(config.metrics_listen))
            except OSError as err:
                raise OSError(
                    f"cannot serve metrics on {config.metrics_listen}: "
                    f"{err.strerror or err} (pick another with --metrics-listen, "
                    "or 'off')"
                ) from None
            opened.append(metrics_http.shutdown)
        if config.http_listen != "off":
            from .http_server import serve_http

            http = await serve_http(config, inference, edge, metrics, tokens, reuse_port)
        await server.start()
    except BaseException:
        if http is not None:
            await http.stop()
        if server is not None:
            await server.stop(None)
        for close in reversed(opened):
            close()
        raise
    for name in services[:2] + [""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    watcher, listener = None, None
    if config.sync_interval_s > 0:
        wake = asyncio.Event()
        listener = ChangeListener.for_engine(store.engine, wake.set)  # None on SQLite
        if listener is not None:
            listener.start()
        watcher = asyncio.create_task(
            manager.watch(config.sync_interval_s, wake if listener else None)
        )
    return RunningServer(
        server,
        bound,
        metrics_port,
        store,
        executor,
        manager,
        inference,
        health_servicer,
        metrics_http,
        watcher,
        listener=listener,
        http=http,
    )


def shared_memory_of(config: ServerConfig) -> SharedMemoryRegions | None:
    """The system shared memory regions, or None: the extension is off."""
    if config.max_shm_regions == 0:
        return None
    return SharedMemoryRegions(
        config.max_shm_regions, config.max_shm_mb << 20, config.max_tensor_elements
    )


def edge_limits(config: ServerConfig) -> EdgeLimits:
    """The limits the RPC wrapper enforces. gRPC's own ``maximum_concurrent_rpcs`` is not
    used: it counts health checks and reflection too, so busy (or idle) streams would lock
    the probes out."""
    return EdgeLimits(
        max_concurrent_rpcs=config.max_concurrent_rpcs,
        per_method={
            "UploadVersion": (config.max_concurrent_uploads, "--max-concurrent-uploads"),
            "DownloadVersion": (config.max_concurrent_downloads, "--max-concurrent-downloads"),
        },
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        max_status_chars=config.max_status_chars,
    )


def _grpc_server(config: ServerConfig, tokens: Tokens | None, reuse_port: bool):
    message_bytes = config.max_message_mb << 20
    interceptors = []  # none on the hot path unless tokens or the access log are on
    if config.access_log:  # first: it sees the status auth answers too
        from .access_log import AccessLogInterceptor

        interceptors.append(AccessLogInterceptor())
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens, config.auth_open_reads))
    return grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )


def _bind(server, config: ServerConfig, credentials, reuse_port: bool) -> int:
    """The bound port; one line naming the address when it cannot be had (grpcio before
    1.6x returns 0, newer ones raise RuntimeError)."""
    host, port = split_address(config.listen)
    if port and not reuse_port:
        refuse_if_taken(host, port, config.listen)
    address = join_address(host, port)
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(
            f"cannot listen on {config.listen}: the port is taken or the address "
            "is not on this machine (pick another with --listen)"
        )
    return bound


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from --tls-cert/--tls-key; mutual TLS when --tls-client-ca is given too."""
    if not (config.tls_cert or config.tls_key):
        if config.tls_client_ca:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (config.tls_cert and config.tls_key):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    ca = _flag_file("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_flag_file("--tls-key", config.tls_key), _flag_file("--tls-cert", config.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _flag_file(flag: str, path: str) -> bytes:
    """A file a flag names; a bad one is a usage error naming the flag (exit 2)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidArgument(f"cannot read {flag} {path}: {err.strerror}") from None


async def serve(config: ServerConfig, reuse_port: bool = False, on_ready=None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully. ``on_ready(running)`` replaces the
    "listening on" line (a worker tells its supervisor instead)."""
    running = await start(config, reuse_port)
    # What start() built (torch, SQLAlchemy, grpc: ~260k objects) lives as long as the server;
    # frozen, it is out of the collector's sight: a full collection under load scans what
    # requests allocate (well under 1 ms), not the whole heap (75-110 ms, all requests stalled).
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        on_ready(running)
    else:
        http_port = running.http.port if running.http else None
        line = listening_line(config, running.port, running.metrics_port, http_port=http_port)
        print(f"paramserve listening on {line}", flush=True)
    log.info(
        "serving on %s: data dir %s, registry %s, device %s, metrics %s, event loop %s",
        join_address(split_address(config.listen)[0], running.port),
        Path(config.data_dir).resolve(),
        running.store.engine.url.render_as_string(hide_password=True),
        device_label(config.device),
        metrics_label(config, running.metrics_port),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping: in-flight requests get %g s to finish", config.grace_s)
    finally:
        await running.stop(config.grace_s)
    log.info("stopped")


def device_label(spec: str) -> str:
    """``--device`` as the log names it: what ``auto`` can pick from here."""
    if spec != "auto":
        return spec
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"auto ({count} CUDA device(s), else CPU)" if count else "auto (CPU: no CUDA device)"


def listening_line(
    config: ServerConfig,
    port: int,
    metrics_port: int | None,
    workers: str = "",
    http_port: int | None = None,
) -> str:
    host = split_address(config.listen)[0]
    return (
        f"{host}:{port} (metrics {metrics_label(config, metrics_port)}, "
        f"http {http_label(config, http_port)}, data "
        f"{Path(config.data_dir).resolve()}, device {config.device}{workers})"
    )


def http_label(config: ServerConfig, http_port: int | None = None) -> str:
    """Where KServe v2 REST is served (the bound port, else the configured one), or "off"."""
    if config.http_listen == "off":
        return "off"
    host, port = split_address(config.http_listen)
    return join_address(host, http_port or port)


def metrics_label(config: ServerConfig, metrics_port: int | None) -> str:
    """Where the metrics of a process are served, or "off"."""
    return f"{split_address(config.metrics_listen)[0]}:{metrics_port}" if metrics_port else "off"


def configure_logging(label: str = "", config: ServerConfig | None = None) -> None:
    """``--log-level`` and ``--log-format`` to stderr, each line tagged with ``label`` (a
    worker's index); see ``logs``."""
    from .logs import configure_logging as configure

    settings = config.log if config is not None else None
    configure(
        settings.log_level if settings else "info",
        settings.log_format if settings else "text",
        label,
    )
