"""Architecture tests: the layer table of duccio-fx, checked against the code.

Why: the package is layered so each floor can be read, tested and changed knowing only the floors below
it. Nothing in Python enforces that, so these tests read every source file with `ast` (nothing of the
project is imported to build the graph) and fail on import cycles, upward imports, imports hidden in
functions or `if TYPE_CHECKING:`, modules the layer table does not know, and passes that are not exported.

Print the layer diagram with `python tests/test_architecture.py` (or `python -m tests.test_architecture`
from the repository root).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Iterable, Iterator, NamedTuple, Union

import networkx as nx

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "duccio_fx"


class Rule(NamedTuple):
    """Modules matching `pattern` (`x.*` is `x` and everything below it) live on `layer`. Modules of two
    different non-empty `block`s are siblings and must not import each other."""

    pattern: str
    layer: int
    block: str = ""


# The layer table, bottom up. A module may import only modules of its own layer or of lower layers.
LAYERS: tuple[Rule, ...] = (
    Rule("duccio_fx.common.*", 0),
    Rule("duccio_fx.zoo.*", 0),
    Rule("duccio_fx.targets.*", 1),
    Rule("duccio_fx.ir.*", 2),
    Rule("duccio_fx.passes.shape_propagation", 2),
    Rule("duccio_fx.passes.functional_layers", 2),
    Rule("duccio_fx.passes.channel_analysis", 2),
    Rule("duccio_fx.costs.*", 3),
    Rule("duccio_fx.passes.layer_costs", 3),
    Rule("duccio_fx.pipeline", 4),
    Rule("duccio_fx.search.*", 5, "search"),
    Rule("duccio_fx.passes.mask_insertion", 5, "search"),
    Rule("duccio_fx.passes.shrink_export", 5, "search"),
    Rule("duccio_fx.passes.supernet_insertion", 5, "search"),
    Rule("duccio_fx.passes.choice_export", 5, "search"),
    Rule("duccio_fx.passes.choice_channels", 5, "search"),
    Rule("duccio_fx.passes.choice_mask_insertion", 5, "search"),
    Rule("duccio_fx.passes.precision_insertion", 5, "search"),
    Rule("duccio_fx.passes.precision_export", 5, "search"),
    Rule("duccio_fx.lower.*", 5, "lower"),
    Rule("duccio_fx.passes.remove_noops", 5, "lower"),
    Rule("duccio_fx.passes.fold_batchnorm", 5, "lower"),
    Rule("duccio_fx.passes.dory_layers", 5, "lower"),
    Rule("duccio_fx.passes.calibrate", 5, "lower"),
    Rule("duccio_fx.passes.integerize", 5, "lower"),
    Rule("duccio_fx.cli.*", 6),
    Rule("duccio_fx.__main__", 6),
)

# Faces that only re-export the layers: they are no node of the graph, and an import through them counts
# as an import of the module that defines the name (`from duccio_fx import Pass` -> `duccio_fx.ir.pass_manager`).
EXEMPT_FACES = frozenset({"duccio_fx", "duccio_fx.passes"})


@dataclass(frozen=True)
class Import:
    """One project module imported by one import statement."""

    importer: str
    imported: str
    file: str  # relative to the repository root
    line: int
    nested: str  # "" at module level, else where the statement hides ("function f", "if TYPE_CHECKING")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ----- modules -------------------------------------------------------------------------------------------


def source_roots(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> source folder, from `package-dir` in pyproject.toml (passes/ and targets/ live at
    the top but install as `duccio_fx.passes` and `duccio_fx.targets`)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"].get("package-dir", {})
    roots = {pkg: root / folder for pkg, folder in package_dir.items() if pkg.split(".")[0] == PACKAGE}
    return roots or {PACKAGE: root / PACKAGE}


@lru_cache(maxsize=None)
def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every project module name -> its file (`pkg/__init__.py` is the module `pkg`)."""
    roots = source_roots(root)
    modules: dict[str, Path] = {}
    for pkg, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            owner = max((p for p, f in roots.items() if path.is_relative_to(f)), key=lambda p: len(roots[p].parts))
            if owner != pkg:  # a folder mapped to a longer package name is walked under that name
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([pkg, *parts])] = path
    return modules


