"""The built-in architectures: the modules of the builders' guide, faithfully.

Each takes ``in_features`` (the seed's number by default); ``in_features=None`` builds the
``LazyLinear`` variant, whose shapes are inferred from the first input.
The module classes are importable, so a user can build the same module in-process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from .architectures import Input, architecture


def linear(in_features: int | None, out_features: int) -> nn.Module:
    """``nn.Linear``, or ``nn.LazyLinear`` when the input width is not known yet."""
    if in_features is None:
        return nn.LazyLinear(out_features)
    return nn.Linear(in_features, out_features)


class MLP(nn.Module):
    """One hidden layer with ReLU, as written in the guide (``hidden``, ``out``)."""

    def __init__(
        self, in_features: int | None = 20, hidden_features: int = 256, out_features: int = 10
    ):
        super().__init__()
        self.hidden = linear(in_features, hidden_features)
        self.out = linear(None if in_features is None else hidden_features, out_features)

    def forward(self, X):
        return self.out(F.relu(self.hidden(X)))


class MySequential(nn.Module):
    """A hand-written ``nn.Sequential``: children run in the order they were added."""

    def __init__(self, *args: nn.Module):
        super().__init__()
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def forward(self, X):
        for module in self.children():
            X = module(X)
        return X


class FixedHiddenMLP(nn.Module):
    """A constant random matrix between two uses of one linear layer, then a halving loop.

    ``rand_weight`` is a persistent buffer (the guide keeps it as a plain attribute), so it is
    saved with the parameters and a stored version reproduces the outputs exactly.
    """

    def __init__(self, in_features: int | None = 20, features: int = 20):
        super().__init__()
        self.register_buffer("rand_weight", torch.rand((features, features)))
        self.linear = linear(in_features, features)

    def forward(self, X):
        X = self.linear(X)
        X = F.relu(X @ self.rand_weight + 1)
        X = self.linear(X)
        # The guide's loop; the isfinite check keeps an inf input from looping forever.
        while X.abs().sum() > 1 and torch.isfinite(X).all():
            X /= 2
        return X.sum()


class NestMLP(nn.Module):
    """A Sequential inside a module, then a linear layer."""

    def __init__(self, in_features: int | None = 20):
        super().__init__()
        lazy = in_features is None
        self.net = nn.Sequential(
            linear(in_features, 64), nn.ReLU(), linear(None if lazy else 64, 32), nn.ReLU()
        )
        self.linear = linear(None if lazy else 32, 16)

    def forward(self, X):
        return self.linear(self.net(X))


class CenteredLayer(nn.Module):
    """Subtracts the mean of the whole input (mixes rows: never batch requests together)."""

    def forward(self, X):
        return X - X.mean()


class MyLinear(nn.Module):
    """A fully connected layer with ReLU built from two ``nn.Parameter``s (weight is in×out)."""

    def __init__(self, in_units: int, units: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_units, units))
        self.bias = nn.Parameter(
            torch.randn(
                units,
            )
        )

    def forward(self, X):
        linear = torch.matmul(X, self.weight.data) + self.bias.data
        return F.relu(linear)


class LazyMyLinear(LazyModuleMixin, MyLinear):
    """``MyLinear`` whose ``in_units`` is taken from the first input, as ``LazyLinear`` does."""

    cls_to_become = MyLinear
    # Uninitialized until the first input, as in torch's own LazyLinear. The ignores: torch's
    # parameter.pyi makes UninitializedParameter a Tensor, not the Parameter subclass it is.
    weight: UninitializedParameter  # type: ignore[assignment]
    bias: UninitializedParameter  # type: ignore[assignment]

    def __init__(self, units: int):
        super().__init__(0, 0)  # LazyModuleMixin registers its hooks; real shapes come later
        self.weight = UninitializedParameter()
        self.bias = UninitializedParameter()
        self.units = units

    def initialize_parameters(self, X) -> None:
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.weight.materialize((X.shape[-1], self.units))
                self.bias.materialize((self.units,))
                self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params():
            with torch.no_grad():
                self.weight.normal_()
                self.bias.normal_()


def my_linear(in_units: int | None, units: int) -> nn.Module:
    return LazyMyLinear(units) if in_units is None else MyLinear(in_units, units)


def block1(in_features: int | None) -> nn.Sequential:
    lazy = in_features is None
    return nn.Sequential(
        linear(in_features, 8), nn.ReLU(), linear(None if lazy else 8, 4), nn.ReLU()
    )


def block2(in_features: int | None, blocks: int = 4) -> nn.Sequential:
    net = nn.Sequential()
    for i in range(blocks):
        net.add_module(f"block {i}", block1(in_features if i == 0 or in_features is None else 4))
    return net


MAX_WIDTH = 1 << 24  # any one layer's width; what a whole config makes is bounded by elements
MAX_BLOCKS = 256  # rgnet's block1s: the guide has 4


def _widths(*keys: str) -> dict[str, tuple[int, int]]:
    return {key: (1, MAX_WIDTH) for key in keys}


def _next(in_features: int | None, width: int) -> int | None:
    """The input width of the layer after one of ``width`` outputs (None stays lazy)."""
    return None if in_features is None else width


@architecture(
    "sequential_mlp",
    defaults={"in_features": 20, "hidden": 256, "out_features": 10},
    doc="nn.Sequential(Linear(20, 256), ReLU(), Linear(256, 10))",
    example_input_shape=(2, 20),
    bounds=_widths("in_features", "hidden", "out_features"),
)
def sequential_mlp(in_features, hidden, out_features):
    return nn.Sequential(
        linear(in_features, hidden), nn.ReLU(), linear(_next(in_features, hidden), out_features)
    )


@architecture(
    "mlp",
    defaults={"in_features": 20, "hidden_features": 256, "out_features": 10},
    doc="The MLP class: self.hidden 20→256, ReLU, self.out 256→10",
    example_input_shape=(2, 20),
    bounds=_widths("in_features", "hidden_features", "out_features"),
)
def mlp(in_features, hidden_features, out_features):
    return MLP(in_features, hidden_features, out_features)


@architecture(
    "my_sequential",
    defaults={"in_features": 20, "hidden": 256, "out_features": 10},
    doc="MySequential(Linear(20, 256), ReLU(), Linear(256, 10))",
    example_input_shape=(2, 20),
    bounds=_widths("in_features", "hidden", "out_features"),
)
def my_sequential(in_features, hidden, out_features):
    return MySequential(
        linear(in_features, hidden), nn.ReLU(), linear(_next(in_features, hidden), out_features)
    )


@architecture(
    "fixed_hidden_mlp",
    defaults={"in_features": 20, "features": 20},
    doc="FixedHiddenMLP: constant rand_weight buffer, shared linear, returns a scalar",
    example_input_shape=(2, 20),
    batchable=False,
    bounds=_widths("in_features", "features"),
)
def fixed_hidden_mlp(in_features, features):
    if in_features is not None and in_features != features:
        raise ValueError(
            f"in_features ({in_features}) must equal features ({features}): "
            "the forward applies the same linear layer twice"
        )
    return FixedHiddenMLP(in_features, features)


@architecture(
    "nest_mlp",
    defaults={"in_features": 20},
    doc="NestMLP: Sequential(20→64, ReLU, 64→32, ReLU) then Linear(32, 16)",
    example_input_shape=(2, 20),
    bounds=_widths("in_features"),
)
def nest_mlp(in_features):
    return NestMLP(in_features)


@architecture(
    "chimera",
    defaults={"in_features": 20},
    doc="Sequential(NestMLP(), Linear(16, 20), FixedHiddenMLP()); returns a scalar",
    example_input_shape=(2, 20),
    batchable=False,
    bounds=_widths("in_features"),
)
def chimera(in_features):
    return nn.Sequential(
        NestMLP(in_features),
        linear(_next(in_features, 16), 20),
        FixedHiddenMLP(_next(in_features, 20), 20),
    )


@architecture(
    "small_mlp",
    defaults={"in_features": 4, "hidden": 8, "out_features": 1},
    doc="nn.Sequential(Linear(4, 8), ReLU(), Linear(8, 1)) of the parameter sections",
    example_input_shape=(2, 4),
    bounds=_widths("in_features", "hidden", "out_features"),
)
def small_mlp(in_features, hidden, out_features):
    return nn.Sequential(
        linear(in_features, hidden), nn.ReLU(), linear(_next(in_features, hidden), out_features)
    )


@architecture(
    "rgnet",
    defaults={"in_features": 4, "blocks": 4},
    doc='Sequential(block2() of "block i" block1s, Linear(4, 1))',
    example_input_shape=(2, 4),
    bounds={**_widths("in_features"), "blocks": (1, MAX_BLOCKS)},
)
def rgnet(in_features, blocks):
    return nn.Sequential(block2(in_features, blocks), linear(_next(in_features, 4), 1))


@architecture(
    "tied_mlp",
    defaults={"in_features": 4},
    doc="One shared Linear(8, 8) at positions 2 and 4 (tied parameters)",
    example_input_shape=(2, 4),
    bounds=_widths("in_features"),
)
def tied_mlp(in_features):
    shared = linear(_next(in_features, 8), 8)
    return nn.Sequential(
        linear(in_features, 8),
        nn.ReLU(),
        shared,
        nn.ReLU(),
        shared,
        nn.ReLU(),
        linear(_next(in_features, 8), 1),
    )


@architecture(
    "centered_layer",
    defaults={},
    doc="CenteredLayer: X - X.mean(), no parameters",
    example_input_shape=(5,),
    batchable=False,
)
def centered_layer():
    return CenteredLayer()


@architecture(
    "centered_mlp",
    defaults={"in_features": 8, "out_features": 128},
    doc="nn.Sequential(Linear(8, 128), CenteredLayer())",
    example_input_shape=(4, 8),
    batchable=False,
    bounds=_widths("in_features", "out_features"),
)
def centered_mlp(in_features, out_features):
    return nn.Sequential(linear(in_features, out_features), CenteredLayer())


@architecture(
    "my_linear_net",
    defaults={"in_features": 64},
    doc="nn.Sequential(MyLinear(64, 8), MyLinear(8, 1))",
    example_input_shape=(2, 64),
    bounds=_widths("in_features"),
)
def my_linear_net(in_features):
    return nn.Sequential(my_linear(in_features, 8), my_linear(_next(in_features, 8), 1))


class AddSub(nn.Module):
    """Triton's ``simple`` example model: the sum and the difference of two tensors."""

    def forward(self, INPUT0, INPUT1):  # noqa: N803  (Triton's names, positional)
        return INPUT0 + INPUT1, INPUT0 - INPUT1


@architecture(
    "simple",
    defaults={},
    doc="Triton's simple example: INT32 INPUT0, INPUT1 [-1, 16] -> OUTPUT0 sum, OUTPUT1 diff",
    inputs=[
        Input("INPUT0", torch.int32, (-1, 16)),
        Input("INPUT1", torch.int32, (-1, 16)),
    ],
    outputs=["OUTPUT0", "OUTPUT1"],
)
def simple():
    return AddSub()
