"""The layer rule: no module of lmhead_jax imports from a higher layer, at module or function level;
the flat layout's public names still import, as the same module objects, and only when asked for."""

import ast
import pathlib
import subprocess
import sys

import pytest

import lmhead_jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lmhead_jax"


def imported_names(source: str) -> set[str]:
  """Every lmhead_jax name that `source` imports, anywhere (function bodies included); for
  `from a import b` both `a` and `a.b` (b may be a module)."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"relative import of {node.module!r}: write it absolute"
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return {name for name in out if name.split(".")[0] == "lmhead_jax"}


def layer_violations(layer: str, names: set[str]) -> list[str]:
  """The names a module of `layer` must not import: a higher layer's, or none at all (an old
  flat name, or a module that does not exist in any layer)."""
  rank = lmhead_jax.LAYERS.index(layer)
  bad = []
  for name in sorted(names):
    parts = name.split(".")
    if len(parts) == 1:
      continue  # `import lmhead_jax` itself
    if parts[1] not in lmhead_jax.LAYERS:
      bad.append(f"{name} (not in a layer; import it from its layer)")
    elif lmhead_jax.LAYERS.index(parts[1]) > rank:
      bad.append(f"{name} (layer {parts[1]} is above {layer})")
  return bad


def modules():
  return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the lmhead_jax modules it imports}, for every module of the package; `from a import
  b` is an edge to a.b when that is a module, else to a."""
  paths = sorted(PACKAGE.rglob("*.py"))
  names = {module_name(p) for p in paths}
  graph = {}
  for p in paths:
    edges = set()
    for name in imported_names(p.read_text()):
      while name not in names and "." in name:
        name = name.rpartition(".")[0]
      edges.add(name)
    graph[module_name(p)] = edges - {module_name(p)}
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import circles of `graph` (its strongly connected components of more than one module),
  package `__init__`s left out (importing a package's module runs its `__init__` first)."""
  graph = {m: {n for n in e if n in graph and n != "lmhead_jax" and m != "lmhead_jax"}
           for m, e in graph.items()}
  index, low, stack, out, counter = {}, {}, [], [], [0]

  def visit(m):
    index[m] = low[m] = counter[0]
    counter[0] += 1
    stack.append(m)
    for n in graph[m]:
      if n not in index:
        visit(n)
        low[m] = min(low[m], low[n])
      elif n in stack:
        low[m] = min(low[m], index[n])
    if low[m] == index[m]:
      component = []
      while True:
        n = stack.pop()
        component.append(n)
        if n == m:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for m in sorted(graph):
    if m not in index:
      visit(m)
  return out


def test_no_import_circle():
  graph = import_graph()
  assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the scan sees the modules
  assert circles(graph) == []
  # the check finds a circle when there is one, inside a function body too
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_lives_in_a_layer():
  assert {p.name for p in PACKAGE.glob("*.py")} == {"__init__.py"}
  assert {p.relative_to(PACKAGE).parts[0] for p in modules()} == set(lmhead_jax.LAYERS)
  for layer in lmhead_jax.LAYERS:  # each layer says what lives there and what it may import
    assert "Imports:" in ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))


def test_no_lower_layer_imports_a_higher_one():
  found = {str(p.relative_to(ROOT)): imported_names(p.read_text()) for p in modules()}
  assert sum(map(len, found.values())) > 100  # the scan sees the imports
  bad = {path: layer_violations(pathlib.Path(path).parts[1], names)
         for path, names in found.items()}
  assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("layer, source, expected", [
    ("core", "from lmhead_jax.training import train",
     ["lmhead_jax.training", "lmhead_jax.training.train"]),
    ("core", "def f():\n  if 1:\n    import lmhead_jax.analysis.gram\n",
     ["lmhead_jax.analysis.gram"]),
    ("training", "def f():\n  from lmhead_jax.reporting.metrics import curve\n",
     ["lmhead_jax.reporting.metrics", "lmhead_jax.reporting.metrics.curve"]),
    ("tools", "from lmhead_jax import sweep", ["lmhead_jax.sweep"]),
    ("core", "from lmhead_jax import bottleneck", ["lmhead_jax.bottleneck"]),
    ("analysis", "from lmhead_jax.data import hf\nfrom lmhead_jax.core.config import HeadConfig\n"
     "import lmhead_jax", []),
])
def test_the_rule_fails_on_upward_and_unknown_imports(layer, source, expected):
  got = layer_violations(layer, imported_names(source))
  assert [g.split()[0] for g in got] == expected


