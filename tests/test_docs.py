"""The README stays true: its Python example runs, and CI runs its test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def block_with(language: str, marker: str) -> str:
    return next(b for b in code_blocks(language) if marker in b)


def test_readme_core_example_runs(tmp_path):
    example = block_with("python", "Store(data_dir")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Linear(in_features=20, out_features=256" in result.stdout
    assert "[(1, 'upload', None), (2, 'init', 1), (3, 'patch', 2)]" in result.stdout
    assert (tmp_path / "data" / "registry.db").is_file()


def test_ci_runs_the_readme_test_command():
    test_command = next(line.split("#")[0].strip() for block in code_blocks("bash")
                        for line in block.splitlines() if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_db_upgrade_command_migrates_an_empty_database(tmp_path):
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "db", "upgrade",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from paramserve.registry import Store
    Store(data_dir=tmp_path).close()  # accepted: the schema is the newest


def test_readme_quick_start_against_a_server(server, tmp_path):
    """The README's shell commands, tritonclient call and client snippet, as written (only the
    server address differs)."""
    address = server.address
    for line in block_with("bash", "paramserve create").splitlines():
        command = line.replace("paramserve ", f"{sys.executable} -m paramserve.service.cli "
                                              f"--server {address} ", 1)
        command = command.replace("python -c", f"{sys.executable} -c")
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (line, result.stderr)
    assert "hidden.weight" in result.stdout  # the last command lists parameters
    for marker, expected in (("tritonclient", "(2, 10)"), ("Client(", "")):
        code = block_with("python", marker).replace("127.0.0.1:8001", address)
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout


def test_every_serve_flag_in_the_readme_is_in_serve_help():
    usage = README.split("\nparamserve serve [", 1)[1].split("\nparamserve ", 1)[0]  # its entry
    flags = set(re.findall(r"--[a-z][a-z-]+", usage))
    assert {"--workers", "--torch-threads", "--max-batch-size"} <= flags
    result = subprocess.run([sys.executable, "-m", "paramserve.service.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not flags - set(re.findall(r"--[a-z][a-z-]+", result.stdout))
