"""The packages import in one direction only, so none of them can be understood or tested without the one above.

From the bottom up:
  foundation  pipeline's building blocks: the config and stage registry, errors, log, distributed helpers, the run
              directory's files (artifacts, lock), contexts, models, data formats, rendering, tracking, callbacks
  reward      the judges and reward scoring
  stages      one module per stage
  orchestration  pipeline's CLI, runner, launcher, joining machines, validate and the report

A module may import from its own layer and the layers below it, never above. And the module import graph has no
cycle. Both count every import statement, those inside functions too: an import postponed into a function still
makes its module depend on the other one, it only hides the cycle until that function runs. Imports by name at run
time (importlib.import_module) are not seen: stages.STAGES finds the stage modules that way, downwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "reward")
ORCHESTRATION = {"pipeline", "pipeline.__main__", "pipeline.cli", "pipeline.runner", "pipeline.launch",
                 "pipeline.join", "pipeline.validate", "pipeline.report", "pipeline.plots", "pipeline.export"}
LAYERS = ("foundation", "reward", "stages", "orchestration")


def layer(module: str) -> str:
    if module in ORCHESTRATION:
        return "orchestration"
    package = module.split(".")[0]
    return "foundation" if package == "pipeline" else package


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of our packages it imports. `from package import name` counts as importing the
    submodule package.name when there is one (running the package's __init__ on the way is not a dependency of the
    importer's own)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                            for alias in node.names}
        graph[name] = {target for target in targets if target in known and target != name}
    return graph


def test_the_layers_are_what_the_test_names():
    missing = ORCHESTRATION - set(modules())
    assert not missing, f"ORCHESTRATION names modules that no longer exist: {sorted(missing)}"


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
              for module, targets in sorted(import_graph().items()) for target in sorted(targets)
              if LAYERS.index(layer(target)) > LAYERS.index(layer(module))]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_module_import_graph_has_no_cycle():
    graph, state, path, cycles = import_graph(), {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
