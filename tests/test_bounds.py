"""Every size a client controls is bounded before the server allocates for it.

Peak memory is measured in a fresh subprocess: ``ru_maxrss`` just before the call that must be
refused and just after; the refusal must come before the allocation, so the peak barely moves.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from paramserve.registry import (InvalidArgument, NotFound, ResourceExhausted, Store,
                                 architectures)
from paramserve.registry.limits import Limits, check_config, json_outline, load_config_json
from paramserve.registry.schemes import apply_scheme, parse_scheme
from paramserve.registry.shapes import ShapeOracle
from paramserve.registry.slicing import parse_index, select
from paramserve.registry.tensorfile import build_header, canonical_order, read_header

# What a refusal may add to the peak resident memory of a process that imported torch (the
# allocations the bounds exist to prevent are 250 MB to 1.2 GB).
RSS_MARGIN_MB = 100

PEAK_PRELUDE = """
import resource, sys
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def peak_growth_mb(body: str, *args: str) -> tuple[float, str]:
    """Run ``body`` in a fresh interpreter; it prints ``GROWTH <MB>`` and ``ERROR <class>``."""
    script = PEAK_PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    values = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return float(values["GROWTH"]), values.get("ERROR", "")


REFUSED = """
def refused(call):
    before = peak_mb()
    try:
        call()
        error = "none"
    except Exception as err:
        error = type(err).__name__ + ": " + str(err)[:300]
    print("GROWTH", peak_mb() - before)
    print("ERROR", error)
"""


# ---- lazy shapes: uploads, Initialize and first requests ------------------------------------

def lazy_mlp_header(width: int) -> bytes:
    """The canonical header of a lazy ``mlp`` state_dict made for inputs ``width`` wide."""
    specs = {"hidden.weight": (256, width), "hidden.bias": (256,), "out.weight": (10, 256),
             "out.bias": (10,)}
    order = canonical_order((name, torch.float32) for name in specs)
    return build_header([(name, torch.float32, specs[name]) for name in order])


def test_a_lazy_upload_header_naming_huge_shapes_allocates_nothing(tmp_path):
    """The 184-byte header of a 1 GB lazy upload: its shapes are checked on the meta device."""
    header = lazy_mlp_header(1_000_000)
    growth, error = peak_growth_mb(REFUSED + """
from paramserve.registry import Store
store = Store(data_dir=sys.argv[1])
store.create_model("lazy", "mlp", {"in_features": None})
header = bytes.fromhex(sys.argv[2])
upload = store.begin_upload("lazy", size_bytes=len(header) + 4 * (256 * 1_000_000 + 2826))
refused(lambda: upload.write([header]))
upload.abort()
""", str(tmp_path / "data"), header.hex())
    assert growth < RSS_MARGIN_MB, (growth, error)


def test_initialize_with_a_huge_input_shape_is_refused_before_building(tmp_path):
    growth, error = peak_growth_mb(REFUSED + """
from paramserve.registry import Store
store = Store(data_dir=sys.argv[1])
store.create_model("lazy", "mlp", {"in_features": None})
refused(lambda: store.initialize("lazy", "normal(0, 0.01)", input_shape=[1, 1_000_000]))
assert store.list_versions("lazy") == []
""", str(tmp_path / "data"))
    assert growth < RSS_MARGIN_MB and error.startswith("ResourceExhausted"), (growth, error)
    assert "--max-init-elements" in error


def test_a_first_request_to_a_lazy_model_cannot_materialize_a_huge_version(tmp_path):
    """What a token-less 4 MB ModelInfer did: a 1 GB lazy-init version, stored for good."""
    growth, error = peak_growth_mb(REFUSED + """
from paramserve.registry import Store
store = Store(data_dir=sys.argv[1])
store.create_model("lazy", "mlp", {"in_features": None})
refused(lambda: store.materialize("lazy", [1, 1_000_000]))
assert store.list_versions("lazy") == []
print("LATER", store.materialize("lazy", [1, 20]).number)
""", str(tmp_path / "data"))
    assert growth < RSS_MARGIN_MB and error.startswith("ResourceExhausted"), (growth, error)


