"""The build step that pyproject.toml cannot declare: compile protos/*.proto while the package
is built, so the wheel and the editable install carry the gRPC contract and nothing is written
at import (site-packages may be read-only for the user who runs paramserve)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTOS = HERE / "protos"


def _compiler():
    """protos/compile.py, loaded by path: paramserve is not importable in the build env."""
    spec = importlib.util.spec_from_file_location(
        "_paramserve_protos_compile", PROTOS / "compile.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """build_py, then the descriptor set into the package's ``generated/`` folder: in the
    build tree for a wheel, in the source tree for an editable install (which maps the
    package to the sources)."""

    def run(self) -> None:
        super().run()
        _compiler().compile_protos(PROTOS, self._out_dir())

    def _out_dir(self) -> Path:
        if self.editable_mode:
            return PROTOS / "generated"
        return Path(self.build_lib) / "paramserve" / "protos" / "generated"

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """What the build adds, so installers record it (and ``pip uninstall`` removes it)."""
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        out = self._out_dir()
        return outputs + [str(out / name) for name in ("descriptors.binpb", "STAMP", "__init__.py")]


setup(cmdclass={"build_py": BuildPyWithProtos})
