"""The README's Python snippets run and print what the README says they print."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


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
