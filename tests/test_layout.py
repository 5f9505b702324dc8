"""The rooms of the house: every module belongs to one room, imports only from its own room or a
lower one, and no two modules import each other (directly or round a loop).

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts
as much as one at the top. ``if TYPE_CHECKING:`` imports count for the room order but not for
cycles, since they never run. The rooms, lowest first, are declared here on purpose: moving a
module between rooms is a decision this test makes visible.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exitagent", "sandboxes", "evaluators", "training")

# (room, module prefixes), lowest first. A module belongs to the room of its longest matching prefix.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("exitagent.errors", "exitagent.types", "exitagent.faults", "exitagent.log", "exitagent.config",
              "exitagent.precision", "exitagent.policy", "exitagent.prompts", "exitagent.records",
              "exitagent.run_dir", "exitagent.stats")),
    ("sandboxes", ("sandboxes",)),
    ("toolbox", ("exitagent.tools", "exitagent.function_tools")),
    ("task worlds", ("evaluators.worlds",)),
    ("evaluators", ("evaluators",)),
    ("agent", ("exitagent.client", "exitagent.routing", "exitagent.loop", "exitagent.rollouts",
               "exitagent.trajectories", "exitagent.iterates", "exitagent.agent", "exitagent.diversity")),
    ("curriculum", ("exitagent.curriculum",)),
    ("recorder", ("exitagent.recorder",)),  # the embedded agent's episodes into the store
    ("domains", ("exitagent.domains",)),
    ("serving", ("exitagent.serving",)),
    ("entry points", ("exitagent.serve", "exitagent.collect", "exitagent.collect_config", "exitagent.evaluate",
                      "exitagent.run",
                      "exitagent.variants", "exitagent.models", "exitagent.competitions", "exitagent.report",
                      "exitagent.budget", "exitagent.curves", "exitagent.staleness", "exitagent.run_eval",
                      "exitagent.eval_cache", "exitagent.eval_result", "exitagent.run_config")),
    ("training", ("training",)),
    ("embedding API", ("exitagent",)),  # the package itself: `from exitagent import SelfImprovingAgent`
]
RANK = {name: rank for rank, (name, _) in enumerate(ROOMS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def room_of(module: str) -> str:
    matches = [(len(prefix), room) for room, prefixes in ROOMS for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no room: add it to ROOMS"
    return max(matches)[1]


def resolve(module: str, name: str | None) -> str:
    """The module an import names: ``from pkg import sub`` imports the module ``pkg.sub``."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, runs at import or call time) for every import of our packages in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
               for child in node.body for n in ast.walk(child)}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        runs = id(node) not in skipped
        if isinstance(node, ast.Import):
            found += [(alias.name, runs) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(resolve(base, alias.name), runs) for alias in node.names]
    return [(target, runs) for target, runs in found if target.split(".")[0] in PACKAGES]


def test_every_module_has_a_room() -> None:
    for module in MODULES:
        room_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_from_its_own_room_or_lower(module: str) -> None:
    mine = RANK[room_of(module)]
    higher = [f"{target} ({room_of(target)})" for target, _ in imports(module) if RANK[room_of(target)] > mine]
    assert not higher, f"{module} ({room_of(module)}) imports from higher rooms: {higher}"


def test_no_import_cycle() -> None:
    graph = {module: {target for target, runs in imports(module) if runs and target in MODULES and target != module}
             for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_rules_catch_a_violation() -> None:
    """The checks above can fail: a lower room naming a higher one is seen as such."""
    assert RANK[room_of("exitagent.curriculum.store")] < RANK[room_of("exitagent.serving.reload")]
    assert room_of("exitagent") == "embedding API" and room_of("exitagent.errors") == "core"
    assert resolve("exitagent.serving", "checkpoints") == "exitagent.serving.checkpoints"
