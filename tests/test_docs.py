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


def test_readme_python_example_runs(tmp_path):
    example = code_blocks("python")[0]
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
