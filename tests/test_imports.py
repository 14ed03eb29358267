"""The package's import graph has no cycles, and a kernel that fails to import
says why when it is chosen.

The graph is read from the source with `ast` (every `import` and `from`
statement, function-local ones included), so a cycle is caught even where
today's import order happens to survive it. Edges:

* `import a.b.c` and `from a.b import c` (c a submodule) point at a.b.c, and
  also at the packages a.b and a, whose `__init__` runs first -- a cycle
  through a package's re-exports is real when that `__init__` imports back.
* Imports under `if TYPE_CHECKING:` are not edges: they never run.
* A module's own ancestor packages are not edges: they are initialised (or
  initialising) before the module runs, so a submodule may import siblings
  through its package without a cycle.
* The kernel registries load their kernels by name on first use
  ("hybridna_jax.kernels.ssd_pallas:..."); those lazy edges are added from
  the registry tables, so kernels importing the public ops back is a cycle.
"""

import ast
import dataclasses
import pathlib

import jax.numpy as jnp
import pytest

import hybridna_jax
from hybridna_jax import attention, ssd

ROOT = pathlib.Path(hybridna_jax.__file__).parent


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path | None]:
  """Module name -> source file of the package at `root`, packages as their
  `__init__.py` (namespace packages, directories without one, as None)."""
  modules = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  for directory in sorted(p for p in root.rglob("*") if p.is_dir()):
    name = ".".join(directory.relative_to(root.parent).parts)
    if "__pycache__" not in name and any(directory.glob("*.py")):
      modules.setdefault(name, None)
  return modules


def _ancestors(name: str) -> list[str]:
  """'a.b.c' -> ['a', 'a.b']."""
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def _runtime_nodes(tree: ast.AST):
  """Every node, except the bodies of `if TYPE_CHECKING:` (never executed)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      stack.extend(node.orelse)
    else:
      stack.extend(ast.iter_child_nodes(node))


def _imported_names(module: str, path: pathlib.Path, modules) -> set[str]:
  """Modules of the package that `module`'s import statements name."""
  is_package = path.name == "__init__.py"
  names = set()
  for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, up level - 1
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module
      names.add(target)
      # `from pkg import sub` imports the submodule pkg.sub.
      names.update(
        f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules
      )
  return {n for n in names if n in modules}


def import_graph(root: pathlib.Path = ROOT, registries=True) -> dict[str, set[str]]:
  """Module -> the package's modules that importing it runs first."""
  modules = module_files(root)
  graph = {}
  for module, path in modules.items():
    if path is None:
      graph[module] = set()
      continue
    targets = set()
    for name in _imported_names(module, path, modules):
      targets.add(name)
      targets.update(a for a in _ancestors(name) if a in modules)  # their __init__s
    own = set(_ancestors(module))
    graph[module] = {t for t in targets if t != module and t not in own}
  if not registries:
    return graph
  # Lazy edges: the public ops load their kernels by module name.
  for public, registry in (
    ("hybridna_jax.ssd", ssd.CORES),
    ("hybridna_jax.attention", attention.KERNELS),
  ):
    for kernel in registry.kernels.values():
      target = kernel.source.split(":")[0]
      graph[public].add(target)
      graph[public].update(
        a for a in _ancestors(target) if a in modules and a not in _ancestors(public)
      )
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component (Tarjan), as a closed path."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
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
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(_cycle_in(graph, component, v))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return cycles


def _cycle_in(graph, component, start) -> list[str]:
  """A closed path start -> ... -> start inside one component (BFS)."""
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]  # start -> ... -> v -> start
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError("a strongly connected component without a cycle")


