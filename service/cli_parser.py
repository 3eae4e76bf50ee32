"""The parser of ``paramserve``: every command with its examples, global flags accepted
before or after the command, every setting's flag derived from its field (``config``).

``serve``'s flags need the core's ``Limits`` (whose package imports torch), so they are added
only when ``serve`` is parsed or its help printed; the rest of the parser imports nothing
beyond the standard library.
"""

from __future__ import annotations

import argparse
import textwrap

from . import cli_commands as client_cmds
from . import cli_health
from . import cli_serve as local_cmds
from .cli_learning import add_learning_commands
from .config import ClientSettings, LogSettings, OutputSettings, server_fields
from .settings import SettingError, add_flags, resolve, settings_of

EXIT_ERROR = 1
EXIT_USAGE = 2  # a bad flag or variable, or a bad file a flag names (as argparse's own)
EXIT_UNREACHABLE = 3  # no answer in time: UNAVAILABLE or DEADLINE_EXCEEDED
EXIT_STATUS = """exit status:
  0    done
  1    an error the server (or the check) reported
  2    a bad command line or PARAMSERVE_* variable, or a bad file one of serve's flags names
  3    the server cannot be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED)
  130  interrupted"""
GLOBAL_NOTE = (
    "global flags (--server, --json, --log-level, ...) go before or after the "
    "command; flags win over PARAMSERVE_* variables"
)

