"""The import graph of edgeq/: no cycles, and no import from a lower layer into a higher one.

Every import statement counts, a lazy one inside a function too: it runs the same module, only later. The graph is
read from the source with ``ast`` (nothing is imported), so a module that needs an optional extra is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgeq"

# Layer -> (rank, module prefixes). A module may import its own layer and any lower-ranked one, never a higher one.
# The longest matching prefix places a module ("edgeq.llm.gguf_source" before "edgeq.llm").
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    # what every part of edgeq may use: errors, progress, the profile and its precision vocabulary, node categories,
    # the family registry, metrics, the safe loaders, the data files shipped in the package, the heap's tuning
    "foundation": (0, ("edgeq.errors", "edgeq.progress", "edgeq.metrics", "edgeq.profiles", "edgeq.families",
                       "edgeq.precision", "edgeq.policy", "edgeq.categories", "edgeq.safe_load", "edgeq.resources",
                       "edgeq.heap")),
    # reading inputs and writing packages: model folders and GGUF files, text sets, runtime sessions, the manifest,
    # the staging folder, what an export was asked for
    "inputs-and-records": (1, ("edgeq.modelsource", "edgeq.llm.gguf_source", "edgeq.checkpoint", "edgeq.textdata",
                               "edgeq.runtime", "edgeq.manifest", "edgeq.manifest_schema", "edgeq.manifest_migrate",
                               "edgeq.staging", "edgeq.partitions", "edgeq.speed", "edgeq.request")),
    # the building blocks recipes and targets are made of
    "stages": (2, ("edgeq.stages", "edgeq.passes", "edgeq.llm", "edgeq.decoder", "edgeq.qnn", "edgeq.devices")),
    # where a package runs (Target implementations), and verify, which runs a package on one of them
    "targets": (3, ("edgeq.targets", "edgeq.stages.verify")),
    # one per (model kind, target kind)
    "recipes": (4, ("edgeq.recipes",)),
    # the commands
    "top": (5, ("edgeq.pipeline", "edgeq.report", "edgeq.rebuild", "edgeq.profile_table")),
    # edgeq matrix: many exports through the pipeline, their store, executors and summary (built on edgeq.report)
    "matrix": (6, ("edgeq.matrix",)),
    # the command line over all of them
    "cli": (7, ("edgeq.cli",)),
}
# Modules in edgeq.recipes that are not recipes: the protocol and the chooser.
RECIPE_SUPPORT = ("edgeq.recipes", "edgeq.recipes.base")

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The edgeq modules one file imports, anywhere in it. ``from a import b`` names module a.b when that is a
    module, else module a."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # import edgeq.a.b.c where c is a name: the module is edgeq.a.b
                name = name.rpartition(".")[0]
            if name.startswith("edgeq") and name != module:
                found.add(name)
    return found


def package_graph(root: Path = PACKAGE) -> Graph:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {m: imported(ast.parse(p.read_text(), str(p)), m, p.name == "__init__.py", known) for m, p in files.items()}


def layer_of(module: str) -> tuple[str, int] | None:
    best = None
    for layer, (rank, prefixes) in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer, rank)
    return None if best is None else (best[1], best[2])


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(c)) for c in components]


def _closed_path(graph: Graph, component: set[str]) -> list[str]:
    """A path a -> ... -> a inside one strongly connected component, to name in a failure."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def upward_imports(graph: Graph) -> list[str]:
    """Each import from a lower layer into a higher one, and each recipe importing another recipe or the pipeline."""
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if here and there and there[1] > here[1]:
                found.append(f"{module} ({here[0]}) imports {target} ({there[0]})")
            elif here and here[0] == "recipes" and module not in RECIPE_SUPPORT and target.startswith("edgeq.recipes") \
                    and target != "edgeq.recipes.base":
                found.append(f"recipe {module} imports {target}: recipes share stages, not each other")
    return found


def unplaced(graph: Graph) -> list[str]:
    return sorted(m for m in graph if m != "edgeq" and layer_of(m) is None)


# ---------------------------------------------------------------------------------------------------- edgeq/

@pytest.fixture(scope="module")
def graph() -> Graph:
    return package_graph()


def test_the_graph_sees_lazy_imports_and_the_recipes(graph):
    assert "edgeq.recipes.causal_lm" in graph["edgeq.recipes"]  # imported inside recipe_for
    assert "edgeq.pipeline" in graph["edgeq.cli"]  # imported inside a command


def test_edgeq_has_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_module_imports_a_higher_layer(graph):
    assert upward_imports(graph) == []


def test_every_module_has_a_layer(graph):
    assert unplaced(graph) == [], "add the new module's prefix to LAYERS in tests/test_import_graph.py"


# ---------------------------------------------------------------------------------------------------- the checker

def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "edgeq"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "a.py").write_text("from edgeq.stages.b import f\n")
    (pkg / "stages" / "b.py").write_text("def f():\n    from . import a\n")
    graph = package_graph(pkg)
    assert graph["edgeq.stages.b"] == {"edgeq.stages.a"}
    assert cycles(graph) == [["edgeq.stages.a", "edgeq.stages.b", "edgeq.stages.a"]]


def test_checker_finds_upward_imports_and_recipes_importing_each_other():
    graph = {
        "edgeq.stages.quantize": {"edgeq.recipes.causal_lm", "edgeq.errors"},
        "edgeq.policy": {"edgeq.cli"},
        "edgeq.targets.host": {"edgeq.recipes"},
        "edgeq.recipes.encoder_qnn": {"edgeq.recipes.encoder_cpu", "edgeq.recipes.base", "edgeq.pipeline"},
        "edgeq.recipes.encoder_cpu": {"edgeq.stages.record"},
        "edgeq.recipes": {"edgeq.recipes.encoder_cpu"},
        "edgeq.cli": {"edgeq.pipeline"},
    }
    assert upward_imports(graph) == [
        "edgeq.policy (foundation) imports edgeq.cli (cli)",
        "edgeq.recipes.encoder_qnn (recipes) imports edgeq.pipeline (top)",
        "recipe edgeq.recipes.encoder_qnn imports edgeq.recipes.encoder_cpu: recipes share stages, not each other",
        "edgeq.stages.quantize (stages) imports edgeq.recipes.causal_lm (recipes)",
        "edgeq.targets.host (targets) imports edgeq.recipes (recipes)",
    ]
    assert cycles(graph) == []


def test_the_longest_prefix_places_a_module():
    assert layer_of("edgeq.llm.gguf_source") == ("inputs-and-records", 1)
    assert layer_of("edgeq.llm.int4") == ("stages", 2)
    assert layer_of("edgeq.stages.verify") == ("targets", 3)
    assert layer_of("edgeq.stagesx") is None