def test_imports_outside_the_package_name_a_layer_or_a_moved_name():
  """experiments/, tests/, benchmarks/ and scripts/ import from a layer (or a moved public name):
  an editable install of the flat layout cannot hide a stale `from lmhead_jax import sweep`."""
  found = {p: imported_names(p.read_text()) for d in ("experiments", "tests", "benchmarks",
                                                      "scripts") for p in (ROOT / d).glob("*.py")}
  assert sum(map(len, found.values())) > 50
  top = lambda name: ".".join(name.split(".")[:2])  # lmhead_jax.<layer or old name>
  stale = {str(p): sorted(n for n in names if "." in n and n.split(".")[1] not in lmhead_jax.LAYERS
                          and top(n) not in lmhead_jax.MOVED) for p, names in found.items()}
  assert not {k: v for k, v in stale.items() if v}


def test_moved_public_names_are_the_same_modules():
  import lmhead_jax.bottleneck as imported
  from lmhead_jax import bottleneck, hf, model, plan, train
  from lmhead_jax.bottleneck import linear_head_stats
  from lmhead_jax.core import bottleneck as core_bottleneck
  from lmhead_jax.core import model as core_model
  from lmhead_jax.data import hf as tools_hf
  from lmhead_jax.tools import plan as tools_plan
  from lmhead_jax.training import train as training_train
  assert imported is bottleneck is core_bottleneck is sys.modules["lmhead_jax.bottleneck"]
  assert linear_head_stats is core_bottleneck.linear_head_stats
  assert (model, hf, plan, train) == (core_model, tools_hf, tools_plan, training_train)
  assert model.__spec__.name == "lmhead_jax.core.model"  # the alias leaves the real spec alone
  assert callable(model.init) and callable(model.hidden) and callable(hf.load_checkpoint)
  assert callable(train.make_train_step)


def test_import_lmhead_jax_is_lazy_and_python_m_plan_runs():
  code = ("import sys, lmhead_jax; print(sorted(m for m in sys.modules "
          "if m.split('.')[0] in ('lmhead_jax', 'jax', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "['lmhead_jax']"
  r = subprocess.run([sys.executable, "-m", "lmhead_jax.plan", "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert "Traceback" not in r.stderr, r.stderr  # absl's --help exits 1 after printing the usage
  assert "python -m lmhead_jax.plan --config=" in r.stdout and "--slice" in r.stdout


def private_uses(source: str) -> list[str]:
  """`module._name` uses and `from lmhead_jax.x import _name` imports of another module's private
  names in `source`."""
  tree, modules, out = ast.parse(source), set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmhead_jax"):
      for alias in node.names:
        modules.add(alias.asname or alias.name)
        if alias.name.startswith("_"):
          out.append(f"{node.module}.{alias.name}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
        and node.value.id in modules):
      out.append(f"{node.value.id}.{node.attr}")
  return out


def test_no_module_uses_another_modules_private_names():
  found = {str(p.relative_to(ROOT)): private_uses(p.read_text()) for p in modules()}
  assert not {k: v for k, v in found.items() if v}
  assert private_uses("from lmhead_jax.core import loss\nloss._to_chunks(x)\n"
                      "from lmhead_jax.data.hf import _read_json") == [
                          "lmhead_jax.data.hf._read_json", "loss._to_chunks"]


def test_module_docstrings_are_short():
  """A module docstring says what the module is for in at most 15 lines; tables, formats and
  measurements live in docs/ (INTERNALS.md, PERFORMANCE.md)."""
  long = {str(p.relative_to(ROOT)): len(ast.get_docstring(ast.parse(p.read_text())).splitlines())
          for p in modules() if ast.get_docstring(ast.parse(p.read_text()))}
  assert len(long) > 40
  assert {k: v for k, v in long.items() if v > 15} == {}


def test_tests_mirror_modules():
  """lmhead_jax/<layer>/<module>.py is tested in tests/<layer>/test_<module>[_<aspect>].py;
  every test file under a layer's folder names a module of that layer. Cross-module tests live in
  tests/integration/, the 8-device ones in tests/multidevice/."""
  tests = ROOT / "tests"
  for path in modules():
    if path.name == "__init__.py":
      continue
    layer, name = path.parent.name, path.stem
    found = [*tests.glob(f"{layer}/test_{name}.py"), *tests.glob(f"{layer}/test_{name}_*.py")]
    assert found, f"{path.relative_to(ROOT)} has no tests/{layer}/test_{name}.py"
  names = {(p.parent.name, p.stem) for p in modules()}
  for path in tests.glob("*/test_*.py"):
    if path.parent.name in ("integration", "multidevice"):
      continue
    stem = path.stem.removeprefix("test_")
    assert any((path.parent.name, stem) == n or stem.startswith(n[1] + "_") and path.parent.name
               == n[0] for n in names), f"{path.relative_to(ROOT)} names no module of its layer"
  assert not list(tests.glob("test_*.py")), "test files live in a layer's folder or integration/"
