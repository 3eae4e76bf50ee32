"""The client commands of ``paramserve``: each a few lines over ``Client``.

Nothing heavy at import: the client (numpy, no torch) is imported by the command that runs.
``health`` is in ``cli_health`` (grpc only).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def _client(args):
    from .client import Client

    return Client(
        args.server,
        timeout_s=args.timeout_s,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.client_tls_cert,
        tls_key=args.client_tls_key,
    )


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
        _print_json(
            [
                {
                    "name": a.name,
                    "doc": a.doc,
                    "defaults": json.loads(a.config_defaults_json),
                    "example_input_shape": list(a.example_input_shape),
                    "batchable": a.batchable,
                    "input_datatype": a.input_datatype,
                    "inputs": [
                        {
                            "name": i.name,
                            "datatype": i.datatype,
                            "shape": list(i.shape),
                            "batch_dim": i.batch_dim,
                        }
                        for i in a.inputs
                    ],
                    "outputs": list(a.outputs),
                }
                for a in archs
            ]
        )
    else:
        _table(
            [
                [a.name, a.config_defaults_json, "yes" if a.batchable else "no", a.doc]
                for a in archs
            ],
            ["ARCHITECTURE", "CONFIG DEFAULTS", "BATCHABLE", "DOC"],
        )
    return 0


def cmd_create(args) -> int:
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config is not valid JSON: {err}") from None
    with _client(args) as client:
        info = client.create_model(
            args.name,
            args.architecture,
            config,
            init=args.init,
            seed=args.seed,
            description=args.description,
        )
    print(
        f"created model {info.name} ({info.architecture}, config {json.dumps(info.config)}"
        f"{', lazy' if info.lazy else ''})"
    )
    return 0


def cmd_models(args) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        _print_json([asdict(m) for m in models])
    else:
        _table(
            [
                [
                    m.name,
                    m.architecture,
                    m.latest_version or "-",
                    ",".join(f"{a}={v}" for a, v in m.aliases.items()) or "-",
                    "yes" if m.lazy else "no",
                ]
                for m in models
            ],
            ["MODEL", "ARCHITECTURE", "LATEST", "ALIASES", "LAZY"],
        )
    return 0


def cmd_versions(args) -> int:
    with _client(args) as client:
        versions = client.list_versions(args.name)
    if args.json:
        _print_json([asdict(v) for v in versions])
    else:
        _table(
            [
                [
                    v.number,
                    v.origin,
                    v.parent or "-",
                    v.size_bytes,
                    v.sha256[:12],
                    ",".join(v.aliases) or "-",
                    v.created_at.isoformat(timespec="seconds"),
                ]
                for v in versions
            ],
            ["VERSION", "ORIGIN", "PARENT", "BYTES", "SHA256", "ALIASES", "CREATED"],
        )
    return 0


def _progress_bar(label: str, quiet: bool):
    """A tqdm bar on stderr, only when stderr is a terminal (never into a log file)."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(
        desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.2
    )

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def file_sha256(path: str) -> str:
    import hashlib  # here: OpenSSL's load is a few ms of every other command's start

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cmd_upload(args) -> int:
    if not os.path.isfile(args.file):
        raise ValueError(f"no such file: {args.file}")
    progress, close = _progress_bar(f"upload {os.path.basename(args.file)}", args.quiet)
    try:
        with _client(args) as client:
            version = client.upload(
                args.name, args.file, alias=args.alias, progress=progress, note=args.note
            )
    finally:
        close()
    aliases = f" (alias {args.alias})" if args.alias else ""
    print(f"uploaded {args.name} version {version.number}{aliases}")
    own = file_sha256(args.file)
    if own == version.sha256:
        print(f"sha256 {version.sha256} (the stored blob's, the same as the file's)")
    else:
        print(
            f"sha256 {version.sha256} (the stored blob's: the server keeps a canonical "
            f"safetensors; the file's own sha256 is {own})"
        )
    return 0


