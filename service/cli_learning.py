"""The learning commands of ``paramserve`` (grad, diff, log, train …): parser and handlers.

``add_learning_commands(command)`` is called by ``cli_parser.build_parser`` with its
``command(name, handler, help_text, examples, guests=..., ...)`` helper (a lazy subparser with
the client's global flags); the handlers are a few lines over ``Client``, like
``cli_commands``. Nothing heavy at import: the guests come from ``cli_parser``'s settings.
"""

from __future__ import annotations

from .cli_commands import _client, _named_files, _print_json, _split_ref, _table


def add_learning_commands(command) -> None:
    """Add the learning commands through cli_parser's ``command`` helper."""
    add_history_commands(command)
    add_train_command(command)
    from .cli_parser import CLIENT, LOG, OUTPUT

    _add_grad(command, CLIENT + LOG + OUTPUT)


# ---- grad (L1) --------------------------------------------------------------------------


def _add_grad(command, guests) -> None:
    grad = command(
        "grad",
        cmd_grad,
        "the gradients of a loss with respect to a model's parameters on an input (nothing "
        "is stored); prints name, shape, norm, min, max, mean, or saves the values with -o",
        [
            "paramserve grad mlp --input x.npy  # the seeds' net(X).sum().backward()",
            "paramserve grad mlp@production --input x.npy --target y.npy --loss mse",
            "paramserve grad mlp --input x.npy --param 2 --stats --json",
            "paramserve grad mlp --input x.npy --grad-output g.npy -o grads.safetensors",
        ],
        guests=guests,
    )
    grad.add_argument("ref", metavar="NAME[@REF]")
    grad.add_argument(
        "--input",
        required=True,
        action="append",
        metavar="[NAME=]FILE",
        help="a .npy file; NAME=FILE, repeated, for a model with several inputs",
    )
    grad.add_argument("--target", metavar="FILE", help="a .npy target (mse, cross_entropy)")
    grad.add_argument(
        "--loss",
        choices=("mse", "cross_entropy", "sum"),
        help="default: mse with --target, sum without (and none with --grad-output)",
    )
    grad.add_argument(
        "--grad-output",
        action="append",
        metavar="FILE",
        help="seed the backward with this .npy instead of a loss (one per output, in order)",
    )
    grad.add_argument(
        "--param",
        action="append",
        metavar="NAME",
        help="a state_dict key (2.weight) or submodule path (2), repeated (default: all)",
    )
    grad.add_argument("--stats", action="store_true", help="only norm/min/max/mean: no values")
    grad.add_argument(
        "-o", "--output", metavar="FILE", help="save the gradients as .npz or .safetensors"
    )


def cmd_grad(args) -> int:
    import numpy as np

    if args.output and args.stats:
        raise ValueError("-o saves values; --stats asks for none: use one of them")
    if args.output and not args.output.endswith((".npz", ".safetensors")):
        raise ValueError(f"-o {args.output}: name a .npz or .safetensors file")
    if args.grad_output and (args.loss or args.target):
        raise ValueError("--grad-output replaces --loss/--target: use one or the other")
    name, ref = _split_ref(args.ref)
    inputs = {
        k: np.load(v, allow_pickle=False) for k, v in _named_files(args.input, "--input").items()
    }
    target = np.load(args.target, allow_pickle=False) if args.target else None
    seeds = [np.load(f, allow_pickle=False) for f in args.grad_output or ()]
    loss = None if seeds else (args.loss or ("mse" if target is not None else "sum"))
    with _client(args) as client:
        result = client.gradients(
            name,
            inputs[""] if list(inputs) == [""] else inputs,
            loss=loss,
            targets=target,
            grad_outputs=seeds or None,
            params=args.param,
            stats_only=args.stats,
            ref=ref,
        )
    if args.output:
        _save(args.output, result.grads)
    if args.json:
        _print_json(
            {
                "model": name,
                "version": result.version,
                "loss": result.loss,
                "gradients": [
                    {
                        "name": k,
                        **{
                            f: getattr(s, f)
                            for f in ("shape", "dtype", "norm", "min", "max", "mean")
                        },
                        "tied_with": list(s.tied_with),
                    }
                    for k, s in result.stats.items()
                ],
                **({"saved": args.output} if args.output else {}),
            }
        )
        return 0
    shown = "" if result.loss is None else f"loss {loss} = {result.loss:.6g}, "
    print(f"{name} version {result.version}: {shown}{len(result.stats)} gradients")
    if not result.stats:
        print("(the model has no parameters: nothing to differentiate)")
    else:
        _table(
            [
                [
                    k,
                    list(s.shape),
                    s.dtype,
                    f"{s.norm:.6g}",
                    f"{s.min:.6g}",
                    f"{s.max:.6g}",
                    f"{s.mean:.6g}",
                    ",".join(s.tied_with),
                ]
                for k, s in result.stats.items()
            ],
            ["NAME", "SHAPE", "DTYPE", "NORM", "MIN", "MAX", "MEAN", "TIED WITH"],
        )
    if args.output:
        print(f"saved {len(result.grads)} gradients to {args.output}")
    return 0