NOTE_HELP = "a note recorded with the new version (`paramserve log` shows it)"
CLIENT = settings_of(ClientSettings)
LOG = settings_of(LogSettings)
OUTPUT = settings_of(OutputSettings)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), settings resolved from ``PARAMSERVE_*`` after
    parsing, and arguments added on first use: a ``lazy`` parser (a command) records its
    ``add_argument`` calls and makes them, then calls ``populate``, only when it parses or
    prints help. Building every command's arguments costs ~40 ms of argparse work (help
    formatters, gettext lookups) that one run needs for one command only."""

    def __init__(self, *args, settings=(), populate=None, lazy=False, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if kwargs.get("description"):  # raw (for the examples), so wrapped here
            kwargs["description"] = textwrap.fill(kwargs["description"], 79)
        super().__init__(*args, **kwargs)
        self.settings = list(settings)
        self._populate = populate
        self._pending: list | None = [] if lazy else None

    def add_argument(self, *args, **kwargs):
        if getattr(self, "_pending", None) is None:
            return super().add_argument(*args, **kwargs)
        self._pending.append((args, kwargs))
        return None

    def _ready(self) -> None:
        pending, self._pending = self._pending, None
        for args, kwargs in pending or ():
            super().add_argument(*args, **kwargs)
        if self._populate is not None:
            populate, self._populate = self._populate, None
            self.settings += populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        namespace, extras = super().parse_known_args(args, namespace)
        try:
            resolve(namespace, self.settings)
        except SettingError as err:
            self.error(str(err))
        return namespace, extras

    def format_help(self) -> str:
        self._ready()
        return super().format_help()

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print paramserve's version and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("paramserve")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        print(f"paramserve {text}")
        parser.exit(0)


def _epilog(*examples: str) -> str:
    lines = ["examples:", *(f"  {e}" for e in examples)] if examples else []
    return "\n".join(lines + ["", textwrap.fill(GLOBAL_NOTE, 79), "", EXIT_STATUS]).lstrip()


def build_parser() -> Parser:
    parser = Parser(
        prog="paramserve",
        settings=CLIENT + LOG + OUTPUT,
        description="Serve PyTorch modules and their versioned parameters over gRPC. "
        "REF is a version number or an alias; NAME@REF picks one (default: latest).",
        epilog=_epilog(
            "paramserve serve --data-dir ./data",
            "paramserve --server 10.0.0.5:8001 models",
            "paramserve models --server 10.0.0.5:8001 --json",
        ),
    )
    parser.add_argument("--version", action=_Version)
    add_flags(parser, CLIENT + LOG + OUTPUT)
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name, handler, help_text, examples, guests=CLIENT + LOG, **kwargs):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_epilog(*examples),
            lazy=True,
            **kwargs,
        )
        sub.set_defaults(handler=handler)
        add_flags(sub, guests, guest=True)
        return sub

    command(
        "serve",
        local_cmds.cmd_serve,
        "start the gRPC server",
        [
            "paramserve serve --data-dir ./data --listen 0.0.0.0:8001",
            "PARAMSERVE_MAX_BATCH_SIZE=32 paramserve serve --access-log --log-format json",
        ],
        guests=LOG,
        populate=lambda sub: _add(sub, server_fields()),
    )

    health = command(
        "health",
        cli_health.cmd_health,
        "exit 0 when the server's health service says SERVING (a container health check)",
        ["paramserve health", "paramserve health --server 127.0.0.1:8001 --wait-s 1"],
    )
    health.add_argument(
        "--wait-s",
        type=float,
        default=3.0,
        metavar="S",
        help="how long to wait for the answer (default 3)",
    )

    command(
        "architectures",
        client_cmds.cmd_architectures,
        "list what can be built, with config defaults",
        ["paramserve architectures", "paramserve architectures --json"],
        guests=CLIENT + LOG + OUTPUT,
    )

    create = command(
        "create",
        client_cmds.cmd_create,
        "create a model from an architecture",
        [
            "paramserve create mlp --architecture mlp",
            "paramserve create lazy --architecture mlp "
            "--config '{\"in_features\": null}' --init 'normal(0, 0.01)' --seed 1",
        ],
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--architecture", required=True, metavar="ARCH")
    create.add_argument(
        "--config", default="{}", metavar="JSON", help="JSON, e.g. '{\"in_features\": null}'"
    )
    create.add_argument(
        "--init", default="default", metavar="SCHEME", help="init policy, e.g. normal(0, 0.01)"
    )
    create.add_argument("--seed", type=int, default=0, metavar="N")
    create.add_argument("--description", default="", metavar="TEXT")

    command(
        "models",
        client_cmds.cmd_models,
        "list models",
        ["paramserve models", "paramserve models --json"],
        guests=CLIENT + LOG + OUTPUT,
    )

    versions = command(
        "versions",
        client_cmds.cmd_versions,
        "list a model's versions",
        ["paramserve versions mlp", "paramserve versions mlp --json"],
        guests=CLIENT + LOG + OUTPUT,
    )
    versions.add_argument("name", metavar="NAME")

    upload = command(
        "upload",
        client_cmds.cmd_upload,
        "upload a .safetensors or torch.save'd "
        "state_dict as a new version; prints the version and the sha256 of the "
        "blob stored (and the file's own when they differ)",
        [
            "paramserve upload mlp mlp.safetensors --alias production",
            "paramserve upload mlp state_dict.pt --quiet",
        ],
    )
    upload.add_argument("name", metavar="NAME")
    upload.add_argument("file", metavar="FILE")
    upload.add_argument("--alias", metavar="ALIAS")
    upload.add_argument("--note", default="", help=NOTE_HELP)
    upload.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )

    download = command(
        "download",
        client_cmds.cmd_download,
        "save a version to FILE (.safetensors, .npz or .pt), every state_dict key in it "
        "(a tied name gets its own copy), so load_state_dict(strict=True) takes it",
        [
            "paramserve download mlp@production -o mlp.safetensors",
            "paramserve download mlp@3 -o mlp.pt",
            "paramserve download tied -o tied.safetensors --as-stored  # for load_model",
        ],
    )
    download.add_argument("ref", metavar="NAME[@REF]")
    download.add_argument("-o", "--output", required=True, metavar="FILE")
    download.add_argument(
        "--as-stored",
        action="store_true",
        help="the stored safetensors blob byte for byte: tied names once, named in its "
        "metadata (safetensors.torch.load_model reads it)",
    )
    download.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )

    alias = command(
        "alias",
        client_cmds.cmd_alias,
        "point ALIAS at VERSION (or remove it with --delete)",
        ["paramserve alias mlp production 3", "paramserve alias mlp staging --delete"],
    )
    alias.add_argument("name", metavar="NAME")
    alias.add_argument("alias", metavar="ALIAS")
    alias.add_argument("version", type=int, nargs="?", metavar="VERSION")
    alias.add_argument("--delete", action="store_true")

    params = command(
        "params",
        client_cmds.cmd_params,
        "list tensors: shape, dtype, tied-with, initialized; or one tensor's values",
        [
            "paramserve params mlp@production --stats",
            "paramserve params mlp 0.weight[0] --values --json",
            "paramserve params small 2 --values  # net[2].state_dict(): weight, bias",
        ],
        guests=CLIENT + LOG + OUTPUT,
    )
    params.add_argument("ref", metavar="NAME[@REF]")
    params.add_argument(
        "param",
        nargs="?",
        metavar="PARAM[INDEX]",
        help="a state_dict key (0.weight), or a submodule path (2): its entries, named "
        "relative to it as net[2].state_dict() names them",
    )
    params.add_argument("--values", action="store_true", help="print PARAM's values")
    params.add_argument("--stats", action="store_true", help="add min/max/mean/std")

    tree = command(
        "tree",
        client_cmds.cmd_tree,
        "print the module tree as PyTorch prints it",
        ["paramserve tree mlp@production"],
    )
    tree.add_argument("ref", metavar="NAME[@REF]")

    init = command(
        "init",
        client_cmds.cmd_init,
        "apply an init scheme → a new version",
        [
            "paramserve init mlp 'normal(0, 0.01)' --seed 3",
            "paramserve init mlp@1 zeros --module 0",
            "paramserve init small 'constant(42, bias=keep)' --module 2",
            "paramserve init lazy default --input-shape 2,20",
        ],
    )
    init.add_argument("ref", metavar="NAME[@REF]")
    init.add_argument(
        "scheme",
        metavar="SCHEME",
        help="default, normal(mean,std), zeros, constant(v), xavier_uniform, uniform(a,b), "
        "my_init; normal, zeros and constant zero biases, the others keep them; any but "
        "default takes bias=keep|zero: 'constant(42, bias=keep)' sets weights only (the "
        "guide's init_42)",
    )
    init.add_argument(
        "--module", metavar="PATH", help="submodule path, e.g. 0 or 'net.0' (default: all)"
    )
    init.add_argument("--seed", type=int, metavar="N")
    init.add_argument(
        "--input-shape", metavar="SHAPE", help="for a lazy model with no version, e.g. 2,20"
    )
    init.add_argument("--note", default="", help=NOTE_HELP)

    patch = command(
        "patch",
        client_cmds.cmd_patch,
        "set a tensor, slice or element → a new version",
        [
            "paramserve patch mlp '0.weight[0, 0]' 1.5",
            "paramserve patch mlp 0.bias '[0, 0, 0]' --op add",
        ],
    )
    patch.add_argument("ref", metavar="NAME[@REF]")
    patch.add_argument("param", metavar="PARAM[INDEX]", help="e.g. '0.weight[0, 0]'")
    patch.add_argument("value", metavar="VALUE", help="a number or a JSON array")
    patch.add_argument("--op", choices=("set", "add", "mul"), default="set")
    patch.add_argument("--note", default="", help=NOTE_HELP)

    infer = command(
        "infer",
        client_cmds.cmd_infer,
        "run a forward pass on an .npy input; "
        "print the output as JSON (shape, dtype, data) or save it as .npy",
        [
            "paramserve infer mlp@production --input x.npy",
            "paramserve infer mlp --input x.npy --output y.npy",
            "paramserve infer simple --input INPUT0=a.npy --input INPUT1=b.npy",
        ],
    )
    infer.add_argument("ref", metavar="NAME[@REF]")
    infer.add_argument(
        "--input",
        required=True,
        action="append",
        metavar="[NAME=]FILE",
        help="a .npy file; NAME=FILE, repeated, for a model with several inputs",
    )
    infer.add_argument(
        "--output",
        action="append",
        metavar="[NAME=]FILE",
        help="save the output as .npy (NAME=FILE, repeated, for several; default: print JSON)",
    )

    add_learning_commands(command)

    delete = command(
        "delete",
        client_cmds.cmd_delete,
        "delete a model, or one version with "
        "--version; asks first on a terminal, needs --yes otherwise",
        [
            "paramserve delete mlp",
            "paramserve delete mlp --version 2 --yes",
            "paramserve delete mlp --version 1 --force --yes",
        ],
    )
    delete.add_argument("name", metavar="NAME")
    delete.add_argument(
        "--version", type=int, metavar="N", help="delete this version only (not the model)"
    )
    delete.add_argument(
        "--force",
        action="store_true",
        help="with --version: delete it even when aliases point at it, "
        "removing those aliases (printed)",
    )
    delete.add_argument(
        "-y", "--yes", action="store_true", help="do not ask; needed when stdin is not a terminal"
    )

    check = command(
        "check",
        local_cmds.cmd_check,
        "verify a data dir: every version has its "
        "blob with the right sha256, no alias dangles; --repair removes orphaned "
        "blobs and temporary files; a directory that holds no registry is an "
        "error (nothing is created)",
        [
            "paramserve check --data-dir ./data",
            "paramserve check --data-dir ./data --repair --min-age-s 0 --json",
        ],
        guests=LOG + OUTPUT,
        populate=lambda sub: _add(
            sub, server_fields(("data_dir", "registry_url", "blob_url", "s3_endpoint_url"))
        ),
    )
    check.add_argument("--repair", action="store_true")
    check.add_argument(
        "--min-age-s",
        metavar="S",
        type=float,
        default=600.0,
        help="--repair leaves younger temporary files alone: they may belong "
        "to a write in flight (default 600); orphaned blobs are judged by "
        "the database (no version, no upload holding them), not by age",
    )

    db = command(
        "db",
        None,
        "registry database maintenance",
        ["paramserve db upgrade --data-dir ./data"],
        guests=LOG,
    )
    db_commands = db.add_subparsers(metavar="DB_COMMAND", required=True)
    upgrade = db_commands.add_parser(
        "upgrade",
        help="migrate the registry schema to the newest",
        description="migrate the registry schema to the newest (back up the database first)",
        epilog=_epilog(
            "paramserve db upgrade --data-dir ./data",
            "paramserve db upgrade --registry-url postgresql+psycopg://u:p@db/ps",
        ),
        populate=lambda sub: _add(sub, server_fields(("data_dir", "registry_url"))),
    )
    upgrade.set_defaults(handler=local_cmds.cmd_db_upgrade)
    add_flags(upgrade, LOG, guest=True)
    return parser


def _add(parser: argparse.ArgumentParser, fields) -> list:
    add_flags(parser, fields)
    return list(fields)
