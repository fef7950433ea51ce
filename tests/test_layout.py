"""The layers of the package hold (README, "How the code is laid out"): `lint-imports` (import-linter)
checks the contracts of pyproject.toml on the package as installed, kernels/ inside it as
llmsqueeze.kernels: each module imports only from the layers below its own, no import cycle, no
private name imported across modules, all counting imports inside functions."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts(tmp_path):
    pkg = tmp_path / "pkg"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "llmsqueeze", pkg / "llmsqueeze", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "kernels"))
    shutil.copytree(ROOT / "kernels", pkg / "llmsqueeze" / "kernels", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())", "--no-cache"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "broken" not in p.stdout.lower().replace("0 broken", "")


def test_private_names_parser():
    from layout_contracts import private_names

    assert private_names("from .masks import prune_lowest, check_sparsity") == ["prune_lowest"]
    assert private_names("    from ..nn import (a, _b as c)") == ["_b"]
    assert private_names("from . import __version__") == []
    assert private_names("import torch") == []
