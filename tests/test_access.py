"""Access control: bearer tokens (full and read-only), open reads, TLS and mutual TLS with
certificates made by the test, and names that cannot escape the data dir."""

from __future__ import annotations

import subprocess

import grpc
import pytest
import torch

from paramserve.registry import InvalidArgument
from paramserve.service.client import Client, ServerError

from conftest import ServerProcess, reference_module

FULL, READ = "full-token-123", "read-token-456"


def make_token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\n{FULL}\n{READ} read\n")
    return path


@pytest.fixture(scope="module")
def auth_servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    tokens = make_token_file(tmp)
    closed = ServerProcess(tmp / "closed", "--auth-token-file", str(tokens), log_name="closed")
    open_reads = ServerProcess(tmp / "open", "--auth-token-file", str(tokens),
                               "--auth-open-reads", log_name="open")
    for srv in (closed, open_reads):
        with Client(srv.address, token=FULL) as client:
            client.create_model("m", "small_mlp")
            client.upload("m", reference_module("small_mlp", False).state_dict())
    yield closed, open_reads
    closed.stop()
    open_reads.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(ServerError) as info:
        call()
    return info.value.code


def test_every_rpc_needs_a_token_when_reads_are_closed(auth_servers):
    closed, _ = auth_servers
    for token in (None, "wrong"):
        with Client(closed.address, token=token) as client:
            assert code_of(client.list_models) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: client.infer("m", torch.rand(1, 4))) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: client.create_model("x", "mlp")) == \
                grpc.StatusCode.UNAUTHENTICATED
    with Client(closed.address, token=READ) as client:
        assert [m.name for m in client.list_models()] == ["m"]
        assert client.infer("m", torch.rand(1, 4)).shape == (1, 1)
        assert code_of(lambda: client.set_alias("m", "p", 1)) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: client.upload("m", {})) == grpc.StatusCode.PERMISSION_DENIED
    with Client(closed.address, token=FULL) as client:
        client.set_alias("m", "p", 1)
    result = subprocess.run(["paramserve", "--server", closed.address, "health"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "SERVING" in result.stdout  # probes need no token


def test_open_reads_still_guard_every_mutation(auth_servers):
    _, open_reads = auth_servers
    with Client(open_reads.address) as client:
        assert client.infer("m", torch.rand(2, 4)).shape == (2, 1)
        assert client.list_versions("m")[0].number == 1
        assert client.state_dict("m")["0.weight"].shape == (8, 4)
        for mutate in (lambda: client.create_model("y", "mlp"),
                       lambda: client.patch("m", "2.bias", 1.0),
                       lambda: client.initialize("m", "zeros"),
                       lambda: client.delete_model("m"),
                       lambda: client.upload("m", {})):
            assert code_of(mutate) == grpc.StatusCode.UNAUTHENTICATED
    with Client(open_reads.address, token="nope") as client:
        assert code_of(lambda: client.delete_version("m", 1)) == grpc.StatusCode.UNAUTHENTICATED


def test_cli_sends_the_token(auth_servers):
    closed, _ = auth_servers
    base = ["paramserve", "--server", closed.address]
    denied = subprocess.run(base + ["models"], capture_output=True, text=True)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    allowed = subprocess.run(base + ["--token", FULL, "models", "--json"], capture_output=True,
                             text=True)
    assert allowed.returncode == 0 and '"name": "m"' in allowed.stdout


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem",
                cwd=d)
    return d


def test_tls_and_mutual_tls(certificates, tmp_path):
    d = certificates
    tls = ServerProcess(tmp_path / "tls", "--tls-cert", str(d / "server.pem"), "--tls-key",
                        str(d / "server.key"), log_name="tls")
    mtls = ServerProcess(tmp_path / "mtls", "--tls-cert", str(d / "server.pem"), "--tls-key",
                         str(d / "server.key"), "--tls-client-ca", str(d / "ca.pem"),
                         log_name="mtls")
    try:
        with Client(tls.address, tls_ca=str(d / "ca.pem")) as client:
            client.create_model("t", "small_mlp")
            assert client.get_model("t").architecture == "small_mlp"
        with Client(tls.address, timeout_s=5) as plain:
            assert code_of(plain.list_models) == grpc.StatusCode.UNAVAILABLE
        with Client(mtls.address, tls_ca=str(d / "ca.pem"), timeout_s=5) as no_cert:
            assert code_of(no_cert.list_models) == grpc.StatusCode.UNAVAILABLE
        with Client(mtls.address, tls_ca=str(d / "ca.pem"), tls_cert=str(d / "client.pem"),
                    tls_key=str(d / "client.key")) as client:
            assert client.list_models() == []
    finally:
        tls.stop()
        mtls.stop()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", "x\\y", "nul\0"])
def test_names_cannot_escape_the_data_dir(client, server, model_name, name):
    """Model and alias names are checked, and never used as paths: blobs are named by hash."""
    with pytest.raises(InvalidArgument, match="invalid"):
        client.create_model(name, "mlp")
    client.create_model(model_name, "small_mlp")
    client.upload(model_name, reference_module("small_mlp", False).state_dict())
    with pytest.raises(InvalidArgument, match="invalid"):
        client.set_alias(model_name, name, 1)
    outside = [p for p in server.data_dir.parent.rglob("*") if "escape" in p.name]
    assert outside == []