def _save(path: str, grads: dict) -> None:
    if path.endswith(".npz"):
        from .client_files import write_npz

        with open(path, "wb") as file:
            write_npz(file, grads)
        return
    from safetensors.numpy import save_file

    save_file({k: v for k, v in grads.items()}, path)


# ---- train (L2) ---------------------------------------------------------------------------


def add_train_command(command) -> None:
    train = command(
        "train",
        cmd_train,
        "training steps on the server: the loss of a batch, its gradients and an optimizer "
        "step, each step a new version (origin update) whose parent is the one before",
        [
            "paramserve train mlp --input X.npy --target Y.npy --loss mse "
            "--optimizer 'sgd(lr=0.03)'",
            "paramserve train mlp@production --input X.npy --target Y.npy --loss mse "
            "--optimizer 'adam(lr=1e-3, betas=(0.9, 0.999))' --steps 100",
        ],
    )
    train.add_argument("ref", metavar="NAME[@REF]", help="REF: the latest, or an alias it moves")
    train.add_argument("--input", required=True, metavar="FILE", help="the batch's inputs, .npy")
    train.add_argument("--target", metavar="FILE", help="the targets, .npy (mse, cross_entropy)")
    train.add_argument("--loss", required=True, choices=("mse", "cross_entropy", "sum"))
    train.add_argument(
        "--optimizer",
        required=True,
        metavar="SPEC",
        help="sgd(lr, momentum=0, weight_decay=0) or adam(lr, betas=(0.9, 0.999), eps=1e-8, "
        "weight_decay=0); its state continues from the parent version",
    )
    train.add_argument(
        "--steps",
        type=int,
        default=1,
        metavar="N",
        help="steps on the same batch, one version each (1)",
    )
    train.add_argument("--note", default="", help="recorded with each new version")


MAX_CLI_STEPS = 100_000


def cmd_train(args) -> int:
    import numpy as np

    from .cli_commands import _client, _split_ref

    if not 1 <= args.steps <= MAX_CLI_STEPS:
        raise ValueError(f"--steps must be in 1..{MAX_CLI_STEPS}, not {args.steps}")
    name, ref = _split_ref(args.ref)
    x = np.load(args.input, allow_pickle=False)
    y = np.load(args.target, allow_pickle=False) if args.target else None
    with _client(args) as client:
        for step in range(args.steps):
            version, loss = client.train(
                name, x, y, loss=args.loss, optimizer=args.optimizer, ref=ref, note=args.note
            )
            print(
                f"step {step + 1}: loss {loss:.6g} → {name} version {version.number} "
                f"(parent {version.parent})"
            )
    return 0


# ---- diff and history (L3) ----------------------------------------------------------------


