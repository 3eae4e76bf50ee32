"""Named, parameterized init schemes, as the builders' guide applies them with ``net.apply``.

>>> scheme = parse_scheme("normal(mean=0, std=0.01)")
>>> apply_scheme(module, scheme, seed=0)

A scheme acts on every module in the target subtree that owns a ``weight`` parameter (Linear,
LazyLinear once materialized, MyLinear), each visited once even when shared (tied):

| scheme              | weight                                  | bias |
|---------------------|-----------------------------------------|------|
| ``default``         | the layer's own ``reset_parameters()``  | same |
| ``normal(mean,std)``| N(mean, std²)                           | 0    |
| ``zeros``           | 0                                       | 0    |
| ``constant(v)``     | v                                       | 0    |
| ``xavier_uniform``  | Xavier/Glorot uniform                   | kept |
| ``uniform(a,b)``    | U(a, b)                                 | kept |
| ``my_init``         | U(-10, 10), then 0 where \\|w\\| < 5    | kept |

Biases follow the guide's ``init_normal`` / ``init_constant`` (zeroed) and ``init_xavier`` /
``my_init`` (left alone). ``bias=keep`` or ``bias=zero`` overrides that for any scheme but
``default``: ``constant(42, bias=keep)`` is the guide's ``init_42`` (weights only), applied to
``net[2]`` with a module path. The same seed gives the same parameters, bit for bit.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import seeded
from .errors import InvalidArgument
from .limits import DEFAULT_LIMITS, Limits, brief, flag

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class SchemeDef:
    params: tuple[tuple[str, float | None], ...]  # (name, default or None when required)
    weight: Callable[..., object]  # called for its effect on the weight; what it returns is unused
    zero_bias: bool
    doc: str


def _my_init(weight: torch.Tensor) -> None:
    nn.init.uniform_(weight, -10, 10)
    weight.mul_(weight.abs() >= 5)


SCHEMES: dict[str, SchemeDef] = {
    "default": SchemeDef((), lambda w: None, False, "each layer's own reset_parameters()"),
    "normal": SchemeDef(
        (("mean", 0.0), ("std", 0.01)),
        lambda w, mean, std: nn.init.normal_(w, mean, std),
        True,
        "weight ~ N(mean, std^2), bias 0",
    ),
    "zeros": SchemeDef((), nn.init.zeros_, True, "weight 0, bias 0"),
    "constant": SchemeDef(
        (("value", None),),
        lambda w, value: nn.init.constant_(w, value),
        True,
        "weight = value, bias 0",
    ),
    "xavier_uniform": SchemeDef(
        (("gain", 1.0),),
        lambda w, gain: nn.init.xavier_uniform_(w, gain),
        False,
        "Xavier/Glorot uniform weight, bias kept",
    ),
    "uniform": SchemeDef(
        (("a", 0.0), ("b", 1.0)),
        lambda w, a, b: nn.init.uniform_(w, a, b),
        False,
        "weight ~ U(a, b), bias kept",
    ),
    "my_init": SchemeDef(
        (), _my_init, False, "the guide's custom init: U(-10, 10), then 0 where |w| < 5; bias kept"
    ),
}


BIAS_CHOICES = ("keep", "zero")


@dataclass(frozen=True)
class Scheme:
    name: str
    args: dict[str, float] = field(default_factory=dict)
    bias: str | None = None  # "keep" / "zero"; None: the scheme's own (the table above)

    def __str__(self) -> str:
        parts = [f"{k}={v:g}" for k, v in self.args.items()]
        parts += [f"bias={self.bias}"] if self.bias else []
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    def zeroes_bias(self) -> bool:
        return SCHEMES[self.name].zero_bias if self.bias is None else self.bias == "zero"


def describe_schemes() -> str:
    return (
        "; ".join(
            f"{name}({', '.join(p for p, _ in d.params)})" if d.params else name
            for name, d in SCHEMES.items()
        )
        + "; any but default takes bias=keep|zero, e.g. constant(42, bias=keep)"
    )


def parse_scheme(text: str, limits: Limits = DEFAULT_LIMITS) -> Scheme:
    """``"normal(0, 0.01)"``, ``"normal(std=0.01)"``, ``"zeros"`` … → a validated Scheme.

    Only plain numbers are accepted as arguments, finite and within float32's range, so the
    text never reaches ``eval`` and a scheme cannot overflow the weights it fills.
    """
    text = (text or "").strip()
    if len(text) > limits.max_scheme_chars:
        raise InvalidArgument(
            f"init scheme {brief(text, 40)} is {len(text)} characters, over "
            f"the limit of {limits.max_scheme_chars} ({flag('max_scheme_chars')}"
            f"); write NAME or NAME(ARGS), one of: {describe_schemes()}"
        )
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        node = None  # ValueError: a NUL byte or an integer literal over 4,300 digits
    if isinstance(node, ast.Name):
        name, positional, keywords = node.id, [], []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, positional, keywords = node.func.id, node.args, node.keywords
    else:
        raise InvalidArgument(
            f"cannot parse init scheme {brief(text)}; write NAME or "
            f"NAME(ARGS), one of: {describe_schemes()}"
        )
    definition = SCHEMES.get(name)
    if definition is None:
        raise InvalidArgument(f"unknown init scheme {brief(name)}; known: {describe_schemes()}")
    names = [p for p, _ in definition.params]
    if len(positional) > len(names):
        raise InvalidArgument(
            f"scheme {name!r} takes {len(names)} argument(s) {names}, got {len(positional)}"
        )
    bias_given = [k for k in keywords if k.arg == "bias"]
    keywords = [k for k in keywords if k.arg != "bias"]
    bias = _bias(bias_given, name)
    args: dict[str, float] = {}
    for key, value in list(zip(names, positional)) + [(k.arg, k.value) for k in keywords]:
        if key not in names:
            raise InvalidArgument(f"scheme {name!r} has no argument {brief(key)}; it takes {names}")
        if key in args:
            raise InvalidArgument(f"scheme {name!r} is given argument {key!r} twice")
        args[key] = _number(value, name, key)
    for key, default in definition.params:
        if key not in args:
            if default is None:
                raise InvalidArgument(
                    f"scheme {name!r} needs argument {key!r}, e.g. {name}({key}=1)"
                )
            args[key] = default
    if name == "normal" and args["std"] < 0:
        raise InvalidArgument("normal(std) must be >= 0")
    if name == "uniform":
        if args["a"] > args["b"]:
            raise InvalidArgument(
                f"uniform(a, b) needs a <= b, got a={args['a']:g}, b={args['b']:g}"
            )
        if args["b"] - args["a"] > FLOAT32_MAX:
            raise InvalidArgument(
                f"uniform(a, b): the range b - a = {args['b'] - args['a']:g} "
                f"is over float32's largest value {FLOAT32_MAX:g}"
            )
    if name == "normal" and abs(args["mean"]) + 6 * args["std"] > FLOAT32_MAX:
        raise InvalidArgument(
            f"normal(mean, std) would draw values over float32's largest "
            f"value {FLOAT32_MAX:g}; use a smaller mean or std"
        )
    return Scheme(name, args, bias)


def _bias(given: list[ast.keyword], scheme: str) -> str | None:
    """``bias=keep`` / ``bias=zero`` (a bare word or a string), or None when not given."""
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgument(f"scheme {scheme!r} is given argument 'bias' twice")
    if scheme == "default":
        raise InvalidArgument(
            "scheme 'default' re-runs each layer's reset_parameters(), bias included; "
            "bias=keep|zero is for the other schemes"
        )
    node = given[0].value
    word = node.id if isinstance(node, ast.Name) else getattr(node, "value", None)
    if word not in BIAS_CHOICES:
        raise InvalidArgument(
            f"argument 'bias' of scheme {scheme!r} is keep (leave biases alone, the guide's "
            "init_42) or zero, e.g. constant(42, bias=keep)"
        )
    return str(word)


def _number(node: ast.AST, scheme: str, key: str) -> float:
    """A literal int or float, optionally signed: nothing else is evaluated."""
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        node = node.operand
    if not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
        raise InvalidArgument(
            f"argument {key!r} of scheme {scheme!r} must be a number like 0.01 or -2"
        )
    number = node.value
    assert isinstance(number, (int, float))  # its type() was checked just above
    try:
        value = sign * float(number)
    except OverflowError:  # an integer literal beyond any float
        value = math.inf
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise InvalidArgument(
            f"argument {key!r} of scheme {scheme!r} must be a finite number "
            f"within float32's range (|x| <= {FLOAT32_MAX:g})"
        )
    return value


def apply_scheme(module: nn.Module, scheme: Scheme, seed: int) -> list[str]:
    """Re-initialize ``module`` in place; returns the names of the submodules it touched."""
    definition = SCHEMES[scheme.name]
    touched = []
    with seeded(seed), torch.no_grad():
        for name, sub in module.named_modules():  # named_modules visits a shared layer once
            weight = sub._parameters.get("weight")
            if weight is None:
                continue
            if scheme.name == "default":
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
                    touched.append(name)
                continue
            try:
                definition.weight(weight, **scheme.args)
            except (RuntimeError, ValueError, OverflowError) as err:
                raise InvalidArgument(
                    f"init scheme {scheme} does not fit {name or 'the module'!r}"
                    f" ({weight.dtype}[{', '.join(map(str, weight.shape))}]):"
                    f" {str(err).splitlines()[0][:160]}"
                ) from err
            if (
                weight.is_floating_point()
                and weight.device.type != "meta"
                and not bool(torch.isfinite(weight).all())
            ):
                raise InvalidArgument(
                    f"init scheme {scheme} overflows {weight.dtype} in "
                    f"{name or 'the module'!r}; use smaller arguments"
                )
            bias = sub._parameters.get("bias")
            if scheme.zeroes_bias() and bias is not None:
                nn.init.zeros_(bias)
            touched.append(name)
    return touched
