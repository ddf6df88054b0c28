"""The README's Python snippets run and print what the README says they print."""

import contextlib
import io
import os
import re

import helpers

README = os.path.join(helpers.ROOT, "README.md")


def snippets():
  return re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def run(code):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, README, "exec"), {})
  return out.getvalue()


def test_bottleneck_example_prints_random_baseline():
  (code,) = [s for s in snippets() if "linear_head_stats" in s]
  value = float(re.search(r"destroyed_ratio=([0-9.]+)", run(code)).group(1))
  assert abs(value - (1 - 64 / 8192) ** 0.5) < 2e-3


def test_train_step_example_runs():
  (code,) = [s for s in snippets() if "make_train_step" in s]
  out = run(code)
  assert "bottleneck/destroyed_ratio" in out


def test_every_dotted_name_in_the_docs_imports():
  """Each `lmhead_jax.a.b` in a docstring, README or docs file names a module or attribute that
  exists (docs used to name modules that had moved)."""
  import importlib
  import pathlib
  root = pathlib.Path(README).parent
  files = [*root.glob("lmhead_jax/**/*.py"), *root.glob("experiments/*.py"),
           *root.glob("benchmarks/*.py"), *root.glob("*.md"), *root.glob("docs/*.md"),
           *root.glob("tpu/*.md"), *root.glob("gpu/*.md")]
  names = {m.group(0): f.name for f in files
           for m in re.finditer(r"(?<![/\w.])lmhead_jax(?:\.[A-Za-z_]\w*)+", f.read_text())}
  assert len(names) > 20
  missing = []
  for name, where in sorted(names.items()):
    parts, obj = name.split("."), None
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
      with contextlib.suppress(ImportError):
        obj = importlib.import_module(".".join(parts[:i]))
        break
    try:
      for part in parts[i:]:
        obj = getattr(obj, part)
    except AttributeError:
      missing.append(f"{name} ({where})")
  assert not missing, missing


def test_ci_runs_the_readmes_test_command():
  """`.ci/run` runs the tests exactly as the README tells a user to."""
  readme = re.findall(r"^\.venv/bin/python -m pytest(.*)$", open(README).read(), flags=re.M)
  ci = re.findall(r'^"\$venv/bin/python" -m pytest(.*)$',
                  open(os.path.join(helpers.ROOT, ".ci", "run")).read(), flags=re.M)
  assert len(readme) == 1 and ci == readme, (readme, ci)
