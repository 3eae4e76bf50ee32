"""The client's numpy API against a real server: infer numpy in, numpy out (torch in, torch
out), arrays and .npz downloads, numpy patches and uploads; uploads the format already shows to
be refused are refused before a byte is sent. The same without torch: test_lean_import.py."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import reference_module
from safetensors.torch import save as st_save

from paramserve.registry import InvalidArgument
from paramserve.registry.tensorfile import write_tensors
from paramserve.service import wire


@pytest.fixture
def mlp(client, model_name):
    """A small_mlp model (input (n, 4) float32 → (n, 1)) with one version; its module."""
    module = reference_module("small_mlp", False)
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, module.state_dict())
    return module


@pytest.fixture
def no_upload_rpc(client):
    """Fails the test if the client opens an UploadVersion stream."""

    def refuse(*args, **kwargs):
        raise AssertionError("the upload was sent; it should have been refused before")

    client.registry.UploadVersion = refuse


def test_infer_takes_numpy_and_returns_numpy(client, model_name, mlp):
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    y = client.infer(model_name, x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, 1)
    expected = mlp(torch.from_numpy(x)).detach().numpy()
    assert np.abs(y - expected).max() <= 1e-5
    y[0, 0] = 1.0  # a writable array of its own
    listed = client.infer(model_name, x.tolist())  # Python floats: float32, as torch makes them
    assert isinstance(listed, np.ndarray) and np.abs(listed - expected).max() <= 1e-5
    with pytest.raises(InvalidArgument, match="FP64"):
        client.infer(model_name, x.astype(np.float64))  # an array keeps its dtype


def test_infer_of_a_torch_tensor_returns_a_torch_tensor(client, model_name, mlp):
    x = torch.rand(2, 4)
    y = client.infer(model_name, x)
    assert isinstance(y, torch.Tensor) and (y - mlp(x)).abs().max() <= 1e-5
    with pytest.raises(InvalidArgument, match="complex"):
        client.infer(model_name, np.ones((2, 4), np.complex64))


def test_arrays_and_npz_downloads_need_no_tensors(client, model_name, tmp_path):
    client.create_model(model_name, "tied_mlp")
    state = reference_module("tied_mlp", False).state_dict()
    client.upload(model_name, state)
    arrays = client.arrays(model_name)
    assert arrays.keys() == state.keys() and arrays["4.weight"] is arrays["2.weight"]
    assert all(np.array_equal(arrays[k], state[k].numpy()) for k in state)
    client.download(model_name, 1, tmp_path / "v1.npz")
    with np.load(tmp_path / "v1.npz") as saved:
        assert all(np.array_equal(saved[k], state[k].numpy()) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["v1.npz"]


def test_tensor_patch_and_upload_with_numpy(client, model_name, mlp):
    bias = client.tensor(model_name, "0.bias")
    assert isinstance(bias, np.ndarray) and np.array_equal(bias, mlp[0].bias.detach().numpy())
    version = client.patch(model_name, "0.bias", np.arange(8), index=None)  # int64: cast
    assert np.array_equal(client.tensor(model_name, "0.bias", version.number), np.arange(8))
    state = {k: v.numpy() * 2 for k, v in mlp.state_dict().items()}
    version = client.upload(model_name, state)
    assert np.array_equal(client.arrays(model_name, version.number)["0.weight"], state["0.weight"])


def test_a_pt_file_is_sent_as_it_is_and_converted_by_the_server(client, model_name, mlp, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(mlp.state_dict(), path)
    version = client.upload(model_name, path)
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 pickle format: only the server checks it
    torch.save(mlp.state_dict(), legacy, _use_new_zipfile_serialization=False)
    again = client.upload(model_name, legacy)
    assert again.sha256 == version.sha256
    assert all(
        np.array_equal(client.arrays(model_name)[k], v.detach().numpy())
        for k, v in mlp.state_dict().items()
    )


def bad_files(mlp) -> dict[str, tuple[bytes, str]]:
    """Files the server would refuse after the upload, and what the refusal says."""
    buffer = io.BytesIO()
    torch.save(mlp.state_dict(), buffer)
    pt = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save(mlp, buffer)  # the whole model, not its state_dict
    model = buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")
    other_zip = buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # a pickle naming a foreign class
        archive.writestr("w/data.pkl", pickle.dumps(zipfile.ZipInfo("x"), protocol=4))
    foreign = buffer.getvalue()
    buffer = io.BytesIO()
    write_tensors(buffer, list(mlp.state_dict().items()))
    safetensors = buffer.getvalue()
    return {
        "truncated.pt": (pt[: len(pt) // 2], "damaged or truncated"),
        "model.pt": (model, "torch.nn.modules.*Sequential.*weights_only.*state_dict"),
        "other.zip": (other_zip, "0 <archive>/data.pkl"),
        "foreign.pt": (foreign, "zipfile.ZipInfo"),
        "truncated.safetensors": (safetensors[:-3], "truncated"),
        "header.safetensors": (safetensors[:8] + b'{"x"' + safetensors[12:], "header"),
        "notes.txt": (b"hello, not weights", "neither safetensors nor"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "truncated.pt",
        "model.pt",
        "other.zip",
        "foreign.pt",
        "truncated.safetensors",
        "header.safetensors",
        "notes.txt",
    ],
)
def test_a_file_the_server_would_refuse_is_refused_before_a_byte_is_sent(
    client, model_name, mlp, tmp_path, no_upload_rpc, name
):
    data, message = bad_files(mlp)[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InvalidArgument, match=message):
        client.upload(model_name, path)
    with pytest.raises(InvalidArgument, match=message):
        client.upload(model_name, data)  # bytes: the same checks


def test_the_safetensors_library_file_and_a_dict_of_torch_tensors_still_upload(
    client, model_name, mlp, tmp_path
):
    path = tmp_path / "lib.safetensors"
    path.write_bytes(st_save(mlp.state_dict()))
    first = client.upload(model_name, path)
    second = client.upload(
        model_name, {k: v.to(torch.bfloat16).float() for k, v in mlp.state_dict().items()}
    )
    assert first.number + 1 == second.number


def test_bfloat16_and_float8_widen_to_float32_exactly():
    for dtype, name in [
        (torch.bfloat16, "BF16"),
        (torch.float8_e5m2, "F8_E5M2"),
        (torch.float8_e4m3fn, "F8_E4M3"),
    ]:
        every = torch.arange(1 << (8 * dtype.itemsize), dtype=torch.int32)
        bits = every.to(torch.int16 if dtype.itemsize == 2 else torch.uint8)
        values = bits.view(dtype).float().numpy()
        carried = np.frombuffer(bits.numpy().tobytes(), wire.CARRIER[name])
        widened = wire.to_numpy(name, carried)
        assert widened.dtype == np.float32
        assert np.array_equal(widened, values, equal_nan=True), name


def test_the_lean_status_table_agrees_with_the_server_one():
    from paramserve.registry import errors as core
    from paramserve.service.errors import status_of
    from paramserve.service.status import ERROR_OF, DeadlineExceeded, code_of

    classes = [
        c
        for c in vars(core).values()
        if isinstance(c, type)
        and issubclass(c, core.ParamserveError)
        and c is not core.ParamserveError
    ]
    for cls in classes + [DeadlineExceeded]:
        error = cls("m") if cls is not core.InvalidStateDict else cls("m", missing=["x"])
        assert code_of(error) == status_of(error)
        # UNAVAILABLE (the object store is down) comes back as a ServerError, since an
        # unreachable server gives that code too.
        assert code_of(error) in ERROR_OF or cls is core.Unavailable
    assert code_of(ValueError()) is None


def test_npz_files_take_any_parameter_name(tmp_path):
    from paramserve.service.client_files import write_npz

    arrays = {"file": np.arange(3.0), "allow_pickle": np.ones((2, 2), np.int8)}
    with open(tmp_path / "odd.npz", "wb") as f:  # names np.savez(**kwargs) cannot take
        write_npz(f, arrays)
    with np.load(tmp_path / "odd.npz") as saved:
        assert all(
            np.array_equal(saved[k], v) and saved[k].dtype == v.dtype for k, v in arrays.items()
        )


def test_a_numpy_state_dict_keeps_its_scalars_and_layout():
    from paramserve.registry.tensorfile import read_header, read_tensor
    from paramserve.service.client_files import upload_path

    arrays = {"count": np.int64(7), "w": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    with upload_path(arrays) as (path, label), open(path, "rb") as f:
        header = read_header(f)
        assert label == "the upload" and header.entries["count"].shape == ()
        assert read_tensor(f, header.entries["count"]).item() == 7
        assert np.array_equal(read_tensor(f, header.entries["w"]).numpy(), arrays["w"])
