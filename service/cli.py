"""The ``paramserve`` command: the server, and a thin layer over the client for everything a
user does. Every listing takes ``--json``; errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .config import add_server_flags, env

EXIT_ERROR = 1
EXIT_USAGE = 2        # a bad flag, or a bad file a flag names (as argparse's own errors)
EXIT_UNREACHABLE = 3  # no answer in time: UNAVAILABLE or DEADLINE_EXCEEDED
EPILOG = ("exit status: 0 done; 1 an error the server (or the check) reported; 2 a bad command "
          "line, or a bad file one of serve's flags names; 3 the server cannot be reached or did "
          "not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED); 130 interrupted")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # one clear line, never a traceback, for known errors
        from paramserve.registry.errors import ParamserveError

        if not isinstance(err, (ParamserveError, OSError, ValueError)):
            raise
        message = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"paramserve: error: {message}", file=sys.stderr)
        return EXIT_UNREACHABLE if _status_name(err) in ("UNAVAILABLE", "DEADLINE_EXCEEDED") \
            else EXIT_ERROR


def _status_name(err: Exception) -> str:
    """The gRPC status an error came back as: ``ServerError.code``, or the class the client
    turned the status into (DEADLINE_EXCEEDED comes back as ``DeadlineExceeded``)."""
    code = getattr(err, "code", None)
    if code is not None:
        return getattr(code, "name", "")
    from paramserve.registry.errors import ParamserveError

    if not isinstance(err, ParamserveError):
        return ""
    from .errors import status_of

    return status_of(err).name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramserve",
        description="Serve PyTorch modules and their versioned parameters over gRPC. "
                    "REF is a version number or an alias; NAME@REF picks one (default: latest).",
        epilog=EPILOG)
    parser.add_argument("--server", default=env("SERVER", "127.0.0.1:8001"),
                        help="server HOST:PORT for client commands (env PARAMSERVE_SERVER)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="deadline of one request in seconds (an upload gets more when it "
                             "is large); a download's longest wait for its next chunk "
                             "(default 60)")
    parser.add_argument("--token", default=env("TOKEN"),
                        help="bearer token for a server with --auth-token-file "
                             "(env PARAMSERVE_TOKEN)")
    parser.add_argument("--tls-ca", default=env("TLS_CA"),
                        help="PEM CA to trust: talk TLS to the server (env PARAMSERVE_TLS_CA)")
    parser.add_argument("--tls-cert", default=env("CLIENT_TLS_CERT"),
                        help="client certificate for mutual TLS (env PARAMSERVE_CLIENT_TLS_CERT)")
    parser.add_argument("--tls-key", default=env("CLIENT_TLS_KEY"),
                        help="client key for mutual TLS (env PARAMSERVE_CLIENT_TLS_KEY)")
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", cmd_serve, "start the gRPC server")
    add_server_flags(serve)

    health = command("health", cmd_health, "exit 0 when the server's health service says "
                                           "SERVING (a container health check)")
    health.add_argument("--wait-s", type=float, default=3.0)

    listing = command("architectures", cmd_architectures,
                      "list what can be built, with config defaults")
    listing.add_argument("--json", action="store_true")

    create = command("create", cmd_create, "create a model from an architecture")
    create.add_argument("name")
    create.add_argument("--architecture", required=True)
    create.add_argument("--config", default="{}", help='JSON, e.g. \'{"in_features": null}\'')
    create.add_argument("--init", default="default", help="init policy, e.g. normal(0, 0.01)")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--description", default="")

    models = command("models", cmd_models, "list models")
    models.add_argument("--json", action="store_true")

    versions = command("versions", cmd_versions, "list a model's versions")
    versions.add_argument("name")
    versions.add_argument("--json", action="store_true")

    upload = command("upload", cmd_upload, "upload a .safetensors or torch.save'd state_dict "
                                           "as a new version; prints the version")
    upload.add_argument("name")
    upload.add_argument("file")
    upload.add_argument("--alias")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")

    download = command("download", cmd_download, "save a version to FILE (.safetensors or .pt)")
    download.add_argument("ref", metavar="NAME[@REF]")
    download.add_argument("-o", "--output", required=True)
    download.add_argument("--quiet", action="store_true", help="no progress bar")

    alias = command("alias", cmd_alias, "point ALIAS at VERSION (or remove it with --delete)")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int, nargs="?")
    alias.add_argument("--delete", action="store_true")

    params = command("params", cmd_params, "list tensors: shape, dtype, tied-with, "
                                           "initialized; or one tensor's values")
    params.add_argument("ref", metavar="NAME[@REF]")
    params.add_argument("param", nargs="?", metavar="PARAM[INDEX]")
    params.add_argument("--values", action="store_true", help="print PARAM's values")
    params.add_argument("--stats", action="store_true", help="add min/max/mean/std")
    params.add_argument("--json", action="store_true")

    tree = command("tree", cmd_tree, "print the module tree as PyTorch prints it")
    tree.add_argument("ref", metavar="NAME[@REF]")

    init = command("init", cmd_init, "apply an init scheme → a new version")
    init.add_argument("ref", metavar="NAME[@REF]")
    init.add_argument("scheme", help="default, normal(mean,std), zeros, constant(v), "
                                     "xavier_uniform, uniform(a,b), my_init")
    init.add_argument("--module", help="submodule path, e.g. 0 or 'net.0' (default: all)")
    init.add_argument("--seed", type=int)
    init.add_argument("--input-shape", help="for a lazy model with no version, e.g. 2,20")

    patch = command("patch", cmd_patch, "set a tensor, slice or element → a new version")
    patch.add_argument("ref", metavar="NAME[@REF]")
    patch.add_argument("param", metavar="PARAM[INDEX]", help="e.g. '0.weight[0, 0]'")
    patch.add_argument("value", help="a number or a JSON array")
    patch.add_argument("--op", choices=("set", "add", "mul"), default="set")

    infer = command("infer", cmd_infer, "run a forward pass on an .npy input")
    infer.add_argument("ref", metavar="NAME[@REF]")
    infer.add_argument("--input", required=True, help="a .npy file")
    infer.add_argument("--output", help="save the output as .npy (default: print it)")

    delete = command("delete", cmd_delete, "delete a model, or one version with --version")
    delete.add_argument("name")
    delete.add_argument("--version", type=int)
    delete.add_argument("--force", action="store_true",
                        help="with --version: delete it even when aliases point at it, "
                             "removing those aliases (printed)")

    check = command("check", cmd_check, "verify a data dir: every version has its blob with the "
                                        "right sha256, no alias dangles; --repair removes "
                                        "orphaned blobs and temporary files")
    check.add_argument("--data-dir", default=env("DATA_DIR", "./data"))
    check.add_argument("--registry-url", default=env("REGISTRY_URL"))
    check.add_argument("--repair", action="store_true")
    check.add_argument("--min-age-s", type=float, default=600.0,
                       help="--repair leaves younger temporary files alone: they may belong "
                            "to a write in flight (default 600); orphaned blobs are judged by "
                            "the database (no version, no upload holding them), not by age")
    check.add_argument("--json", action="store_true")

    db = command("db", None, "registry database maintenance")
    db_commands = db.add_subparsers(metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the registry schema to the newest")
    upgrade.set_defaults(handler=cmd_db_upgrade)
    upgrade.add_argument("--data-dir", default=env("DATA_DIR", "./data"))
    upgrade.add_argument("--registry-url", default=env("REGISTRY_URL"))
    return parser


# ---- commands ------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    import asyncio

    from .config import ServerConfig
    from .server import configure_logging, serve

    from paramserve.registry.errors import InvalidArgument

    from .errors import one_line

    config = ServerConfig.from_args(args)
    if config.workers < 1:
        raise ValueError("--workers must be 1 or more")
    try:
        if config.workers > 1:
            from .workers import serve_workers

            return serve_workers(config)
        configure_logging()
        asyncio.run(serve(config))
    except (InvalidArgument, ValueError) as err:  # a bad flag or flag file: before serving
        print(f"paramserve: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _client(args) as client:
        try:
            status = health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.wait_s).status
        except grpc.RpcError as err:
            print(f"paramserve: unhealthy: {err.code().name}", file=sys.stderr)
            return EXIT_UNREACHABLE
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else EXIT_ERROR


def _client(args):
    from .client import Client

    return Client(args.server, timeout_s=args.timeout_s, token=args.token, tls_ca=args.tls_ca,
                  tls_cert=args.tls_cert, tls_key=args.tls_key)


def _split_ref(text: str) -> tuple[str, str | None]:
    name, _, ref = text.partition("@")
    return name, ref or None


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


def _table(rows: list[list], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def cmd_architectures(args) -> int:
    with _client(args) as client:
        archs = client.architectures()
    if args.json:
        _print_json([{"name": a.name, "doc": a.doc, "defaults": json.loads(a.config_defaults_json),
                      "example_input_shape": list(a.example_input_shape),
                      "batchable": a.batchable, "input_datatype": a.input_datatype}
                     for a in archs])
    else:
        _table([[a.name, a.config_defaults_json, "yes" if a.batchable else "no", a.doc]
                for a in archs], ["ARCHITECTURE", "CONFIG DEFAULTS", "BATCHABLE", "DOC"])
    return 0


def cmd_create(args) -> int:
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config is not valid JSON: {err}") from None
    with _client(args) as client:
        info = client.create_model(args.name, args.architecture, config, init=args.init,
                                   seed=args.seed, description=args.description)
    print(f"created model {info.name} ({info.architecture}, config {json.dumps(info.config)}"
          f"{', lazy' if info.lazy else ''})")
    return 0


def cmd_models(args) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json([asdict(m) for m in models])
    else:
        _table([[m.name, m.architecture, m.latest_version or "-",
                 ",".join(f"{a}={v}" for a, v in m.aliases.items()) or "-",
                 "yes" if m.lazy else "no"] for m in models],
               ["MODEL", "ARCHITECTURE", "LATEST", "ALIASES", "LAZY"])
    return 0


def cmd_versions(args) -> int:
    with _client(args) as client:
        versions = client.list_versions(args.name)
    if args.json:
        _print_json([asdict(v) for v in versions])
    else:
        _table([[v.number, v.origin, v.parent or "-", v.size_bytes, v.sha256[:12],
                 ",".join(v.aliases) or "-", v.created_at.isoformat(timespec="seconds")]
                for v in versions],
               ["VERSION", "ORIGIN", "PARENT", "BYTES", "SHA256", "ALIASES", "CREATED"])
    return 0


def _progress_bar(label: str, quiet: bool):
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               mininterval=0.2)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def cmd_upload(args) -> int:
    if not os.path.isfile(args.file):
        raise ValueError(f"no such file: {args.file}")
    progress, close = _progress_bar(f"upload {os.path.basename(args.file)}", args.quiet)
    try:
        with _client(args) as client:
            version = client.upload(args.name, args.file, alias=args.alias, progress=progress)
    finally:
        close()
    aliases = f" (alias {args.alias})" if args.alias else ""
    print(f"uploaded {args.name} version {version.number}{aliases} sha256 {version.sha256}")
    return 0


def cmd_download(args) -> int:
    name, ref = _split_ref(args.ref)
    progress, close = _progress_bar(f"download {args.ref}", args.quiet)
    try:
        with _client(args) as client:
            version = client.download(name, ref, args.output, progress=progress)
    finally:
        close()
    print(f"saved {name} version {version.number} to {args.output}")
    return 0


def cmd_alias(args) -> int:
    with _client(args) as client:
        if args.delete:
            client.delete_alias(args.name, args.alias)
            print(f"removed alias {args.alias} of {args.name}")
            return 0
        if args.version is None:
            raise ValueError("give the VERSION the alias should point at (or --delete)")
        client.set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def cmd_params(args) -> int:
    from paramserve.registry.slicing import split_param

    name, ref = _split_ref(args.ref)
    with _client(args) as client:
        if args.param and args.values:
            param, index = split_param(args.param)
            tensor = client.tensor(name, param, ref, index=index)
            if args.json:
                _print_json({"name": param, "shape": list(tensor.shape),
                             "dtype": str(tensor.dtype), "values": tensor.tolist()})
            else:
                print(tensor)
            return 0
        infos = client.parameters(name, ref, stats=args.stats)
    if args.param:
        infos = [p for p in infos if p.name == split_param(args.param)[0]]
        if not infos:
            raise ValueError(f"model {name!r} has no parameter {args.param!r}")
    if args.json:
        _print_json([asdict(p) for p in infos])
        return 0
    rows = []
    for p in infos:
        row = [p.name, p.spec.describe(), p.kind, ",".join(p.tied_with) or "-",
               "yes" if p.initialized else "no"]
        if args.stats:
            s = p.stats
            row.append("-" if s is None else f"{s.min:.4g}/{s.max:.4g}/{s.mean:.4g}/{s.std:.4g}")
        rows.append(row)
    header = ["NAME", "SPEC", "KIND", "TIED WITH", "INITIALIZED"]
    _table(rows, header + (["MIN/MAX/MEAN/STD"] if args.stats else []))
    return 0


def cmd_tree(args) -> int:
    name, ref = _split_ref(args.ref)
    with _client(args) as client:
        print(client.module_tree(name, ref))
    return 0


def cmd_init(args) -> int:
    name, ref = _split_ref(args.ref)
    shape = [int(d) for d in args.input_shape.split(",")] if args.input_shape else None
    with _client(args) as client:
        version = client.initialize(name, args.scheme, ref, module_path=args.module,
                                    seed=args.seed, input_shape=shape)
    print(f"initialized {name}: version {version.number} (parent {version.parent or '-'})")
    return 0


def cmd_patch(args) -> int:
    from paramserve.registry.slicing import split_param

    name, ref = _split_ref(args.ref)
    param, index = split_param(args.param)
    try:
        value = json.loads(args.value)
    except json.JSONDecodeError:
        raise ValueError(f"VALUE {args.value!r} must be a number or a JSON array") from None
    with _client(args) as client:
        version = client.patch(name, param, value, ref, index=index, op=args.op)
    print(f"patched {name}: version {version.number} (parent {version.parent or '-'})")
    return 0


def cmd_infer(args) -> int:
    import numpy as np

    name, ref = _split_ref(args.ref)
    x = np.load(args.input, allow_pickle=False)
    with _client(args) as client:
        y = client.infer(name, x, ref)
    if args.output:
        np.save(args.output, y.numpy())
        print(f"saved output {list(y.shape)} to {args.output}")
    else:
        print(y)
    return 0


def cmd_delete(args) -> int:
    if args.force and args.version is None:
        raise ValueError("--force goes with --version N (a whole model goes with its aliases)")
    with _client(args) as client:
        if args.version is not None:
            removed = client.delete_version(args.name, args.version, force=args.force)
            print(f"deleted {args.name} version {args.version}"
                  + (f"; removed aliases: {', '.join(removed)}" if removed else ""))
        else:
            client.delete_model(args.name)
            print(f"deleted model {args.name}")
    return 0


def cmd_check(args) -> int:
    from paramserve.registry import Store
    from paramserve.registry.check import check

    with Store(args.registry_url, data_dir=args.data_dir) as store:
        report = check(store, repair=args.repair, min_age_s=args.min_age_s)
    if args.json:
        _print_json({**asdict(report), "ok": report.ok})
    else:
        print(f"checked {report.versions_checked} versions: "
              f"{'OK' if report.ok else 'PROBLEMS FOUND'}")
        for label, items in (("missing blob", report.missing_blobs),
                             ("corrupt blob", report.corrupt_blobs),
                             ("dangling alias", report.dangling_aliases),
                             ("orphaned blob", report.orphan_blobs),
                             ("held blob (an upload in flight)", report.held_blobs),
                             ("temporary file", report.temp_files),
                             ("removed", report.removed)):
            for item in items:
                print(f"  {label}: {item}")
    return 0 if report.ok else EXIT_ERROR


def cmd_db_upgrade(args) -> int:
    from pathlib import Path

    from paramserve.registry.database import make_engine, upgrade
    from paramserve.registry.store import default_url

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    url = args.registry_url or default_url(args.data_dir)
    engine = make_engine(url)
    try:
        upgrade(engine, url)
    finally:
        engine.dispose()
    print(f"registry at {engine.url.render_as_string(hide_password=True)} is at the newest schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