def is_project(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


# ----- imports -------------------------------------------------------------------------------------------

ImportNode = Union[ast.Import, ast.ImportFrom]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def iter_import_nodes(nodes: Iterable[ast.AST], nested: str = "") -> Iterator[tuple[ImportNode, str]]:
    """Every import statement anywhere below `nodes`, with where it hides ("" at module level)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, nested
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from iter_import_nodes(ast.iter_child_nodes(node), nested or f"function {node.name}")
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from iter_import_nodes(node.body, nested or "if TYPE_CHECKING")
            yield from iter_import_nodes(node.orelse, nested)
        else:
            yield from iter_import_nodes(ast.iter_child_nodes(node), nested)


def _known(name: str, modules: dict[str, Path]) -> str:
    """`name` if it is a module, else its longest prefix that is one (`duccio_fx.ir.gone` -> `duccio_fx.ir`)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


Imported = tuple[ast.alias, str, Union[str, None]]  # (alias, module, name imported from it or None)


def imported_names(node: ImportNode, importer: str, modules: dict[str, Path]) -> list[Imported]:
    """(alias, module, name or None) for each project module a statement imports: `from duccio_fx.ir import
    builtin_rules` is the submodule `duccio_fx.ir.builtin_rules`; `from duccio_fx.ir.meta import X` is
    (`duccio_fx.ir.meta`, X); relative imports are resolved against the importer's package."""
    if isinstance(node, ast.Import):
        return [(a, _known(a.name, modules), None) for a in node.names if is_project(a.name)]
    base = node.module or ""
    if node.level:
        package = importer if modules[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    if not is_project(base):
        return []
    found: list[Imported] = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append((alias, sub, None) if sub in modules else (alias, _known(base, modules), alias.name))
    return found


@lru_cache(maxsize=None)
def face_exports(face: str, root: Path = ROOT) -> dict[str, tuple[str, ...]]:
    """What an exempt face re-exports: name -> the modules it comes from (`*` -> all of them)."""
    modules = module_files(root)
    exports: dict[str, tuple[str, ...]] = {}
    for node in ast.parse(modules[face].read_text(), str(modules[face])).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias, module, name in imported_names(node, face, modules):
                exports[alias.asname or alias.name.split(".")[0]] = resolve(module, name, root)
    exports["*"] = tuple(sorted({m for ms in exports.values() for m in ms}))
    return exports


def resolve(module: str, name: str | None = None, root: Path = ROOT) -> tuple[str, ...]:
    """The graph nodes an import of `name` from `module` reaches, looking through exempt faces."""
    if module not in EXEMPT_FACES:
        return (module,)
    exports = face_exports(module, root)
    return exports.get(name, ()) if name else exports["*"]


@lru_cache(maxsize=None)
def project_imports(root: Path = ROOT) -> tuple[Import, ...]:
    """Every import of a project module by a project module, exempt faces resolved away."""
    modules = module_files(root)
    found: list[Import] = []
    for importer, path in modules.items():
        file = path.relative_to(root).as_posix()
        for node, nested in iter_import_nodes(ast.parse(path.read_text(), str(path)).body):
            for _, module, name in imported_names(node, importer, modules):
                found += [Import(importer, target, file, node.lineno, nested) for target in resolve(module, name, root)]
    return tuple(dict.fromkeys(found))  # one per statement and module


def import_graph(imports: tuple[Import, ...], modules: dict[str, Path]) -> nx.DiGraph:
    """Modules and their imports; the exempt faces are left out (they only re-export)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(m for m in modules if m not in EXEMPT_FACES)
    graph.add_edges_from((i.importer, i.imported) for i in imports
                         if i.importer not in EXEMPT_FACES and i.imported not in EXEMPT_FACES)
    return graph


# ----- checks (pure, so a fake graph can show they fail) -------------------------------------------------


def find_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules importing themselves."""
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    cycles += [[m] for m in sorted(nx.nodes_with_selfloops(graph))]
    return sorted(cycles)


def cycle_path(graph: nx.DiGraph, members: list[str]) -> str:
    """One concrete cycle through `members`, `a -> b -> a`, to start untangling from."""
    edges = nx.find_cycle(graph.subgraph(members))
    return " -> ".join([a for a, _ in edges] + [edges[0][0]])


def rule_of(module: str) -> Rule | None:
    """The layer rule of `module`, None if no (or more than one) rule matches."""
    matches = [r for r in LAYERS if module == r.pattern.removesuffix(".*")
               or (r.pattern.endswith(".*") and module.startswith(r.pattern[:-1]))]
    return matches[0] if len(matches) == 1 else None


def layer_violations(imports: tuple[Import, ...]) -> list[str]:
    """Imports from a lower layer to a higher one, and imports between sibling blocks."""
    bad: set[str] = set()
    for i in imports:
        src, dst = rule_of(i.importer), rule_of(i.imported)
        if src is None or dst is None or i.importer in EXEMPT_FACES:
            continue  # unmapped modules are reported by test_every_module_has_a_layer
        upward = dst.layer > src.layer
        siblings = bool(src.block and dst.block and src.block != dst.block)
        if upward or siblings:
            why = "sibling" if siblings and not upward else "upward"
            bad.add(f"{i.importer} (layer {src.layer}) -> {i.imported} (layer {dst.layer})  [{why}, {i.where}]")
    return sorted(bad)


def hidden_imports(imports: tuple[Import, ...]) -> list[str]:
    """Project imports inside a function body or under `if TYPE_CHECKING:`."""
    return sorted({f"{i.where}: {i.imported} imported in {i.nested}" for i in imports if i.nested})


def unmapped_modules(modules: dict[str, Path]) -> list[str]:
    return sorted(m for m in modules if m not in EXEMPT_FACES and rule_of(m) is None)


def stale_rules(modules: dict[str, Path]) -> list[str]:
    """Layer rules that no longer match any module (a renamed or deleted module)."""
    return [r.pattern for r in LAYERS if not any(rule_of(m) == r for m in modules)]


def pass_problems(passes: ModuleType, files: dict[str, ModuleType], base: type) -> list[str]:
    """Passes (subclasses of `base` defined in `files`, stem -> module) not exported by the `passes` face,
    whose `name` is not the kebab-case file stem, or whose `requires` names an unknown pass."""
    found = [(stem, cls) for stem, mod in sorted(files.items()) for _, cls in inspect.getmembers(mod, inspect.isclass)
             if cls.__module__ == mod.__name__ and issubclass(cls, base) and not inspect.isabstract(cls)]
    known = {getattr(cls, "name", None) for _, cls in found}
    exported = set(getattr(passes, "__all__", ()))
    problems: list[str] = []
    for stem, cls in found:
        label, name, kebab = f"{stem}.py: {cls.__name__}", getattr(cls, "name", None), stem.replace("_", "-")
        if cls.__name__ not in exported or getattr(passes, cls.__name__, None) is not cls:
            problems.append(f"{label} is not exported in duccio_fx.passes.__all__")
        if name != kebab:
            problems.append(f"{label}.name is {name!r}, expected {kebab!r}")
        problems += [f"{label}.requires unknown pass {r!r}" for r in getattr(cls, "requires", ()) if r not in known]
    return problems


# ----- tests ---------------------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    """A cycle makes import order matter and the layers meaningless."""
    graph = import_graph(project_imports(), module_files())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"  {', '.join(c)}\n    e.g. {cycle_path(graph, c)}" for c in cycles)


def test_imports_go_down_the_layers() -> None:
    """A floor may use only its own and lower floors; search and lower are siblings and stay apart."""
    bad = layer_violations(project_imports())
    assert not bad, "imports against the layers:\n" + "\n".join("  " + b for b in bad)


def test_project_imports_are_at_module_level() -> None:
    """An import in a function or under TYPE_CHECKING hides a dependency (often a cycle) from readers."""
    bad = hidden_imports(project_imports())
    assert not bad, "move these imports to module level:\n" + "\n".join("  " + b for b in bad)


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in LAYERS, so the table stays the truth about the package."""
    missing = unmapped_modules(module_files())
    assert not missing, ("give these modules a layer in LAYERS (tests/test_architecture.py):\n"
                         + "\n".join("  " + m for m in missing))


def test_layer_table_has_no_stale_rules() -> None:
    """A rule for a module that is gone would silently place the next module of that name."""
    stale = stale_rules(module_files())
    assert not stale, "these LAYERS rules match no module: " + ", ".join(stale)


def test_passes_face_exports_every_pass() -> None:
    """`duccio_fx.passes` is the list of passes: each one exported, named after its file, requiring real passes."""
    import duccio_fx
    import duccio_fx.passes as passes

    folder = source_roots()["duccio_fx.passes"]
    assert Path(str(passes.__file__)).resolve().parent == folder.resolve(), "test the source tree: pip install -e ."
    files = {p.stem: importlib.import_module(f"duccio_fx.passes.{p.stem}")
             for p in sorted(folder.glob("*.py")) if p.stem != "__init__"}
    assert files, f"no pass files in {folder.name}/"
    problems = pass_problems(passes, files, duccio_fx.Pass)
    assert not problems, "passes:\n" + "\n".join("  " + p for p in problems)


def test_checks_catch_violations() -> None:
    """The checks are pure functions; a checker that passes everything would be worse than none."""
    def edge(importer: str, imported: str, nested: str = "") -> Import:
        return Import(importer, imported, "x.py", 1, nested)

    graph = nx.DiGraph([("duccio_fx.ir.meta", "duccio_fx.ir.printer"), ("duccio_fx.ir.printer", "duccio_fx.ir.meta"),
                        ("duccio_fx.zoo.tcn", "duccio_fx.zoo.tcn"), ("duccio_fx.cli.app", "duccio_fx.pipeline")])
    assert find_cycles(graph) == [["duccio_fx.ir.meta", "duccio_fx.ir.printer"], ["duccio_fx.zoo.tcn"]]
    assert layer_violations((edge("duccio_fx.ir.meta", "duccio_fx.costs.model"),
                             edge("duccio_fx.search.recipe", "duccio_fx.lower.onnx_float"),
                             edge("duccio_fx.passes.shrink_export", "duccio_fx.lower"),
                             edge("duccio_fx.costs.model", "duccio_fx.ir.meta"))) == [
        "duccio_fx.ir.meta (layer 2) -> duccio_fx.costs.model (layer 3)  [upward, x.py:1]",
        "duccio_fx.passes.shrink_export (layer 5) -> duccio_fx.lower (layer 5)  [sibling, x.py:1]",
        "duccio_fx.search.recipe (layer 5) -> duccio_fx.lower.onnx_float (layer 5)  [sibling, x.py:1]"]
    assert hidden_imports((edge("duccio_fx.cli.app", "duccio_fx.pipeline", "function main"),
                           edge("duccio_fx.cli.app", "duccio_fx.pipeline"))) == [
        "x.py:1: duccio_fx.pipeline imported in function main"]
    assert unmapped_modules({"duccio_fx.newfloor.thing": Path(), "duccio_fx.ir.meta": Path()}) == [
        "duccio_fx.newfloor.thing"]
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from duccio_fx.search import recipe
        class A:
            def f(self):
                try:
                    import duccio_fx.cli
                except ImportError:
                    pass
    """))
    assert [n for _, n in iter_import_nodes(tree.body)] == ["", "if TYPE_CHECKING", "function f"]