def cmd_download(args) -> int:
    name, ref = _split_ref(args.ref)
    progress, close = _progress_bar(f"download {args.ref}", args.quiet)
    try:
        with _client(args) as client:
            version = client.download(
                name, ref, args.output, progress=progress, as_stored=args.as_stored
            )
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
    param, index = split_param(args.param) if args.param else (None, None)
    with _client(args) as client:
        if param and args.values:
            # a tensor (or its slice), or a submodule's entries as net[2].state_dict() has them
            if index is not None:
                tensors = {param: client.tensor(name, param, ref, index=index)}
            else:
                tensors = client.module_state(name, param, ref)
            described = [
                {"name": k, "shape": list(t.shape), "dtype": str(t.dtype), "values": t.tolist()}
                for k, t in tensors.items()
            ]
            one = list(tensors) == [param]
            if args.json:
                _print_json(described[0] if one else described)
            elif one:
                print(tensors[param])
            else:
                for key, tensor in tensors.items():
                    print(f"{key}:\n{tensor}")
            return 0
        # PARAM: that entry, or the entries of a submodule path (names relative to it)
        infos = client.parameters(name, ref, stats=args.stats, path=param)
    if args.json:
        _print_json([asdict(p) for p in infos])
        return 0
    rows = []
    for p in infos:
        row = [
            p.name,
            p.spec.describe(),
            p.kind,
            ",".join(p.tied_with) or "-",
            "yes" if p.initialized else "no",
        ]
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
    try:
        shape = [int(d) for d in args.input_shape.split(",")] if args.input_shape else None
    except ValueError:
        raise ValueError(f"--input-shape {args.input_shape!r}: write sizes like 2,20") from None
    with _client(args) as client:
        version = client.initialize(
            name,
            args.scheme,
            ref,
            module_path=args.module,
            seed=args.seed,
            input_shape=shape,
            note=args.note,
        )
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
        version = client.patch(name, param, value, ref, index=index, op=args.op, note=args.note)
    print(f"patched {name}: version {version.number} (parent {version.parent or '-'})")
    return 0


def cmd_infer(args) -> int:
    import numpy as np

    name, ref = _split_ref(args.ref)
    inputs = _named_files(args.input, "--input")
    x = {k: np.load(v, allow_pickle=False) for k, v in inputs.items()}
    with _client(args) as client:
        y = client.infer(name, x[""] if list(x) == [""] else x, ref)
    outputs = (
        {k: np.asarray(v) for k, v in y.items()} if isinstance(y, dict) else {"": np.asarray(y)}
    )
    saves = _named_files(args.output or [], "--output")
    for key, path in saves.items():
        if key not in outputs and not (key == "" and len(outputs) == 1):
            raise ValueError(f"--output {key}=...: the model's outputs are {sorted(outputs)}")
        array = outputs.get(key, next(iter(outputs.values())))
        with open(path, "wb") as file:  # the name as given: np.save would add .npy
            np.save(file, array, allow_pickle=array.dtype == object)
        print(f"saved output {key + ' ' if key else ''}{list(array.shape)} {array.dtype} to {path}")
    if not saves:
        shown = {k: _as_json(v) for k, v in outputs.items()}
        print(json.dumps(shown[""] if list(shown) == [""] else shown))
    return 0


def _named_files(values: list[str], flag: str) -> dict[str, str]:
    """``FILE`` (key "") or ``NAME=FILE`` arguments; a path holding "=" that exists is a FILE."""
    named: dict[str, str] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or os.path.exists(value):
            key, path = "", value
        if key in named:
            raise ValueError(f"{flag} {key or 'FILE'} is given twice")
        named[key] = path
    if "" in named and len(named) > 1:
        raise ValueError(f"{flag}: name every file (NAME=FILE) when there are several")
    return named


def _as_json(array) -> dict:
    data = [b.decode() for b in array.reshape(-1)] if array.dtype == object else array.tolist()
    return {"shape": list(array.shape), "dtype": str(array.dtype), "data": data}


def cmd_delete(args) -> int:
    if args.force and args.version is None:
        raise ValueError("--force goes with --version N (a whole model goes with its aliases)")
    what = (
        f"version {args.version} of model {args.name}"
        if args.version is not None
        else f"model {args.name} with all its versions and aliases"
    )
    if not args.yes and not _confirm(f"delete {what}?"):
        print("paramserve: nothing deleted", file=sys.stderr)
        return EXIT_ERROR
    with _client(args) as client:
        if args.version is not None:
            removed = client.delete_version(args.name, args.version, force=args.force)
            print(
                f"deleted {args.name} version {args.version}"
                + (f"; removed aliases: {', '.join(removed)}" if removed else "")
            )
        else:
            client.delete_model(args.name)
            print(f"deleted model {args.name}")
    return 0


def _confirm(question: str) -> bool:
    """Ask on a terminal; without one, refuse (a script must say --yes)."""
    if not sys.stdin.isatty():
        from .settings import SettingError

        raise SettingError("delete asks for confirmation and stdin is not a terminal: add --yes")
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")