def add_history_commands(command) -> None:
    diff = command(
        "diff",
        cmd_diff,
        "compare two versions tensor by tensor (read from the blobs, never whole): "
        "max abs difference, L2 norm of the difference, relative change, changed elements",
        [
            "paramserve diff mlp@1 mlp@2",
            "paramserve diff mlp@production mlp --all --json",
        ],
    )
    diff.add_argument("a", metavar="NAME@A")
    diff.add_argument("b", metavar="NAME@B", help="another model with the same keys works too")
    diff.add_argument("--all", action="store_true", help="list unchanged tensors too")
    log = command(
        "log",
        cmd_log,
        "a model's versions newest first, like git log: origin, parent, author, note, what "
        "made each one and the aliases at it; NAME@REF follows REF's parent chain only",
        ["paramserve log mlp", "paramserve log mlp@production --json"],
    )
    log.add_argument("ref", metavar="NAME[@REF]")


def cmd_diff(args) -> int:
    from .cli_commands import _client, _print_json, _split_ref, _table

    name_a, ref_a = _split_ref(args.a)
    name_b, ref_b = _split_ref(args.b)
    with _client(args) as client:
        result = client.diff(name_a, ref_a, ref_b, name_b=name_b, all_tensors=args.all)
    a, b = result["a"], result["b"]
    if args.json:
        _print_json(
            {
                "a": f"{a.model}@{a.number}",
                "b": f"{b.model}@{b.number}",
                **{k: result[k] for k in ("identical", "tensors", "changed", "diffs")},
            }
        )
        return 0
    head = f"{a.model}@{a.number} .. {b.model}@{b.number}: "
    if result["identical"]:
        print(head + f"identical (one blob, sha256 {a.sha256[:12]})")
    else:
        print(head + f"{result['changed']} of {result['tensors']} tensors differ")
    rows = [
        [
            d["name"],
            d["status"],
            f"{d['changed_elements']}/{d['elements']}",
            f"{d['max_abs_diff']:.6g}",
            f"{d['l2_diff']:.6g}",
            f"{d['relative_change']:.6g}",
        ]
        for d in result["diffs"]
    ]
    if rows:
        _table(rows, ["TENSOR", "STATUS", "CHANGED", "MAX_ABS", "L2", "RELATIVE"])
    return 0


def cmd_log(args) -> int:
    from paramserve.registry.provenance import summary

    from .cli_commands import _client, _print_json, _split_ref

    name, ref = _split_ref(args.ref)
    with _client(args) as client:
        versions = client.log(name)
    if ref is not None:
        versions = _chain(versions, _number(versions, ref))
    if args.json:
        _print_json([_log_entry(v) for v in versions])
        return 0
    for i, v in enumerate(versions):
        aliases = f" ({', '.join(v.aliases)})" if v.aliases else ""
        parent = f" parent {v.parent}" if v.parent else ""
        print(f"version {v.number}{aliases}: {v.origin}{parent}")
        if v.author:
            print(f"Author: {v.author}")
        print(f"Date:   {v.created_at.isoformat(timespec='seconds')}")
        print(f"sha256: {v.sha256}")
        made = summary(v.provenance)
        if made:
            print(f"\n    {v.origin}: {made}")
        if v.note:
            print()
            for line in v.note.splitlines():
                print(f"    {line}")
        if i + 1 < len(versions):
            print()
    return 0


def _log_entry(v) -> dict:
    return {
        "number": v.number,
        "origin": v.origin,
        "parent": v.parent,
        "created_at": v.created_at.isoformat(),
        "author": v.author,
        "note": v.note,
        "provenance": dict(v.provenance),
        "aliases": list(v.aliases),
        "sha256": v.sha256,
    }


def _number(versions, ref: str) -> int:
    """A version number or an alias among ``versions``."""
    for v in versions:
        if ref == str(v.number) or ref in v.aliases:
            return v.number
    if ref == "latest" and versions:
        return versions[0].number
    raise ValueError(f"no version or alias {ref!r}; versions: {[v.number for v in versions][:20]}")


def _chain(versions, start: int) -> list:
    """``start`` and its ancestors (parent by parent), newest first."""
    by_number = {v.number: v for v in versions}
    out, number, seen = [], start, set()
    while number in by_number and number not in seen:
        seen.add(number)
        out.append(by_number[number])
        number = by_number[number].parent
    return out
