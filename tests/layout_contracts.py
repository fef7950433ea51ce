"""A custom import-linter contract (see pyproject.toml, [tool.importlinter]): no module imports a
name starting with "_" from another module (a private name is its module's own business; what two
modules share is public). `lint-imports` loads it by the name in `contract_types`."""
from __future__ import annotations

import re

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

_FROM = re.compile(r"^\s*from\s+\S+\s+import\s+\(?(?P<names>[^)#]*)")


def private_names(line: str) -> list[str]:
    """The private names a `from X import a, _b as c` line takes ([] for a plain import)."""
    m = _FROM.match(line)
    if not m:
        return []
    names = [n.strip().split(" as ")[0].strip() for n in m.group("names").split(",")]
    return [n for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]


class PrivateNamesContract(Contract):
    """Checks every import between two modules under `containers`, inside functions too, for names
    starting with an underscore."""

    type_name = "private_names"
    containers = fields.SetField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        bad = []
        for importer in sorted(graph.modules):
            if not any(importer == c or importer.startswith(c + ".") for c in self.containers):  # type: ignore[attr-defined]
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                for d in graph.get_import_details(importer=importer, imported=imported):
                    for name in private_names(d["line_contents"]):
                        bad.append(f"{importer} (l.{d['line_number']}) imports {imported}.{name}")
        return ContractCheck(kept=not bad, warnings=None, metadata={"bad": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["bad"]:
            output.print_error(line)
            output.new_line()


class AcyclicModulesContract(Contract):
    """No import cycle between any two modules under `containers` (module by module, imports inside
    functions counted; a package importing its own submodules is an edge like any other)."""

    type_name = "acyclic_modules"
    containers = fields.SetField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        inside = sorted(m for m in graph.modules
                        if any(m == c or m.startswith(c + ".") for c in self.containers))  # type: ignore[attr-defined]
        cycles, seen = [], set()
        for a in inside:
            for b in sorted(graph.find_modules_directly_imported_by(a)):
                if b not in inside or frozenset((a, b)) in seen:
                    continue
                back = graph.find_shortest_chain(importer=b, imported=a)
                if back is not None:
                    seen.add(frozenset((a, b)))
                    cycles.append(" -> ".join((a, *back)))
        return ContractCheck(kept=not cycles, warnings=None, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["cycles"]:
            output.print_error(line)
            output.new_line()
