"""The server's settings, from flags with ``PARAMSERVE_*`` environment variables as defaults."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from paramserve.registry.limits import DEFAULT_LIMITS, Limits, flag


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PARAMSERVE_{name}", default)


@dataclass(frozen=True)
class ServerConfig:
    data_dir: str = "./data"
    registry_url: str | None = None
    listen: str = "127.0.0.1:8001"
    metrics_listen: str = "127.0.0.1:8002"
    device: str = "auto"
    architectures: tuple[str, ...] = field(default_factory=tuple)
    max_message_mb: int = 64
    max_upload_mb: int = 0
    max_concurrent_rpcs: int = 0
    max_concurrent_uploads: int = 16
    max_concurrent_downloads: int = 64
    stream_idle_timeout_s: float = 30.0
    max_status_chars: int = 1000
    max_tensor_elements: int = 1 << 28
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024
    model_batching: tuple[str, ...] = field(default_factory=tuple)
    memory_budget_mb: int = 0
    model_control_mode: str = "on-demand"
    worker_threads: int = 4
    workers: int = 1
    worker_restart_limit: int = 5
    torch_threads: int = 0
    grace_s: float = 10.0
    sync_interval_s: float = 1.0
    auth_token_file: str | None = None
    auth_open_reads: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # The core's bounds, one flag per field (--max-init-elements …), defaults from Limits().
    limits: Limits = DEFAULT_LIMITS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerConfig":
        values = {f: getattr(args, f) for f in cls.__dataclass_fields__ if f != "limits"}
        values["architectures"] = tuple(values["architectures"] or ())
        values["model_batching"] = tuple(values["model_batching"] or ())
        values["limits"] = Limits(**{f.name: getattr(args, f.name)
                                     for f in dataclasses.fields(Limits)})
        return cls(**values)


# What each Limits field bounds, for --help; a field without an entry still gets its flag.
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


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``paramserve serve``; each falls back to PARAMSERVE_<FLAG>."""
    d = ServerConfig()
    add = parser.add_argument

    def option(field_name: str, help_text: str, default=None) -> None:
        """A flag spelled once: its name, env variable and default come from the field."""
        default = getattr(d, field_name) if default is None else default
        env_name = field_name.upper()
        kind = type(default)
        add(flag(field_name), type=kind, default=kind(env(env_name, str(default))),
            help=f"{help_text} (default {default}; env PARAMSERVE_{env_name})")
    add("--data-dir", default=env("DATA_DIR", d.data_dir),
        help="registry.db and blobs live here (default ./data; env PARAMSERVE_DATA_DIR)")
    add("--registry-url", default=env("REGISTRY_URL"),
        help="SQLAlchemy URL of the registry (default sqlite:///DATA_DIR/registry.db; "
             "env PARAMSERVE_REGISTRY_URL)")
    add("--listen", default=env("LISTEN", d.listen),
        help="gRPC address HOST:PORT; port 0 picks a free one (default 127.0.0.1:8001)")
    add("--metrics-listen", default=env("METRICS_LISTEN", d.metrics_listen),
        help="Prometheus HTTP address HOST:PORT, or 'off' (default 127.0.0.1:8002)")
    add("--device", default=env("DEVICE", d.device),
        help="auto (a GPU with room, else CPU), cpu or cuda:N (default auto)")
    add("--architectures", action="append", default=_split(env("ARCHITECTURES")),
        help="a Python module to import for more @architecture builders; repeatable "
             "(env PARAMSERVE_ARCHITECTURES, comma-separated)")
    add("--max-message-mb", type=int, default=int(env("MAX_MESSAGE_MB", str(d.max_message_mb))),
        help="largest gRPC message in MiB, both ways (default 64)")
    add("--max-upload-mb", type=int, default=int(env("MAX_UPLOAD_MB", str(d.max_upload_mb))),
        help="largest parameter upload in MiB, 0 = no limit (default 0)")
    add("--max-concurrent-rpcs", type=int,
        default=int(env("MAX_CONCURRENT_RPCS", str(d.max_concurrent_rpcs))),
        help="RPCs of the paramserve services served at once; more are answered "
             "RESOURCE_EXHAUSTED; health and reflection are always answered; 0 = no limit "
             "(default 0)")
    option("max_concurrent_uploads", "upload streams open at once; more are answered "
           "RESOURCE_EXHAUSTED; bounds spool files and memory; 0 = no limit")
    option("max_concurrent_downloads", "download streams open at once; more are answered "
           "RESOURCE_EXHAUSTED; bounds open blob files; 0 = no limit")
    option("stream_idle_timeout_s", "seconds a stream may wait on a client that sends (upload) "
           "or reads (download) nothing; then it is closed (DEADLINE_EXCEEDED) and its temp "
           "files removed; 0 = wait forever")
    option("max_status_chars", "longest error message sent to a client; longer ones are cut "
           "with a marker")
    for limit in dataclasses.fields(Limits):
        option(limit.name, LIMIT_HELP.get(limit.name, limit.name.replace("_", " ")),
               getattr(DEFAULT_LIMITS, limit.name))
    add("--max-tensor-elements", type=int,
        default=int(env("MAX_TENSOR_ELEMENTS", str(d.max_tensor_elements))),
        help="largest input tensor, in elements (default 2^28)")
    add("--max-batch-size", type=int, default=int(env("MAX_BATCH_SIZE", str(d.max_batch_size))),
        help="dynamic batching: most rows merged into one forward of a batchable model; "
             "1 turns batching off (default 64)")
    add("--max-queue-delay-us", type=int,
        default=int(env("MAX_QUEUE_DELAY_US", str(d.max_queue_delay_us))),
        help="dynamic batching: extra wait for company before a batch runs; batches form "
             "anyway from requests arriving while the model is busy (default 0)")
    add("--max-queue-size", type=int, default=int(env("MAX_QUEUE_SIZE", str(d.max_queue_size))),
        help="requests waiting per model; more are answered RESOURCE_EXHAUSTED (default 1024)")
    add("--model-batching", action="append",
        default=[v for v in (env("MODEL_BATCHING") or "").split(";") if v],
        metavar="NAME=MAX_BATCH,DELAY_US",
        help="per-model batching override; repeatable (env PARAMSERVE_MODEL_BATCHING, "
             "entries separated by ';')")
    add("--memory-budget-mb", type=int,
        default=int(env("MEMORY_BUDGET_MB", str(d.memory_budget_mb))),
        help="per-device budget for loaded models in MiB; least recently used are unloaded "
             "past it; 0 = no limit (default 0)")
    add("--model-control-mode", choices=("on-demand", "explicit"),
        default=env("MODEL_CONTROL_MODE", d.model_control_mode),
        help="on-demand: a request loads what it needs and RepositoryModelUnload only frees "
             "memory; explicit (Triton's): a model serves only after RepositoryModelLoad, and "
             "unloaded means not ready (default on-demand; env PARAMSERVE_MODEL_CONTROL_MODE)")
    add("--worker-threads", type=int, default=int(env("WORKER_THREADS", str(d.worker_threads))),
        help="threads for store calls, model loads and transfers; forwards run on one compute "
             "thread per device (default 4)")
    add("--workers", type=int, default=int(env("WORKERS", str(d.workers))),
        help="server processes sharing the port (SO_REUSEPORT), each with its own loaded "
             "models; for hosts with many cores (default 1)")
    option("worker_restart_limit", "with --workers: a worker that crashes this many times in "
           "a row, each soon after it started, stops the server (exit 1) instead of being "
           "restarted again with growing delays; 0 = restart forever")
    add("--torch-threads", type=int, default=int(env("TORCH_THREADS", str(d.torch_threads))),
        help="intra-op threads of each process's forwards; 0 = one core per worker is left "
             "to gRPC and the rest shared out: max(1, cores // workers - 1) (default 0)")
    add("--grace-s", type=float, default=float(env("GRACE_S", str(d.grace_s))),
        help="on SIGTERM, seconds in-flight requests get to finish (default 10)")
    add("--auth-token-file", default=env("AUTH_TOKEN_FILE"),
        help="require 'authorization: Bearer TOKEN' metadata; the file holds one token per "
             "line, 'TOKEN read' for a read-only one (env PARAMSERVE_AUTH_TOKEN_FILE)")
    add("--auth-open-reads", action="store_true",
        default=env("AUTH_OPEN_READS", "") in ("1", "true", "yes"),
        help="with --auth-token-file: inference, listings and downloads need no token")
    add("--tls-cert", default=env("TLS_CERT"), help="PEM certificate chain: serve TLS")
    add("--tls-key", default=env("TLS_KEY"), help="PEM private key of --tls-cert")
    add("--tls-client-ca", default=env("TLS_CLIENT_CA"),
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    add("--sync-interval-s", type=float,
        default=float(env("SYNC_INTERVAL_S", str(d.sync_interval_s))),
        help="how often to look for registry changes made by other replicas; they are served "
             "within about this many seconds; 0 = never (default 1)")


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


def _split(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


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
