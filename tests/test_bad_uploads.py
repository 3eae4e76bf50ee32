"""A bad upload gets one clear error listing every problem, and leaves no row and no blob."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from paramserve.registry import InvalidArgument, InvalidStateDict

from conftest import blob_files, reference_module


@pytest.fixture
def mlp_store(store):
    store.create_model("m", "mlp")
    return store


def assert_nothing_stored(store):
    assert store.list_versions("m") == []
    assert blob_files(store) == []


def good_state():
    return {k: v.clone() for k, v in reference_module("mlp", False).state_dict().items()}


def test_every_missing_unexpected_and_mismatched_key_is_listed(mlp_store):
    state = good_state()
    del state["out.bias"]
    state["extra"] = torch.zeros(1)
    state["hidden.weight"] = torch.zeros(256, 21)
    state["out.weight"] = state["out.weight"].double()
    with pytest.raises(InvalidStateDict) as info:
        mlp_store.upload("m", state)
    err = info.value
    assert err.missing == ["out.bias"] and err.unexpected == ["extra"]
    assert ("hidden.weight", "F32[256, 20]", "F32[256, 21]") in err.mismatched
    assert ("out.weight", "F32[10, 256]", "F64[10, 256]") in err.mismatched
    message = str(err)
    for fragment in ("'out.bias'", "'extra'", "expected F32[256, 20], given F32[256, 21]",
                     "F64[10, 256]", "paramserve params"):
        assert fragment in message
    assert_nothing_stored(mlp_store)


def test_a_dtype_the_architecture_does_not_use_is_refused(mlp_store):
    state = {k: v.half() for k, v in good_state().items()}
    with pytest.raises(InvalidStateDict, match="expected F32"):
        mlp_store.upload("m", st_save(state))
    assert_nothing_stored(mlp_store)


def test_tied_entries_with_different_values_are_refused(store):
    store.create_model("m", "tied_mlp")
    state = {k: v.clone() for k, v in reference_module("tied_mlp", False).state_dict().items()}
    state["4.weight"][0, 0] += 1
    with pytest.raises(InvalidStateDict, match="'4.weight' and '2.weight' are one tied"):
        store.upload("m", state)
    assert_nothing_stored(store)


class Exploit:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_malicious_pickle_is_refused_and_never_runs(mlp_store, tmp_path):
    marker = tmp_path / "pwned"
    state = good_state()
    state["hidden.weight"] = Exploit(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw_pickle = pickle.dumps({"hidden.weight": Exploit(marker)}, protocol=2)
    for payload in (buffer.getvalue(), raw_pickle):
        with pytest.raises(InvalidArgument, match="refused"):
            mlp_store.upload("m", payload)
    assert not marker.exists()
    assert_nothing_stored(mlp_store)


def test_truncated_files_are_refused(mlp_store, tmp_path):
    buffer = io.BytesIO()
    torch.save(good_state(), buffer)
    safetensors_bytes = st_save(good_state())
    for payload in (buffer.getvalue()[:-100], safetensors_bytes[:-100],
                    safetensors_bytes[:20]):
        with pytest.raises(InvalidArgument):
            mlp_store.upload("m", payload)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(safetensors_bytes[: len(safetensors_bytes) // 2])
    with pytest.raises(InvalidArgument, match="truncated"):
        mlp_store.upload("m", path)
    assert_nothing_stored(mlp_store)


def test_other_bad_sources(mlp_store, tmp_path):
    cases = [
        (b"hello world, not tensors", "neither safetensors nor"),
        (tmp_path / "missing.safetensors", "cannot read upload file"),
        ({"hidden.weight": [1, 2, 3]}, "not tensors"),
    ]
    buffer = io.BytesIO()
    torch.save({"state_dict": good_state(), "epoch": 3}, buffer)
    cases.append((buffer.getvalue(), "not tensors"))
    buffer = io.BytesIO()
    torch.save([torch.zeros(1)], buffer)
    cases.append((buffer.getvalue(), "not a state_dict"))
    for source, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            mlp_store.upload("m", source)
    assert_nothing_stored(mlp_store)


def test_a_bad_alias_is_refused_before_anything_is_written(mlp_store):
    with pytest.raises(InvalidArgument, match="reserved"):
        mlp_store.upload("m", good_state(), alias="latest")
    assert_nothing_stored(mlp_store)
