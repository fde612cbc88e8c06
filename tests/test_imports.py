"""lmtrain's import graph, read from the source with ast: commands import blocks only, and nothing imports itself
back, module by module or package by package (imports inside functions count as much as those at the top)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmtrain

SOURCE = Path(lmtrain.__file__).parent
COMMANDS = {
    "lmtrain.train",
    "lmtrain.sample",
    "lmtrain.export",
    "lmtrain.schedule",
    "lmtrain.check",
    "lmtrain.report",
    "lmtrain.bench",
    "lmtrain.bench_train",
    "lmtrain.tokenizer.__main__",
}
SUBCOMMANDS = {"lmtrain.bench": {"lmtrain.bench_train", "lmtrain.bench_prepare"}}  # `bench train` runs bench_train


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not `.__init__`)."""
    modules = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = ("lmtrain", *path.relative_to(SOURCE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lmtrain modules that `name` imports anywhere in its file."""
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""  # from .. import
            module = ".".join(part for part in (base, node.module) if part)
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
            targets = submodules if len(submodules) == len(node.names) else [*submodules, module]  # names in module
        else:
            continue
        found.update(t for t in targets if t.partition(".")[0] == "lmtrain" and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def package_of(name: str) -> str:
    """lmtrain.data.corpus -> lmtrain.data; a top-level module (lmtrain.train) stands for itself."""
    return ".".join(name.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first node repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below is explored

    def visit(path: list[str]) -> list[str] | None:
        state[path[-1]] = "open"
        for nxt in sorted(graph.get(path[-1], ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit([*path, nxt])):
                return cycle
        state[path[-1]] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit([start])):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_top_level_relative_and_function_level_imports():
    graph = import_graph()
    assert COMMANDS <= graph.keys()
    assert "lmtrain.cli" in graph["lmtrain.train"]  # from .cli import command
    assert "lmtrain.config" in graph["lmtrain.cli"]  # from . import config
    assert "lmtrain.sources" in graph["lmtrain.tokenizer.__main__"]  # inside a function: from ..sources import ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_command_imports_another_command():
    graph = import_graph()
    for command in sorted(COMMANDS):
        own = SUBCOMMANDS.get(command, set())
        others = sorted((reachable(graph, command) & COMMANDS) - own - {command})
        assert not others, f"{command} imports the command(s) {others}: move what they share into a block"


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_no_package_imports_itself_back():
    packages: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        packages.setdefault(package_of(name), set()).update(package_of(t) for t in targets)
    assert find_cycle({p: targets - {p} for p, targets in packages.items()}) is None


def test_printing_the_config_and_the_help_import_no_training_stack():
    """`--cfg job` and `--help` print from Hydra alone: Lightning (4 s of imports) is imported by the task."""
    import subprocess
    import sys

    code = (
        "import runpy, sys\n"
        "for args in (['--cfg', 'job', 'experiment=smoke'], ['--help']):\n"
        "    sys.argv = ['lmtrain.train', *args]\n"
        "    try:\n"
        "        runpy.run_module('lmtrain.train', run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False" and "schema" not in out  # no internal group in --help either