def test_a_user_architecture_whose_forward_cannot_run_on_meta_is_still_bounded(tmp_path):
    """Data-dependent control flow before a lazy layer: the real dry run counts each
    materialization before it allocates."""
    module = tmp_path / "gated_arch.py"
    module.write_text(textwrap.dedent("""
        from torch import nn
        from paramserve.registry.architectures import architecture

        class Gate(nn.Module):
            def forward(self, x):
                return x * 0 if x.sum() > 1e30 else x   # Tensor.item(): not on meta

        @architecture("gated_lazy", defaults={"in_features": 4}, example_input_shape=(2, 4))
        def gated(in_features):
            layer = nn.LazyLinear(256) if in_features is None else nn.Linear(in_features, 256)
            return nn.Sequential(Gate(), layer)
    """))
    growth, error = peak_growth_mb(REFUSED + """
sys.path.insert(0, sys.argv[2])
import gated_arch
from paramserve.registry import Store
store = Store(data_dir=sys.argv[1])
store.create_model("g", "gated_lazy", {"in_features": None})
refused(lambda: store.materialize("g", [1, 1_000_000]))
assert store.materialize("g", [2, 10]).manifest
""", str(tmp_path / "data"), str(tmp_path))
    assert growth < RSS_MARGIN_MB and error.startswith("ResourceExhausted"), (growth, error)


def test_limits_are_taken_from_the_store(tmp_path):
    with Store(data_dir=tmp_path / "data", limits=Limits(max_init_elements=1000)) as store:
        store.create_model("small", "small_mlp", {"in_features": None})  # 49 elements at 4
        assert store.materialize("small", [2, 4]).number == 1
        store.create_model("lazy", "mlp", {"in_features": None})
        with pytest.raises(ResourceExhausted, match="over the limit of 1000"):
            store.materialize("lazy", [2, 20])
        with pytest.raises(ResourceExhausted, match="over the limit of 1000"):
            store.create_model("fixed", "mlp")  # 7,946 elements
        assert [m.name for m in store.list_models()] == ["lazy", "small"]


@pytest.mark.parametrize("shape, error, message", [
    ([1] * 9, InvalidArgument, "9 dimensions, over the limit of 8"),
    ([2, 0], InvalidArgument, "must be positive"),
    ([2, -3], InvalidArgument, "must be positive"),
    ([2, 2.5], InvalidArgument, "must be integers"),
    ([2, True], InvalidArgument, "must be integers"),
    ("20", InvalidArgument, "must be integers"),
    ([10**30, 10**30], ResourceExhausted, "dry run's input"),
    ([1, 10**4000], ResourceExhausted, "dry run's input"),
])
def test_dry_run_input_shapes_are_bounded_before_any_build(store, shape, error, message):
    store.create_model("lazy", "mlp", {"in_features": None})
    with pytest.raises(error, match=message) as raised:
        store.materialize("lazy", shape)
    assert len(str(raised.value)) < 300
    assert store.list_versions("lazy") == []


# ---- architecture config values -------------------------------------------------------------

def test_rgnet_blocks_out_of_range_are_refused_before_any_build(store, monkeypatch):
    from paramserve.registry import builtin

    def must_not_build(*args, **kwargs):
        raise AssertionError("the config was built before it was checked")

    monkeypatch.setattr(builtin, "block2", must_not_build)
    with pytest.raises(InvalidArgument, match=r"'blocks' of 'rgnet' is 8000, out of its range"
                                              r" \[1, 256\]"):
        store.create_model("r", "rgnet", {"blocks": 8000})
    with pytest.raises(InvalidArgument, match="out of its range"):
        store.create_model("r", "rgnet", {"blocks": 0})
    assert store.list_models() == []


@pytest.mark.parametrize("config, error, message", [
    ({"hidden_features": 10**9}, InvalidArgument, r"out of its range \[1, 16777216\]"),
    ({"hidden_features": 10**7}, ResourceExhausted, "--max-init-elements"),
    ({"hidden_features": "256"}, InvalidArgument, "must be an integer"),
    ({"hidden_features": 256.0}, InvalidArgument, "must be an integer"),
    ({"hidden_features": True}, InvalidArgument, "must be an integer"),
    ({"hidden_features": None}, InvalidArgument, "must be an integer"),
    ({"in_features": -1}, InvalidArgument, "out of its range"),
    ({"in_features": 10**40}, InvalidArgument, "64 bits|out of its range"),
    ({"nope": 1}, InvalidArgument, "no config key"),
])
def test_fixed_size_configs_are_bounded_at_create_time(store, config, error, message):
    with pytest.raises(error, match=message):
        store.create_model("m", "mlp", config)
    assert store.list_models() == []


def test_architectures_declare_their_bounds():
    rgnet = architectures.get("rgnet")
    assert rgnet.bounds["blocks"] == (1, 256)
    assert rgnet.resolve_config({"blocks": 256})["blocks"] == 256
    assert rgnet.resolve_config({"in_features": None})["in_features"] is None
    with pytest.raises(InvalidArgument, match="not config keys"):
        architectures.architecture("bad_bounds", example_input_shape=(1,),
                                   bounds={"width": (1, 2)})(lambda: torch.nn.Identity())


