"""Sweeps: one config, many runs, each into DIR/<run>/, and one DIR/summary.json for all.

`cfg.sweep` is a tuple of grids (`lmhead_jax.runs.grid`); a run is named by its sorted
overrides, e.g. `d_model=16+name=sgd`; DIR/runs.json maps names to overrides. DIR/summary.json
holds one entry per run:
`run`, `overrides`, the experiment's `describe(cfg)` fields, the run's final metrics and
`wall_s`. Before anything trains, every run directory with a config.json is compared with the
run's resolved config now: any difference refuses the whole sweep, naming runs and keys. A
finished run is skipped, an unfinished one resumes, a diverged one is recorded and the sweep goes
on; SIGTERM writes the summary so far and exits 0. The rules in full: docs/INTERNALS.md.
"""

import json
import logging
import time
from collections.abc import Callable

import jax
from etils import epath
from jax.experimental import multihost_utils

from lmhead_jax.runs import experiment, grid, logs, runner

log = logging.getLogger(__name__)


def _read_json(path: epath.Path, kind: type, fix: str):
  """The JSON object (`kind` dict) or list (`kind` list) in `path`, None when there is no file;
  anything else is a ValueError naming the file and saying how to `fix` it."""
  if not path.exists():
    return None
  try:
    value = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): {fix}") from None
  if not isinstance(value, kind):
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"{path} must hold a JSON {'object' if kind is dict else 'list'}, got "
                     f"{shown}: {fix}")
  return value


def _walls(workdir: epath.Path) -> dict:
  """{run: wall_s} from DIR/summary.json; unreadable, it is warned about and left out."""
  try:
    entries = _read_json(workdir / "summary.json", list,
                         "rebuilding it from the runs' own files (their wall times are lost)")
  except ValueError as e:
    log.warning("%s", e)
    return {}
  return {e.get("run"): e.get("wall_s") for e in entries or () if isinstance(e, dict)}


def _summary(run_dir: epath.Path) -> dict | None:
  return _read_json(run_dir / "summary.json", dict,
                    "it is written when the run ends: delete it to resume the run from its "
                    f"last checkpoint, which writes it again, or delete {run_dir} to train the "
                    "run again")


def _changed(run_dir: epath.Path, cfg) -> dict | None:
  """{dotted key: (recorded, now)} where run_dir/config.json (without `history`) differs from
  `cfg` resolved; None when the run has no config.json."""
  recorded = _read_json(run_dir / "config.json", dict,
                        "it records the config the run was trained with: restore it, or "
                        f"delete {run_dir} to train the run again")
  if recorded is None:
    return None
  recorded.pop("history", None)
  return experiment.changed_keys(recorded, cfg)


def _refuse_changed(workdir: epath.Path, changed: dict) -> None:
  """A ValueError listing the runs whose config.json differs from this call's config."""
  lines = [f"  {name}: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in keys.items())
           for name, keys in changed.items()]
  raise ValueError(
      f"sweep {workdir}: {len(changed)} run(s) were trained with a config that differs from "
      "this call's (their config.json, key: old -> new):\n" + "\n".join(lines) + "\nTheir "
      "results would not match this config. Use a new --workdir, restore the old values, or "
      "delete those run directories to train them again.")


def _adopt_legacy(workdir: epath.Path, runs: list[dict], names: list[str]) -> None:
  """Renames run directories of an older release's names (`grid.legacy_name`) to today's, so
  that a sweep begun before the rename resumes."""
  if jax.process_index() == 0:
    for overrides, name in zip(runs, names):
      old = workdir / grid.legacy_name(overrides)
      if old.name != name and old.exists() and not (workdir / name).exists():
        log.warning("renaming the run directory %s to %s (the run names of this release)",
                    old, name)
        old.rename(workdir / name)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("sweep run names")


def _write_index(workdir: epath.Path, runs: list[dict], names: list[str]) -> None:
  """DIR/runs.json: {run name: its overrides}."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs.json").write_text(json.dumps(dict(zip(names, runs)), indent=2))


def _write(workdir: epath.Path, entries: list[dict]) -> None:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(entries, indent=2))


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
  runs = grid.expand(grids)
  configs = [grid.configure(cfg, o) for o in runs]  # every key is checked before anything trains
  names = [grid.run_name(o) for o in runs]
  _adopt_legacy(workdir, runs, names)
  _write_index(workdir, runs, names)
  changes = [_changed(workdir / name, c) for name, c in zip(names, configs)]
  if changed := {name: keys for name, keys in zip(names, changes) if keys}:
    _refuse_changed(workdir, changed)
  summaries = [_summary(workdir / name) for name in names]
  todo = [not (keys is not None and s and s.get("steps") == int(c.train.steps))
          for keys, s, c in zip(changes, summaries, configs)]  # keys is None: no config.json
  previous = _walls(workdir)
  entries, walls = [], []  # walls: of the runs trained by this call
  sweep_name = workdir.name or workdir.resolve().name
  for i, (overrides, run_cfg, name, summary) in enumerate(zip(runs, configs, names, summaries), 1):
    entry = {"run": name, "overrides": overrides, **describe(run_cfg)}
    if not todo[i - 1]:
      wall = previous.get(name)
    else:
      mean = sum(walls) / len(walls) if walls else None
      position = logs.Position(f"{sweep_name}/{name}", i, len(runs), sum(todo[i:]), mean)
      t = time.perf_counter()
      try:
        summary = _run_one(run_cfg, workdir / name, position)
      except runner.Preempted as e:
        _write(workdir, [*entries, entry | {"preempted": True}])
        if jax.process_index() == 0:
          print(f"[{i}/{len(runs)}] {name}: PREEMPTED ({e.message}); repeat the command to "
                "resume this run", flush=True)
        raise
      wall = time.perf_counter() - t
      walls.append(wall)
    entries.append(entry | summary | {"wall_s": wall})
    _write(workdir, entries)
    if jax.process_index() == 0:
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