# ----- layer diagram -------------------------------------------------------------------------------------


def diagram(root: Path = ROOT) -> str:
    """The layers from the top down: each module (without `duccio_fx.`) with its lines and project imports."""
    modules, imports = module_files(root), project_imports(root)
    graph = import_graph(imports, modules)
    lines_of = {m: len(p.read_text().splitlines()) for m, p in modules.items()}
    out = []
    for layer in sorted({r.layer for r in LAYERS}, reverse=True):
        members = [m for m in graph if (r := rule_of(m)) is not None and r.layer == layer]
        edges = sum(graph.out_degree(m) for m in members)
        out.append(f"layer {layer}: {len(members)} modules, {sum(lines_of[m] for m in members)} lines, {edges} imports")
        cells = ", ".join(f"{m.removeprefix(PACKAGE + '.')} {lines_of[m]}/{graph.out_degree(m)}"
                          for m in sorted(members))
        out.append(textwrap.fill(cells, 110, initial_indent="  ", subsequent_indent="  "))
    out.append(f"(module lines/imports; exempt faces: {', '.join(sorted(EXEMPT_FACES))}; "
               f"unmapped: {', '.join(unmapped_modules(modules)) or 'none'})")
    return "\n".join(out)


if __name__ == "__main__":
    print(diagram())
