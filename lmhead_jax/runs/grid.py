"""Grids of runs: `cfg.sweep` is a tuple of grids, each mapping dotted config keys to tuples of
values; a grid's runs are the product of its values (keys sorted, the first varying slowest).

A run's name (its directory) is safe in shells and object stores: `leaf=value` per override, in
sorted key order, joined by `+` (`d_model=16+name=sgd`); a leaf that two keys share keeps its
dotted key, floats are written without `+` (1e20), and other characters than [A-Za-z0-9._=-]
become `_`. Two runs whose names would collide are refused. Names of an older release (dotted
keys joined by commas) are `legacy_name`s, which a sweep renames on resume."""

import copy
import functools
import itertools
import re


def expand(grids) -> list[dict]:
  """The override dicts of the runs of `grids`, in order, without repeats."""
  runs, seen = [], {}
  for grid in grids:
    keys = sorted(grid)
    for key in keys:
      if isinstance(grid[key], (str, bytes)) or not hasattr(grid[key], "__iter__"):
        raise ValueError(f"sweep key {key!r} needs a tuple of values, got {grid[key]!r}")
    for values in itertools.product(*(grid[k] for k in keys)):
      overrides = dict(zip(keys, values))
      name = run_name(overrides)
      if name in seen and seen[name] != overrides:
        raise ValueError(f"sweep runs {seen[name]} and {overrides} would share the directory "
                         f"{name!r}")
      if name not in seen:
        seen[name] = overrides
        runs.append(overrides)
  return runs


def _fmt(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def run_name(overrides: dict) -> str:
  """The run's directory name (module docstring)."""
  leaves = [k.rsplit(".", 1)[-1] for k in overrides]
  shown = {k: k if leaves.count(k.rsplit(".", 1)[-1]) > 1 else k.rsplit(".", 1)[-1]
           for k in overrides}
  text = "+".join(f"{shown[k]}={_fmt(overrides[k]).replace('e+', 'e')}" for k in sorted(overrides))
  return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def legacy_name(overrides: dict) -> str:
  """The name an older release gave the run: dotted keys joined by commas."""
  return ",".join(f"{k}={_fmt(overrides[k])}" for k in sorted(overrides))


def configure(cfg, overrides: dict):
  """A copy of `cfg` without `sweep`, with the dotted `overrides` set; errors name the key."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    if "sweep" in out:
      del out["sweep"]
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    try:
      node = functools.reduce(lambda d, k: d[k], path, out)
      if leaf not in node:
        raise KeyError(key)
    except (KeyError, TypeError):
      raise ValueError(f"sweep key {key!r} is not a key of the config") from None
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"sweep key {key!r} cannot take {value!r}: {e}") from e
  return out
