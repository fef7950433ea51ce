"""The layers of the package hold (README, "How the code is laid out").

`lint-imports` (import-linter) checks the contracts of pyproject.toml on the package: each module imports only from the layers below its own,
no import cycle, no private name imported across modules, all counting imports inside functions.
And llmsqueeze/kernels/ sits below everything: no file of it may import from
`llmsqueeze`, absolutely, by a relative import that climbs out of the kernels package, or through
importlib (parsed, not imported: no Triton needed); what turns a layer into the kernels' tensors
lives on the nn side (llmsqueeze/nn_kernels.py, nn.prepare_model).
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "llmsqueeze" / "kernels"


def test_import_contracts(tmp_path):
    pkg = tmp_path / "pkg"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "llmsqueeze", pkg / "llmsqueeze", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())", "--no-cache"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "broken" not in p.stdout.lower().replace("0 broken", "")


def test_private_names_parser():
    from layout_contracts import private_names

    assert private_names("from .masks import _lowest, check_sparsity") == ["_lowest"]
    assert private_names("    from ..nn import (a, _b as c)") == ["_b"]
    assert private_names("from . import __version__") == []
    assert private_names("import torch") == []


def upward_imports(path: Path) -> list[str]:
    """-> 'line: what' for every import in `path` that reaches llmsqueeze outside the kernels package."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            bad += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "llmsqueeze"]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 0 and (node.module or "").split(".")[0] == "llmsqueeze"):
                bad.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            arg = node.args[0].value
            if fn in ("import_module", "__import__") and isinstance(arg, str) and arg.startswith(("llmsqueeze", "..")):
                bad.append(f"{node.lineno}: {fn}({arg!r})")
    return bad


def test_kernels_import_nothing_from_llmsqueeze():
    files = sorted(KERNELS.rglob("*.py"))
    assert KERNELS / "__init__.py" in files and len(files) >= 5  # the check looked at the real folder
    bad = {str(f.relative_to(KERNELS.parent)): b for f in files if (b := upward_imports(f))}
    assert not bad, f"llmsqueeze/kernels/ must not import llmsqueeze (the module glue belongs in llmsqueeze/nn_kernels.py): {bad}"


def test_the_check_sees_nested_and_relative_imports(tmp_path):
    f = tmp_path / "k.py"
    f.write_text(
        "import torch\nfrom . import dispatch\nfrom .quant_matmul import unpack\n"
        "def g():\n    from llmsqueeze.quant.lut import nf_levels\n    from ..nn import QuantLinear\n"
        "    import llmsqueeze.nn\n    import importlib\n    importlib.import_module('llmsqueeze.quant')\n"
    )
    assert [b.split(":")[0] for b in upward_imports(f)] == ["5", "6", "7", "9"]
