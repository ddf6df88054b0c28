"""Grids of runs: `cfg.sweep` is a tuple of grids, each mapping dotted config keys to tuples of
values; a grid's runs are the product of its values (keys sorted, the first varying slowest)."""

import copy
import functools
import itertools


def expand(grids) -> list[dict]:
  """The override dicts of the runs of `grids`, in order, without repeats."""
  runs, seen = [], set()
  for grid in grids:
    keys = sorted(grid)
    for key in keys:
      if isinstance(grid[key], (str, bytes)) or not hasattr(grid[key], "__iter__"):
        raise ValueError(f"sweep key {key!r} needs a tuple of values, got {grid[key]!r}")
    for values in itertools.product(*(grid[k] for k in keys)):
      overrides = dict(zip(keys, values))
      if (name := run_name(overrides)) not in seen:
        seen.add(name)
        runs.append(overrides)
  return runs


def _fmt(v) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def run_name(overrides: dict) -> str:
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