def test_a_user_architectures_input_width_is_a_positive_integer_or_null(store):
    @architectures.architecture("unbounded_user_net", defaults={"in_features": 4, "seed": 0},
                                example_input_shape=(2, 4), replace=True)
    def unbounded(in_features, seed):
        return torch.nn.LazyLinear(2) if in_features is None else torch.nn.Linear(in_features, 2)

    for width in (True, 0, 2.5, "4", 2**70):
        with pytest.raises(InvalidArgument, match="input width|64 bits"):
            store.create_model("u", "unbounded_user_net", {"in_features": width})
    with pytest.raises(InvalidArgument, match="64 bits"):
        store.create_model("u", "unbounded_user_net", {"seed": -2**64})
    store.create_model("u", "unbounded_user_net", {"in_features": None, "seed": -5})
    assert [m.name for m in store.list_models()] == ["u"]


def test_too_many_submodules_are_refused_from_the_meta_build():
    oracle = ShapeOracle(Limits(max_submodules=20))
    oracle.check_build(architectures.get("rgnet"), {"blocks": 2})
    with pytest.raises(ResourceExhausted, match="--max-submodules"):
        oracle.check_build(architectures.get("rgnet"), {"blocks": 8})


# ---- safetensors headers --------------------------------------------------------------------

def million_entry_header(path) -> int:
    """A 57 MB header of a million zero-byte entries (what peaked at 1.2 GB)."""
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    raw = ("{" + ",".join(entry.format(i) for i in range(1_000_000)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return len(raw)


def test_a_million_entry_header_is_refused_before_it_is_read(tmp_path):
    size = million_entry_header(tmp_path / "h.safetensors")
    assert size > 50 << 20
    growth, error = peak_growth_mb(REFUSED + """
from paramserve.registry.tensorfile import read_header
with open(sys.argv[1], "rb") as f:
    refused(lambda: read_header(f, None))
""", str(tmp_path / "h.safetensors"))
    assert growth < RSS_MARGIN_MB and error.startswith("ResourceExhausted"), (growth, error)
    assert "--max-header-bytes" in error


def test_a_small_header_of_too_many_entries_is_refused_before_it_is_parsed(tmp_path):
    raw = ("{" + ",".join(f'"{i}":0' for i in range(1_000_000)) + "}").encode()  # 8 MB
    (tmp_path / "h").write_bytes(struct.pack("<Q", len(raw)) + raw)
    growth, error = peak_growth_mb(REFUSED + """
from paramserve.registry.tensorfile import read_header
with open(sys.argv[1], "rb") as f:
    refused(lambda: read_header(f, None))
""", str(tmp_path / "h"))
    assert growth < RSS_MARGIN_MB and error.startswith("ResourceExhausted"), (growth, error)
    assert "--max-header-entries" in error


def header_blob(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("raw, error, message", [
    (b"[" * 100_000 + b"]" * 100_000, InvalidArgument, "must be a JSON object"),
    (b"{" + b'"a":[' * 50_000 + b"]" * 50_000 + b"}", InvalidArgument, "nested 50001 deep"),
    (b'{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}', InvalidArgument,
     "nested 4 deep"),
    (b'{"a":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', InvalidArgument,
     "unknown dtype"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
     InvalidArgument, "64 bits"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,1e999]}}', InvalidArgument,
     "finite"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}', InvalidArgument,
     "not a JSON number"),
    (b'{"' + b"x" * 100_000 + b'":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}',
     InvalidArgument, "unknown dtype"),
    (b'{"a":{"dtype":"F32","shape":[' + b"1," * 100 + b'1],"data_offsets":[0,4]}}',
     InvalidArgument, "101 dimensions"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\xff', InvalidArgument,
     "not valid JSON"),
])
def test_bad_headers_answer_their_class_with_a_short_message(raw, error, message):
    blob = header_blob(raw) + b"\0" * 4
    with pytest.raises(error, match=message) as raised:
        read_header(io.BytesIO(blob), len(blob))
    assert len(str(raised.value)) < 400


def test_header_limits_are_configurable():
    raw = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                      for i in range(10)}).encode()
    blob = header_blob(raw)
    assert len(read_header(io.BytesIO(blob), len(blob)).entries) == 10
    with pytest.raises(ResourceExhausted, match="entry count is 10, over the limit of 9"):
        read_header(io.BytesIO(blob), len(blob), Limits(max_header_entries=9))
    with pytest.raises(ResourceExhausted, match="over the limit of 100 "):
        read_header(io.BytesIO(blob), len(blob), Limits(max_header_bytes=100))


