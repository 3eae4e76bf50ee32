"""The settings of paramserve: the server's (``ServerConfig``), the client commands'
(``ClientSettings``) and logging's, each field defined once with ``settings.option``, from
which its flag, ``PARAMSERVE_*`` variable and help default come.

Nothing heavy is imported here (every command imports it): ``ServerConfig.limits`` imports the
core's ``Limits``, whose package imports torch, only when a server is configured.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .settings import default_of, from_namespace, option, settings_of

if TYPE_CHECKING:  # the core's package imports torch: only `serve` needs it
    from paramserve.registry.limits import Limits


@dataclass(frozen=True)
class LogSettings:
    """Every command's logging (a server's above all)."""

    log_level: str = option(
        "info",
        "least severe log record written to stderr",
        choices=("debug", "info", "warning", "error"),
    )
    log_format: str = option(
        "text", "log lines as text, or one JSON object per line", choices=("text", "json")
    )


@dataclass(frozen=True)
class ClientSettings:
    """How the client commands reach a server."""

    server: str = option(
        "127.0.0.1:8001", "server address for client commands", metavar="HOST:PORT"
    )
    timeout_s: float = option(
        60.0,
        "deadline of one request in seconds (an upload gets more "
        "when it is large); a download's longest wait for its next "
        "chunk",
        minimum=0,
    )
    token: str | None = option(
        None, "bearer token for a server with --auth-token-file", metavar="TOKEN"
    )
    tls_ca: str | None = option(None, "PEM CA to trust: talk TLS to the server", metavar="FILE")
    client_tls_cert: str | None = option(
        None, "client certificate for mutual TLS", flag="--tls-cert", metavar="FILE"
    )
    client_tls_key: str | None = option(
        None, "client key for mutual TLS", flag="--tls-key", metavar="FILE"
    )


@dataclass(frozen=True)
class OutputSettings:
    json: bool = option(False, "print JSON instead of a table or text")


def _default_limits() -> Limits:
    from paramserve.registry.limits import DEFAULT_LIMITS

    return DEFAULT_LIMITS


@dataclass(frozen=True)
class ServerConfig:
    data_dir: str = option("./data", "registry.db and blobs live here", metavar="DIR")
    registry_url: str | None = option(
        None, "SQLAlchemy URL of the registry", shown="sqlite:///DIR/registry.db", metavar="URL"
    )
    blob_url: str | None = option(
        None,
        "where parameter blobs live: a directory, or s3://BUCKET/PREFIX for S3-compatible "
        "object storage (credentials and region from AWS_* variables or ~/.aws)",
        shown="DIR/blobs",
        metavar="URL",
    )
    s3_endpoint_url: str | None = option(
        None,
        "with an s3:// --blob-url: the object store's endpoint when it is not AWS "
        "(SeaweedFS, MinIO, ...)",
        metavar="URL",
    )
    listen: str = option(
        "127.0.0.1:8001", "gRPC address; port 0 picks a free one", metavar="HOST:PORT"
    )
    metrics_listen: str = option(
        "127.0.0.1:8002", "Prometheus HTTP address, or 'off'", metavar="HOST:PORT"
    )
    http_listen: str = option(
        "127.0.0.1:8000",
        "KServe v2 HTTP/REST address (Triton's REST API), or 'off'; port 0 picks a free one",
        metavar="HOST:PORT",
    )
    http_max_body_mb: int = option(
        0, "largest HTTP request body in MiB (after decoding); 0 = --max-message-mb", minimum=0
    )
    http_max_json_mb: int = option(
        16,
        "largest JSON part of an HTTP inference request in MiB (JSON numbers take ~10x their "
        "size while parsed; binary data beside it is bounded by --http-max-body-mb only)",
        minimum=1,
    )
    http_keepalive_timeout_s: float = option(
        75.0, "seconds an idle HTTP keep-alive connection stays open", minimum=0
    )
    device: str = option(
        "auto", "auto (a GPU with room, else CPU), cpu or cuda:N", metavar="DEVICE"
    )
    architectures: tuple[str, ...] = option(
        (),
        "a Python module to import for more @architecture builders; repeatable",
        metavar="MODULE",
    )
    max_message_mb: int = option(64, "largest gRPC message in MiB, both ways", minimum=1)
    max_upload_mb: int = option(0, "largest parameter upload in MiB, 0 = no limit", minimum=0)
    max_concurrent_rpcs: int = option(
        0,
        "RPCs of the paramserve services served at once; more "
        "are answered RESOURCE_EXHAUSTED; health and reflection "
        "are always answered; 0 = no limit",
        minimum=0,
    )
    max_concurrent_uploads: int = option(
        16,
        "upload streams open at once; more are answered "
        "RESOURCE_EXHAUSTED; bounds spool files and memory; "
        "0 = no limit",
        minimum=0,
    )
    max_concurrent_downloads: int = option(
        64,
        "download streams open at once; more are "
        "answered RESOURCE_EXHAUSTED; bounds open blob "
        "files; 0 = no limit",
        minimum=0,
    )
    stream_idle_timeout_s: float = option(
        30.0,
        "seconds a stream may wait on a client that "
        "sends (upload) or reads (download) nothing; then it "
        "is closed (DEADLINE_EXCEEDED) and its temp files "
        "removed; 0 = wait forever",
        minimum=0,
    )
    max_stream_in_flight: int = option(
        64,
        "ModelStreamInfer: messages of one stream served at once; "
        "beyond them the stream is not read until one is answered",
        minimum=1,
    )
    max_status_chars: int = option(
        1000, "longest error message sent to a client; longer ones are cut with a marker", minimum=1
    )
    max_tensor_elements: int = option(
        1 << 28, "largest input tensor, in elements", minimum=1, shown="2^28"
    )
    max_shm_regions: int = option(
        64,
        "system shared memory regions registered at once; more are answered "
        "RESOURCE_EXHAUSTED; 0 turns the extension off",
        minimum=0,
    )
    max_shm_mb: int = option(
        16384, "total size of the registered shared memory regions in MiB", minimum=1
    )
    max_batch_size: int = option(
        64,
        "dynamic batching: most rows merged into one forward of a "
        "batchable model; 1 turns batching off",
        minimum=1,
    )
    max_queue_delay_us: int = option(
        0,
        "dynamic batching: extra wait for company before a "
        "batch runs; batches form anyway from requests arriving "
        "while the model is busy",
        minimum=0,
    )
    max_queue_size: int = option(
        1024, "requests waiting per model; more are answered RESOURCE_EXHAUSTED", minimum=1
    )
    model_batching: tuple[str, ...] = option(
        (), "per-model batching override; repeatable", metavar="NAME=MAX_BATCH,DELAY_US", sep=";"
    )
    memory_budget_mb: int = option(
        0,
        "per-device budget for loaded models in MiB; least "
        "recently used are unloaded past it; 0 = no limit",
        minimum=0,
    )
    model_control_mode: str = option(
        "on-demand",
        "on-demand: a request loads what it needs "
        "and RepositoryModelUnload only frees memory; explicit "
        "(Triton's): a model serves only after "
        "RepositoryModelLoad, and unloaded means not ready",
        choices=("on-demand", "explicit"),
    )
    worker_threads: int = option(
        4,
        "threads for store calls, model loads and transfers; "
        "forwards run on one compute thread per device",
        minimum=1,
    )
    workers: int = option(
        1,
        "server processes sharing the port (SO_REUSEPORT), each with its "
        "own loaded models; for hosts with many cores",
        minimum=1,
    )
    worker_restart_limit: int = option(
        5,
        "with --workers: a worker that crashes this many "
        "times in a row, each soon after it started, stops the "
        "server (exit 1) instead of being restarted again with "
        "growing delays; 0 = restart forever",
        minimum=0,
    )
    event_loop: str = option(
        "asyncio",
        "the server's event loop: asyncio (the standard library's) or uvloop (libuv; "
        "pip install 'paramserve[uvloop]'), ~5% more throughput under load on a small "
        "model and ~30% more latency for a lone client",
        choices=("asyncio", "uvloop"),
    )
    torch_threads: int = option(
        0,
        "intra-op threads of each process's forwards; 0 = one core "
        "per worker is left to gRPC and the rest shared out: "
        "max(1, cores // workers - 1)",
        minimum=0,
    )
    grace_s: float = option(10.0, "on SIGTERM, seconds in-flight requests get to finish", minimum=0)
    sync_interval_s: float = option(
        1.0,
        "how often to poll for registry changes made by other replicas (on PostgreSQL "
        "they are also pushed by LISTEN/NOTIFY within milliseconds; the poll is the "
        "fallback); 0 = neither",
        minimum=0,
    )
    auth_token_file: str | None = option(
        None,
        "require 'authorization: Bearer TOKEN' "
        "metadata; the file holds one token per line, "
        "'TOKEN read' for a read-only one",
    )
    auth_open_reads: bool = option(
        False, "with --auth-token-file: inference, listings and downloads need no token"
    )
    tls_cert: str | None = option(None, "PEM certificate chain: serve TLS")
    tls_key: str | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = option(
        None, "PEM CA bundle: require client certificates signed by it (mutual TLS)"
    )
    access_log: bool = option(
        False, "log one line per RPC at info: method, model, status code, milliseconds"
    )
    # The core's bounds, one flag per field (--max-init-elements …), defaults from Limits().
    limits: Limits = field(default_factory=_default_limits)
    log: LogSettings = field(default_factory=LogSettings)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        from paramserve.registry.limits import Limits

        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
        log = LogSettings(
            **{f.name: getattr(args, f.name, default_of(f)) for f in settings_of(LogSettings)}
        )
        return from_namespace(cls, args, limits=limits, log=log)


# What each Limits field bounds, for --help; the field itself lives in the core.
LIMIT_HELP = {
    "max_init_elements": "parameter elements a lazy first request, an Initialize or an upload "
    "header may make the server materialize",
    "max_input_rank": "dimensions of the input shape a dry run (lazy init) is made with",
    "max_submodules": "submodules of one built model",
    "max_header_entries": "entries in one safetensors header",
    "max_header_bytes": "size of one safetensors header in bytes",
    "max_config_bytes": "size of a model's config JSON in bytes",
    "max_json_depth": "nesting depth of JSON a client sends (configs, headers)",
    "max_description_chars": "length of a model's description in characters",
    "max_scheme_chars": "length of an init scheme's text",
    "max_index_chars": "length of a tensor index's text",
}


def limit_fields() -> list[dataclasses.Field]:
    """``Limits``' fields as settings: positive integers, help from ``LIMIT_HELP``."""
    from paramserve.registry.limits import Limits

    out = []
    for limit in dataclasses.fields(Limits):
        setting = option(
            limit.default, LIMIT_HELP.get(limit.name, limit.name.replace("_", " ")), minimum=1
        )
        setting.name, setting.type = limit.name, "int"
        out.append(setting)
    return out


