"""Property-based tests of the core's parsers: refs, names, config JSON, init schemes, tensor
indices and safetensors headers. Whatever the input, the answer is a value or a
``ParamserveError`` (which the edge maps to a status code; anything else would be INTERNAL),
and its message is one bounded line."""

from __future__ import annotations

import io
import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserve.registry import Store, architectures
from paramserve.registry.errors import InvalidStateDict, ParamserveError
from paramserve.registry.limits import Limits, check_config, load_config_json
from paramserve.registry.names import check_alias, check_name
from paramserve.registry.refs import parse_ref
from paramserve.registry.schemes import SCHEMES, apply_scheme, parse_scheme
from paramserve.registry.shapes import ShapeOracle
from paramserve.registry.slicing import parse_index, select, split_param
from paramserve.registry.tensorfile import DTYPES, read_header

from conftest import reference_module

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
MAX_MESSAGE_CHARS = 1000


def answer(call):
    """The call's value, or the ParamserveError it raised (checked to be one short line, but
    for ``InvalidStateDict``, which lists every problem on a line of its own); any other
    exception fails the test."""
    try:
        return call()
    except ParamserveError as err:
        message = str(err)
        assert len(message) <= MAX_MESSAGE_CHARS, message[:2000]
        assert "\n" not in message or isinstance(err, InvalidStateDict), message[:2000]
        return err


# ---- strategies ---------------------------------------------------------------------------

huge_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([
    10**19, 2**63, -2**63 - 1, 2**64, 10**40, 10**400]))
numbers_text = st.one_of(
    st.integers(-10**6, 10**6).map(str), huge_ints.map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e999", "-1e308", "1e38", "3.5e38", "NaN", "inf", "Infinity", "-0",
                     "9" * 40, "1" * 5000, "0x10", "1_000", "²", "٠١", "1e", ".", ""]))
digits = st.text(alphabet="0123456789٠١²³", max_size=30)
refs = st.one_of(st.none(), st.integers(-2**70, 2**70), digits, numbers_text,
                 st.sampled_from(["latest", "", " ", "production", "prod\n", "a\x00b",
                                  "x" * 200, "-1", "+1", "1 ", "01", "v1"]),
                 st.text(max_size=40))

json_scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.floats(),
                         st.text(max_size=10))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def render(value) -> str:
    """JSON text for ``value``, NaN/Infinity and huge integers included (json.dumps writes
    both), so the parser meets them as a client would send them."""
    return json.dumps(value, allow_nan=True)


config_texts = st.one_of(
    st.text(max_size=60),
    json_values.map(render),
    st.dictionaries(st.sampled_from(["in_features", "hidden", "hidden_features", "blocks",
                                     "out_features", "features", "x"]),
                    json_scalars, max_size=4).map(render),
    st.builds(lambda depth, opener: "{\"a\": " + opener * depth + "}",
              st.integers(0, 5000), st.sampled_from(["[", "{\"b\": ", "[[1,"])),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 3000)),
    numbers_text.map(lambda t: '{"hidden": ' + t + "}"),
)

scheme_texts = st.one_of(
    st.text(max_size=40),
    st.builds(lambda name, args: f"{name}({', '.join(args)})",
              st.sampled_from(sorted(SCHEMES) + ["nope", "__import__", "constant.x"]),
              st.lists(st.one_of(numbers_text, numbers_text.map(lambda t: "-" + t),
                                 st.builds(lambda k, v: f"{k}={v}",
                                           st.sampled_from(["mean", "std", "a", "b", "gain",
                                                            "value", "x"]),
                                           numbers_text),
                                 st.sampled_from(["[1]", "(1)", "'1'", "True", "1j", "x",
                                                  "**{}", "*[]", "-" * 50 + "1"])),
                       max_size=3)),
)

index_parts = st.one_of(
    huge_ints.map(str), numbers_text, st.just("..."), st.just(":"),
    st.builds(lambda a, b, c: f"{a}:{b}:{c}", *(st.one_of(st.just(""), huge_ints.map(str),
                                                         numbers_text),) * 3),
)
index_texts = st.one_of(st.none(), st.text(max_size=40),
                        st.lists(index_parts, max_size=70).map(", ".join))

dtype_names = st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=5),
                        st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
entries = st.fixed_dictionaries({}, optional={
    "dtype": dtype_names,
    "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=4), json_values,
                       st.lists(st.integers(0, 2), min_size=60, max_size=70)),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-2, 64), huge_ints), max_size=3),
                              json_values),
})
header_values = st.dictionaries(
    st.one_of(st.text(max_size=6), st.just("__metadata__")),
    st.one_of(entries, json_values), max_size=5)


def blob_of(raw: bytes, data: bytes, claimed: int | None) -> bytes:
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