def test_json_outline_skips_strings_and_escapes():
    assert json_outline(b'{"a[[": [1, [2]], "b\\"{": {"c": 1}}') == (3, 2)
    assert json_outline(b'"\\\\"[[') == (2, 1)
    assert json_outline(b"") == (0, 1)


# ---- config JSON ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, error, message", [
    ("[" * 100_000, ResourceExhausted, "--max-config-bytes"),
    ("[" * 1000 + "]" * 1000, InvalidArgument, "nested 1000 deep, over the limit of 32"),
    ('{"a": ' + "[" * 40 + "]" * 40 + "}", InvalidArgument, "nested 41 deep"),
    ('{"a": ' + "9" * 5000 + "}", InvalidArgument, "64 bits"),
    ('{"a": 18446744073709551616}', InvalidArgument, "64 bits"),
    ('{"a": 1e999}', InvalidArgument, "finite"),
    ('{"a": -Infinity}', InvalidArgument, "not a JSON number"),
    ('{"a": NaN}', InvalidArgument, "not a JSON number"),
    ("[1, 2]", InvalidArgument, "must be a JSON object"),
    ("null", InvalidArgument, "must be a JSON object"),
    ("{", InvalidArgument, "not valid JSON"),
    ("", InvalidArgument, "not valid JSON"),
    ("\ud800", InvalidArgument, "UTF-8"),
])
def test_config_json_is_bounded_before_it_is_parsed(text, error, message):
    with pytest.raises(error, match=message) as raised:
        load_config_json(text)
    assert len(str(raised.value)) < 300


def test_config_json_accepts_what_a_config_is():
    assert load_config_json('{"in_features": null, "hidden": 64, "rate": 0.5}') == {
        "in_features": None, "hidden": 64, "rate": 0.5}
    deep = '{"a": ' + "[" * 31 + "]" * 31 + "}"
    assert load_config_json(deep)["a"]
    with pytest.raises(InvalidArgument):
        load_config_json(deep, Limits(max_json_depth=8))
    with pytest.raises(ResourceExhausted, match="over the limit of 10 "):
        load_config_json('{"hidden": 64}', Limits(max_config_bytes=10))


def nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return {"a": value}


@pytest.mark.parametrize("config, error, message", [
    (nested(100_000), InvalidArgument, "nested more than 32 deep"),
    ({"a": "x" * 100_000}, ResourceExhausted, "--max-config-bytes"),
    ({f"k{i}": i for i in range(20_000)}, ResourceExhausted, "--max-config-bytes"),
    ({"a": float("nan")}, InvalidArgument, "finite"),
    ({"a": 10**5000}, InvalidArgument, "64 bits"),
    ({"a": object()}, InvalidArgument, "must be JSON"),
    ({1: 2}, InvalidArgument, "keys must be strings"),
    ([1], InvalidArgument, "must be a mapping"),
])
def test_parsed_configs_are_checked_without_recursion(config, error, message):
    with pytest.raises(error, match=message) as raised:
        check_config(config)
    assert len(str(raised.value)) < 300


def test_the_store_checks_configs_before_resolving_them(store):
    with pytest.raises(InvalidArgument, match="nested"):
        store.create_model("m", "mlp", nested(100_000))
    assert store.list_models() == []


# ---- init schemes ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("constant(10**400)", "must be a number"),
    ("constant(1" + "0" * 400 + ")", "over the limit of 256"),
    ("constant(" + "9" * 5000 + ")", "over the limit of 256"),
    ("uniform(-1e308, 1e308)", "finite number within float32"),
    ("uniform(-3e38, 3e38)", "range b - a"),
    ("constant(1e39)", "within float32"),
    ("constant(-1e39)", "within float32"),
    ("normal(0, 1e38)", "would draw values over"),
    ("normal(0, 1e308)", "within float32"),
    ("xavier_uniform(1e300)", "within float32"),
    ("constant(" + "-" * 200 + "1)", "must be a number"),
    ("constant(True)", "must be a number"),
    ("constant('1')", "must be a number"),
    ("normal(std=1, std=2)", "twice"),
    ("normal(**{'std': 1})", "no argument"),
    ("constant(\x00)", "cannot parse"),
])
def test_bad_schemes_answer_invalid_argument_naming_the_scheme(text, message):
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_scheme(text)
    assert len(str(raised.value)) < 400