def server_fields(names: tuple[str, ...] | None = None) -> list[dataclasses.Field]:
    """``serve``'s settings (or those ``names``), the core's limits included."""
    fields = settings_of(ServerConfig) + (limit_fields() if names is None else [])
    return [f for f in fields if names is None or f.name in names]


def torch_threads_for(config: ServerConfig, cores: int | None = None) -> int:
    """Intra-op threads per process: what --torch-threads says, else the cores this worker
    has less one for the event loop and gRPC's poller. With every core given to torch, its
    threads spin while gRPC needs the CPU and a tiny forward waits on a preempted thread."""
    if config.torch_threads > 0:
        return config.torch_threads
    cores = cores or available_cores()
    return max(1, cores // max(1, config.workers) - 1)


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """The inverse of ``split_address``: an IPv6 host goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_model_batching(items) -> tuple[tuple[str, int, int], ...]:
    """``["mlp=32,200"]`` → ``(("mlp", 32, 200),)``."""
    out = []
    for item in items:
        name, _, rest = item.partition("=")
        try:
            max_batch, delay_us = (int(v) for v in rest.split(","))
        except ValueError:
            raise ValueError(f"--model-batching {item!r}: write NAME=MAX_BATCH,DELAY_US") from None
        out.append((name, max_batch, delay_us))
    return tuple(out)
