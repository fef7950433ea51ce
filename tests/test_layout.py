"""The package's layers: kernels/ (installed as llmsqueeze.kernels) sits below nn.

The kernels take tensors and plain values; what turns a layer into those tensors lives on the nn
side (llmsqueeze/nn_kernels.py, nn.prepare_model). So no file of kernels/ may import from
`llmsqueeze`, absolutely or by a relative import that climbs out of the kernels package, anywhere
in the file (imports inside functions included). Parsed, not imported: no Triton needed.
"""
from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


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
    assert not bad, f"kernels/ must not import llmsqueeze (the module glue belongs in llmsqueeze/nn_kernels.py): {bad}"


def test_the_check_sees_nested_and_relative_imports(tmp_path):
    f = tmp_path / "k.py"
    f.write_text(
        "import torch\nfrom . import dispatch\nfrom .quant_matmul import unpack\n"
        "def g():\n    from llmsqueeze.quant.lut import nf_levels\n    from ..nn import QuantLinear\n"
        "    import llmsqueeze.nn\n    import importlib\n    importlib.import_module('llmsqueeze.quant')\n"
    )
    assert [b.split(":")[0] for b in upward_imports(f)] == ["5", "6", "7", "9"]