@pytest.mark.parametrize("text", [
    "constant(" + "9" * 5000 + ")",               # ast.parse: over 4,300 digits
    "constant(" + "-" * 100_000 + "1)",           # the parser's own recursion
    "constant(" + "(" * 300 + "1" + ")" * 300 + ")",
    "constant([" * 1000 + "]" * 1000 + ")",
])
def test_schemes_past_the_parsers_own_limits_are_invalid_argument(text):
    with pytest.raises(InvalidArgument):
        parse_scheme(text, Limits(max_scheme_chars=1 << 20))


def test_schemes_that_overflow_a_half_precision_weight_are_refused():
    layer = torch.nn.Linear(3, 3).half()
    with pytest.raises(InvalidArgument, match="constant"):
        apply_scheme(layer, parse_scheme("constant(1e5)"), seed=0)
    with pytest.raises(InvalidArgument, match="uniform"):
        apply_scheme(layer, parse_scheme("uniform(-1e5, 1e5)"), seed=0)
    with pytest.raises(InvalidArgument, match="overflows"):
        apply_scheme(layer, parse_scheme("normal(0, 1e6)"), seed=0)
    apply_scheme(layer, parse_scheme("normal(0, 1)"), seed=0)  # a fitting one still works
    assert torch.isfinite(layer.weight).all()


def test_a_scheme_a_weight_cannot_take_is_invalid_argument():
    norm = torch.nn.LayerNorm(4)  # a 1-D weight: no fan-in for xavier
    with pytest.raises(InvalidArgument, match="xavier_uniform"):
        apply_scheme(norm, parse_scheme("xavier_uniform"), seed=0)


def test_valid_schemes_still_parse():
    assert str(parse_scheme("uniform(-3.4e38, 0)")) == "uniform(a=-3.4e+38, b=0)"
    assert parse_scheme("constant(-2)").args == {"value": -2.0}
    assert parse_scheme("normal(std=0.01)").args == {"mean": 0.0, "std": 0.01}


# ---- slices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("index, message", [
    ("9" * 40, "at most 19 digits"),
    ("-" + "9" * 40, "at most 19 digits"),
    ("9" * 19, "does not fit"),
    ("1" * 5000, "over the limit of 256"),
    ("::" + "9" * 30, "at most 19 digits"),
    ("0:" + "9" * 30, "at most 19 digits"),
    ("::" + "9" * 19, "does not fit"),
    (",".join(["0"] * 100), "100 parts"),
    ("0, 0, 0", "does not fit"),
    ("٠١", "is not an integer"),
    ("²", "is not an integer"),
    ("..., ...", "more than one"),
    ("::0", "must be positive"),
])
def test_bad_indices_answer_invalid_argument_with_a_short_message(index, message):
    weight = torch.zeros(3, 4)
    with pytest.raises(InvalidArgument, match=message) as raised:
        select(weight, parse_index(index), "w")
    assert len(str(raised.value)) < 400


def test_index_limits_are_configurable_and_valid_indices_still_select():
    weight = torch.arange(12.0).reshape(3, 4)
    assert select(weight, parse_index("1, ::2"), "w").tolist() == [4.0, 6.0]
    assert select(weight, parse_index("-1"), "w").tolist() == [8.0, 9.0, 10.0, 11.0]
    with pytest.raises(InvalidArgument, match="over the limit of 3"):
        parse_index("0, 1", Limits(max_index_chars=3))


def test_a_patch_with_a_huge_index_answers_invalid_argument(store):
    from conftest import reference_module
    store.create_model("m", "small_mlp")
    store.upload("m", reference_module("small_mlp", False).state_dict())
    with pytest.raises(InvalidArgument):
        store.patch("m", "0.weight", 1.0, index="9" * 40)
    with pytest.raises(InvalidArgument):
        store.tensor("m", "0.weight", index="1" * 5000)
    assert len(store.list_versions("m")) == 1


# ---- seeds and signatures -------------------------------------------------------------------

def test_out_of_range_seeds_are_invalid_argument(store):
    store.create_model("m", "small_mlp")
    with pytest.raises(InvalidArgument, match="seed"):
        store.initialize("m", "normal(0, 1)", seed=2**70)



def test_limits_are_positive_integers_named_by_their_flag():
    assert Limits(max_init_elements=5).max_init_elements == 5
    with pytest.raises(ValueError, match=r"max_json_depth \(--max-json-depth\) must be a "
                                         "positive integer"):
        Limits(max_json_depth=0)


def test_an_unknown_architecture_name_is_not_echoed_whole(store):
    with pytest.raises(NotFound, match="is not registered; known: \\['") as raised:
        store.create_model("m", "x" * 100_000)
    assert len(str(raised.value)) < 800
