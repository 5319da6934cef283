"""The package's import graph has no cycle (module-level and function-level
imports alike), so every module can be read and tested from the bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

import helpers

PACKAGE = helpers.REPO_ROOT / "mmssl_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(helpers.REPO_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports, anywhere in its code."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from . import x
          base = ".".join(package.split(".")[:len(package.split("."))
                                               - node.level + 1] + [base])
          base = base.rstrip(".")
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      for target in targets:
        if target in modules and target != name:
          graph[name].add(target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules (first = last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [
      "a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_imports():
  graph = import_graph()
  assert "mmssl_jax.restore" in graph["mmssl_jax.recommend"]  # in main()
  assert "mmssl_jax.data.dataset" in graph["mmssl_jax.data.formats"]
  assert len(graph) >= 25


def test_the_package_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, " -> ".join(cycle)
