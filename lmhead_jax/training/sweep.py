"""Sweeps: one config, many runs, each into DIR/<run>/, and one DIR/summary.json for all.

`cfg.sweep` is a tuple of grids. A grid maps dotted config keys to tuples of values; its runs
are the product of those values (keys in sorted order, the first varying slowest). The sweep
runs every grid's runs in order, skipping repeats. A run is named by its sorted overrides,
e.g. `model.d_model=16,optimizer.name=sgd`, and trains the config without `sweep`, with its
overrides applied (command-line overrides of other keys apply to every run).

DIR/summary.json is a list with one entry per run: `run`, `overrides`, the experiment's
`describe(cfg)` fields, the run's final metrics (its own summary.json) and `wall_s`. A run
whose summary.json covers `train.steps` is skipped when the sweep is started again; an
unfinished one resumes from its checkpoint. A run that hits a non-finite loss is recorded as
`diverged` and the sweep goes on. A config without `sweep` is a single run into DIR itself.
A run's progress names it (`<DIR's name>/<run> [i/n]`) and gives the sweep's ETA: the runs left
to train take the mean wall time of those this call trained.
"""

import copy
import functools
import itertools
import json
import time
from collections.abc import Callable

import jax
from etils import epath

from lmhead_jax.training import logs, runner


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


def _read_json(path: epath.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _line(i: int, n: int, entry: dict) -> str:
  """One printed line per finished run."""
  keys = ("loss", "accuracy", "eval/loss", "eval/accuracy", "bottleneck/destroyed_ratio")
  parts = [f"{k.removeprefix('bottleneck/')}={entry[k]:.4f}" for k in keys
           if isinstance(entry.get(k), float)]
  if entry.get("diverged"):
    parts.insert(0, "DIVERGED")
  if entry.get("wall_s") is not None:
    parts.append(f"({entry['wall_s']:.0f} s)")
  return f"[{i}/{n}] {entry['run']}: {' '.join(parts)}"


def _run_one(cfg, run_dir: epath.Path, position: logs.Position) -> dict:
  """The run's summary; a non-finite loss ends it as `diverged` (written, so it is not redone)."""
  try:
    return runner.run(cfg, run_dir, position)
  except FloatingPointError as e:
    summary = {"diverged": True, "error": str(e), "steps": int(cfg.train.steps)}
    if jax.process_index() == 0:
      (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(cfg, workdir, describe: Callable[[object], dict] | None = None) -> list[dict]:
  """Trains every run of `cfg.sweep` (or the single run of `cfg`); returns the entries."""
  workdir = epath.Path(workdir)
  describe = describe or (lambda c: {})
  grids = cfg.get("sweep") or ()
  if not grids:
    t = time.perf_counter()
    summary = runner.run(cfg, workdir)
    return [{"run": "", "overrides": {}, **describe(cfg), **summary,
             "wall_s": time.perf_counter() - t}]
  runs = expand(grids)
  configs = [configure(cfg, o) for o in runs]  # every key is checked before anything trains
  previous = {e["run"]: e for e in _read_json(workdir / "summary.json") or []}
  names = [run_name(o) for o in runs]
  summaries = [_read_json(workdir / name / "summary.json") for name in names]
  todo = [not (s and s.get("steps") == int(c.train.steps)) for s, c in zip(summaries, configs)]
  entries, walls = [], []  # walls: of the runs trained by this call
  sweep_name = workdir.name or workdir.resolve().name
  for i, (overrides, run_cfg, name, summary) in enumerate(zip(runs, configs, names, summaries), 1):
    if not todo[i - 1]:
      wall = previous.get(name, {}).get("wall_s")
    else:
      mean = sum(walls) / len(walls) if walls else None
      position = logs.Position(f"{sweep_name}/{name}", i, len(runs), sum(todo[i:]), mean)
      t = time.perf_counter()
      summary = _run_one(run_cfg, workdir / name, position)
      wall = time.perf_counter() - t
      walls.append(wall)
    entries.append({"run": name, "overrides": overrides, **describe(run_cfg), **summary,
                    "wall_s": wall})
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "summary.json").write_text(json.dumps(entries, indent=2))
      print(_line(i, len(runs), entries[-1]), flush=True)
  return entries


def publish(workdir, report: Callable[[], str]) -> None:
  """On host 0: `report()` (which may save figures), written to DIR/results.md and printed,
  then the list of DIR's figures and files."""
  if jax.process_index() == 0:
    text = report()
    (epath.Path(workdir) / "results.md").write_text(text + "\n")
    print(text)
    print(logs.listing(workdir), flush=True)
