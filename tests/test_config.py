"""Settings defined once: every field of ServerConfig (and of the core's Limits) is a flag, a
PARAMSERVE_* variable and a help default, derived from the field; bad values name the flag or
variable."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from paramserve.registry.limits import Limits
from paramserve.service.cli import build_parser
from paramserve.service.config import (
    LIMIT_HELP,
    ClientSettings,
    LogSettings,
    ServerConfig,
    server_fields,
)
from paramserve.service.settings import SettingError, env_of, flag_of, resolve, settings_of


def serve_help() -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["serve"]
    return " ".join(sub.format_help().split())


def test_every_server_and_limit_field_is_a_flag_with_its_variable_and_default_in_help():
    text = serve_help()
    names = {f.name for f in server_fields()}
    assert names == ({f.name for f in dataclasses.fields(ServerConfig)} - {"limits", "log"}) | {
        f.name for f in dataclasses.fields(Limits)}
    for f in server_fields():
        assert flag_of(f) in text and env_of(f) in text, f.name
    assert "--max-batch-size N dynamic batching" in text
    assert "(default 64; env PARAMSERVE_MAX_BATCH_SIZE)" in text
    assert "(default 2^28; env PARAMSERVE_MAX_TENSOR_ELEMENTS)" in text
    assert f"(default {Limits().max_json_depth}; env PARAMSERVE_MAX_JSON_DEPTH)" in text
    assert "env PARAMSERVE_MODEL_BATCHING, separated by ';'" in text
    assert set(LIMIT_HELP) == {f.name for f in dataclasses.fields(Limits)}


def test_defaults_from_a_bare_serve_equal_the_dataclass_defaults():
    args = build_parser().parse_args(["serve"])
    assert ServerConfig.from_args(args) == ServerConfig()


def test_flags_win_over_variables_and_variables_over_defaults(monkeypatch):
    monkeypatch.setenv("PARAMSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("PARAMSERVE_GRACE_S", "2.5")
    monkeypatch.setenv("PARAMSERVE_ARCHITECTURES", "a,b")
    monkeypatch.setenv("PARAMSERVE_MODEL_BATCHING", "m=4,10;n=2,0")
    monkeypatch.setenv("PARAMSERVE_AUTH_OPEN_READS", "yes")
    monkeypatch.setenv("PARAMSERVE_MAX_JSON_DEPTH", "7")
    config = ServerConfig.from_args(build_parser().parse_args(
        ["serve", "--max-batch-size", "16", "--architectures", "c"]))
    assert config.max_batch_size == 16 and config.grace_s == 2.5
    assert config.architectures == ("c",) and config.model_batching == ("m=4,10", "n=2,0")
    assert config.auth_open_reads is True and config.limits.max_json_depth == 7


def test_global_flags_from_variables_and_on_either_side_of_the_command(monkeypatch):
    monkeypatch.setenv("PARAMSERVE_SERVER", "env:1")
    parse = build_parser().parse_args
    assert parse(["models"]).server == "env:1"
    assert parse(["--server", "a:1", "models"]).server == "a:1"
    assert parse(["models", "--server", "b:2"]).server == "b:2"
    args = parse(["--json", "models", "--timeout-s", "5", "--log-level", "debug"])
    assert (args.json, args.timeout_s, args.log_level) == (True, 5.0, "debug")
    serve = parse(["serve", "--tls-cert", "server.pem", "--log-format", "json"])
    assert serve.tls_cert == "server.pem" and serve.log_format == "json"


@pytest.mark.parametrize("name, value, expected", [
    ("PARAMSERVE_MAX_BATCH_SIZE", "lots", "must be an integer, not 'lots'"),
    ("PARAMSERVE_MAX_BATCH_SIZE", "0", "must be at least 1"),
    ("PARAMSERVE_GRACE_S", "soon", "must be a number"),
    ("PARAMSERVE_AUTH_OPEN_READS", "maybe", "must be one of"),
    ("PARAMSERVE_MODEL_CONTROL_MODE", "lazy", "must be one of on-demand, explicit"),
    ("PARAMSERVE_MAX_INIT_ELEMENTS", "-1", "must be at least 1"),
])
def test_a_bad_variable_names_itself_and_its_flag(name, value, expected):
    fields = server_fields()
    with pytest.raises(SettingError) as raised:
        resolve(argparse.Namespace(), fields, environ={name: value})
    message = str(raised.value)
    flag = "--" + name[len("PARAMSERVE_"):].lower().replace("_", "-")
    assert message.startswith(f"{name}={value!r} ({flag}): ") and expected in message


def test_client_and_log_settings_have_the_variables_the_readme_names():
    assert [env_of(f) for f in settings_of(ClientSettings)] == [
        "PARAMSERVE_SERVER", "PARAMSERVE_TIMEOUT_S", "PARAMSERVE_TOKEN", "PARAMSERVE_TLS_CA",
        "PARAMSERVE_CLIENT_TLS_CERT", "PARAMSERVE_CLIENT_TLS_KEY"]
    assert [flag_of(f) for f in settings_of(ClientSettings)][-2:] == ["--tls-cert", "--tls-key"]
    assert [env_of(f) for f in settings_of(LogSettings)] == ["PARAMSERVE_LOG_LEVEL",
                                                            "PARAMSERVE_LOG_FORMAT"]
    assert LogSettings().log_level == "info"


def test_importing_the_settings_imports_neither_torch_nor_numpy():
    import subprocess
    import sys

    code = ("import sys; import paramserve.service.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'paramserve.registry') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
