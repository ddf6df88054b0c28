"""The layer rule: no module of lmhead_jax imports from a higher layer, at module or function level;
the flat layout's public names still import, as the same module objects, and only when asked for."""

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

import lmhead_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    ("training", "def f():\n  from lmhead_jax.reporting.runs import curve\n",
     ["lmhead_jax.reporting.runs", "lmhead_jax.reporting.runs.curve"]),
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


def test_every_dotted_name_in_the_docs_imports():
  """Each `lmhead_jax.a.b` in README.md and CONTRIBUTING.md is a module or an attribute of one."""
  text = "".join((ROOT / f).read_text() for f in ("README.md", "CONTRIBUTING.md"))
  names = set(re.findall(r"\blmhead_jax(?:\.[A-Za-z_]\w*)+", text))
  assert {"lmhead_jax.hf.load_checkpoint", "lmhead_jax.plan"} <= names
  for name in sorted(names):
    parts = name.split(".")
    for n in range(len(parts), 0, -1):  # the longest prefix that imports, then attributes
      try:
        obj = importlib.import_module(".".join(parts[:n]))
        break
      except ModuleNotFoundError:
        continue
    assert pathlib.Path(obj.__file__).is_relative_to(PACKAGE), f"{name}: from {obj.__file__}"
    for attr in parts[n:]:
      obj = getattr(obj, attr)  # AttributeError names what the docs get wrong