def test_graph_edges(tmp_path):
  """The graph builder on a small package: package re-exports, the parent
  `__init__` a submodule import runs, siblings, function-local imports and
  TYPE_CHECKING blocks."""
  files = {
    "pkg/__init__.py": "",
    "pkg/sub/__init__.py": "from pkg.sub.a import A\n",
    "pkg/sub/a.py": "from pkg.sub import b\nA = 1\n",
    "pkg/sub/b.py": "def f():\n  from pkg import c\n",
    "pkg/c.py": "from pkg.sub.b import f\n",
    "pkg/d.py": (
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
      "  from pkg import c\nelse:\n  from . import e\n"
    ),
    "pkg/e.py": "import numpy\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph = import_graph(tmp_path / "pkg", registries=False)
  assert graph["pkg.sub"] == {"pkg.sub.a"}  # re-export
  assert graph["pkg.sub.a"] == {"pkg.sub.b"}  # not its own package
  assert graph["pkg.sub.b"] == {"pkg.c"}  # function-local
  assert graph["pkg.c"] == {"pkg.sub.b", "pkg.sub"}  # runs sub/__init__
  assert graph["pkg.d"] == {"pkg.e"}  # no TYPE_CHECKING edge
  # One (shortest) cycle per strongly connected component.
  assert find_cycles(graph) == [["pkg.c", "pkg.sub.b", "pkg.c"]]


def test_graph_of_this_package():
  graph = import_graph()
  assert "hybridna_jax.ssd_reference" in graph["hybridna_jax.kernels.ssd_pallas"]
  assert "hybridna_jax.restore" in graph["hybridna_jax.scoring.scorer"]  # local
  assert "hybridna_jax.data" in graph["hybridna_jax.config"]  # data/__init__
  # Lazy kernel edges from the registry tables.
  assert "hybridna_jax.kernels.ssd_pallas" in graph["hybridna_jax.ssd"]
  assert "hybridna_jax.kernels.attention_kernels" in graph["hybridna_jax.attention"]


def test_find_cycles_names_the_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycles(graph) == [["a", "b", "c", "a"]]
  assert not find_cycles({"a": {"b"}, "b": set()})


def test_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_kernels_never_import_the_public_ops():
  """Kernels import the XLA references; the public modules load kernels."""
  graph = import_graph()
  for module, targets in graph.items():
    if module.startswith("hybridna_jax.kernels"):
      assert not targets & {"hybridna_jax.ssd", "hybridna_jax.attention"}, module


@pytest.mark.parametrize(
  "registry,name",
  [(ssd.CORES, "pallas_gpu_interpret"), (attention.KERNELS, "pallas_gpu_interpret")],
)
def test_failed_kernel_import_is_reported(monkeypatch, registry, name):
  """Choosing a kernel whose module does not import raises an error that shows
  the import error (chained), instead of "unknown implementation"."""
  broken = dataclasses.replace(
    registry.kernels[name], source="hybridna_jax.kernels.no_such_module:core"
  )
  monkeypatch.setitem(registry.kernels, name, broken)
  with pytest.raises(ImportError, match="no_such_module") as info:
    registry.resolve(name)
  assert isinstance(info.value.__cause__, ImportError)
  assert name in str(info.value)
  # The XLA references are untouched.
  assert registry.resolve(registry.fallback).fn is not None


def test_public_op_reports_a_failed_kernel_import(monkeypatch):
  broken = dataclasses.replace(
    ssd.CORES.kernels["pallas_gpu"], source="hybridna_jax.kernels.no_such_module:core"
  )
  monkeypatch.setitem(ssd.CORES.kernels, "pallas_gpu", broken)
  b, l, h, p, g, n = 1, 24, 3, 5, 1, 7  # shapes no other test traces
  x, B = jnp.ones((b, l, h, p)), jnp.ones((b, l, g, n))
  with pytest.raises(ImportError, match="pallas_gpu.*No module named"):
    ssd.ssd_chunked_scan(x, jnp.ones((b, l, h)), -jnp.ones((h,)), B, B, 8, impl="pallas_gpu")


def test_auto_falls_back_with_a_warning_when_its_kernel_fails(monkeypatch, caplog):
  name = ssd.CORES.resolve("auto", platform="gpu").name
  broken = dataclasses.replace(ssd.CORES.kernels[name], source="hybridna_jax.no_such:core")
  monkeypatch.setitem(ssd.CORES.kernels, name, broken)
  assert ssd.CORES.resolve("auto", platform="gpu").name == ssd.CORES.fallback
  assert "no_such" in caplog.text