header_blobs = st.one_of(
    st.binary(max_size=64),
    st.builds(blob_of, header_values.map(lambda h: render(h).encode()),
              st.binary(max_size=32), st.one_of(st.none(), st.integers(0, 2**64 - 1))),
    st.builds(blob_of, config_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
              st.binary(max_size=8), st.none()),
    st.builds(blob_of, st.builds(lambda n: b"{\"a\":" + b"[" * n + b"]" * n + b"}",
                                 st.integers(0, 20_000)), st.just(b""), st.none()),
)


# ---- refs and names -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory):
    with Store(data_dir=tmp_path_factory.mktemp("fuzz-inputs") / "data") as store:
        store.create_model("m", "small_mlp")
        store.upload("m", reference_module("small_mlp", False).state_dict(), alias="prod")
        yield store


@FUZZ
@given(ref=refs)
def test_refs_parse_to_one_canonical_form_or_are_refused(ref):
    parsed = answer(lambda: parse_ref(ref))
    if not isinstance(parsed, ParamserveError):
        assert parsed is None or type(parsed) in (int, str)
        assert answer(lambda: parse_ref(parsed)) == parsed  # canonical: a fixed point


@FUZZ
@given(ref=refs)
def test_any_ref_resolves_or_answers_a_paramserve_error(fuzz_store, ref):
    version = answer(lambda: fuzz_store.resolve("m", ref))
    if not isinstance(version, ParamserveError):
        assert version.number == 1


@FUZZ
@given(name=st.one_of(st.text(max_size=200), digits, numbers_text,
                     st.sampled_from(["latest", "a\n", "a\x00", "a" * 129, "a" * 128, "-a"])))
def test_names_and_aliases_are_valid_or_invalid_argument(fuzz_store, name):
    for check in (check_name, check_alias):
        answer(lambda: check(name))
    answer(lambda: fuzz_store.get_model(name))


# ---- configs ------------------------------------------------------------------------------

@FUZZ
@given(text=config_texts, arch=st.sampled_from(["mlp", "rgnet", "fixed_hidden_mlp",
                                                 "my_linear_net", "centered_layer"]))
def test_config_text_parses_resolves_and_builds_or_is_refused(text, arch):
    limits = Limits(max_init_elements=1 << 22)
    config = answer(lambda: load_config_json(text, limits))
    if isinstance(config, ParamserveError):
        return
    assert isinstance(config, dict)
    assert answer(lambda: check_config(config, limits)) is None
    architecture = architectures.get(arch)
    resolved = answer(lambda: architecture.resolve_config(config))
    if not isinstance(resolved, ParamserveError):
        answer(lambda: ShapeOracle(limits).check_build(architecture, resolved))


@FUZZ
@given(config=json_values)
def test_parsed_configs_are_checked_or_refused(config):
    result = answer(lambda: check_config(config))
    if not isinstance(result, ParamserveError):
        assert isinstance(config, dict)
        json.dumps(config, allow_nan=False)  # what was accepted is plain JSON


# ---- schemes ------------------------------------------------------------------------------

@FUZZ
@given(text=scheme_texts, half=st.booleans())
def test_schemes_parse_and_apply_or_answer_invalid_argument(text, half):
    scheme = answer(lambda: parse_scheme(text))
    if isinstance(scheme, ParamserveError):
        return
    assert all(math.isfinite(v) for v in scheme.args.values())
    assert answer(lambda: parse_scheme(str(scheme))).name == scheme.name
    layer = torch.nn.Linear(3, 2)
    if half:
        layer = layer.half()
    if not isinstance(answer(lambda: apply_scheme(layer, scheme, seed=0)), ParamserveError):
        assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()


# ---- tensor indices -----------------------------------------------------------------------

@FUZZ
@given(text=index_texts, shape=st.lists(st.integers(0, 3), max_size=3),
       name=st.text(max_size=10))
def test_indices_parse_and_select_or_answer_invalid_argument(text, shape, name):
    tensor = torch.zeros(shape)
    index = answer(lambda: parse_index(text))
    if not isinstance(index, ParamserveError):
        answer(lambda: select(tensor, index, name))
    answer(lambda: split_param(f"{name}[{text}]"))


@FUZZ
@given(text=index_texts)
def test_a_stored_tensor_is_read_or_the_index_refused(fuzz_store, text):
    tensor = answer(lambda: fuzz_store.tensor("m", "0.weight", index=text))
    if not isinstance(tensor, ParamserveError):
        assert tensor.numel() <= 32


# ---- safetensors headers ------------------------------------------------------------------

@FUZZ
@given(blob=header_blobs, with_size=st.booleans())
def test_safetensors_headers_are_read_or_refused(blob, with_size):
    header = answer(lambda: read_header(io.BytesIO(blob), len(blob) if with_size else None))
    if not isinstance(header, ParamserveError):
        for entry in header.entries.values():
            assert header.data_start <= entry.begin <= entry.end <= header.total_bytes


@FUZZ
@given(blob=header_blobs)
def test_uploads_of_any_header_are_stored_or_refused(fuzz_store, blob):
    answer(lambda: fuzz_store.upload("m", blob))
