"""Sweeps end to end on real files: a tiny sweep, refusals of changed configs, unreadable
summaries, SIGTERM."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, tiny_config

from lmhead_jax.runs import grid, sweep


def _tiny_sweep(steps):
  cfg = tiny_config()
  cfg.train.update(steps=steps, log_every=1, bottleneck_every=1, eval_every=0, eval_batches=1)
  cfg.sweep = ({"model.d_model": (16, 32)},
               {"model.d_model": (16,), "optimizer.learning_rate": (1e20,)})
  return cfg


def _describe(cfg):
  return {"D": cfg.model.d_model, "coverage": cfg.train.steps * cfg.train.batch_size}


def test_tiny_sweep_end_to_end(tmp_path, capsys):
  entries = sweep.run(_tiny_sweep(3), tmp_path, _describe)
  names = ["d_model=16", "d_model=32",
           "d_model=16+learning_rate=1e20"]
  assert [e["run"] for e in entries] == names
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert [e["run"] for e in on_disk] == names
  ok, _, bad = on_disk
  assert ok["overrides"] == {"model.d_model": 16} and ok["D"] == 16 and ok["coverage"] == 24
  assert ok["steps"] == 3 and "bottleneck/destroyed_ratio" in ok and ok["wall_s"] > 0
  assert json.loads((tmp_path / names[1] / "config.json").read_text())["model"]["d_model"] == 32
  assert "sweep" not in json.loads((tmp_path / names[1] / "config.json").read_text())
  assert bad["diverged"] and "non-finite" in bad["error"]
  out = capsys.readouterr().out
  assert "[1/3] d_model=16: loss=" in out and "[3/3]" in out and "DIVERGED" in out

  # Started again: every run is finished (or diverged), so nothing trains.
  mtimes = {n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
  again = sweep.run(_tiny_sweep(3), tmp_path, _describe)
  assert again == entries
  assert mtimes == {n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
  index = json.loads((tmp_path / "runs.json").read_text())
  assert index == {n: e["overrides"] for n, e in zip(names, entries)}

  # An older release's directory names (dotted keys, commas) are adopted, not retrained.
  for n, e in zip(names, entries):
    (tmp_path / n).rename(tmp_path / grid.legacy_name(e["overrides"]))
  assert (tmp_path / "model.d_model=16,optimizer.learning_rate=1e+20").is_dir()
  assert sweep.run(_tiny_sweep(3), tmp_path, _describe) == entries
  assert mtimes == {n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in names}


def test_no_sweep_is_a_single_run_into_the_workdir(tmp_path):
  cfg = tiny_config()
  cfg.train.update(steps=2, log_every=1, eval_every=0, eval_batches=0)
  (entry,) = sweep.run(cfg, tmp_path, _describe)
  assert entry["run"] == "" and entry["D"] == 32
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def _one_run_sweep(steps, d_models=(16,)):
  cfg = _tiny_sweep(steps)
  cfg.sweep = ({"model.d_model": d_models},)
  return cfg


def test_changed_config_refuses_the_sweep_before_anything_trains(tmp_path):
  sweep.run(_one_run_sweep(2), tmp_path, _describe)
  files = [tmp_path / "summary.json", *(tmp_path / "d_model=16").iterdir()]
  before = {p: p.read_bytes() for p in files if p.is_file()}
  changed = _one_run_sweep(2, d_models=(16, 32))
  changed.optimizer.learning_rate = 0.002
  with pytest.raises(ValueError) as e:
    sweep.run(changed, tmp_path, _describe)
  assert "d_model=16: optimizer.learning_rate: 0.001 -> 0.002" in str(e.value)
  assert "d_model=32" not in str(e.value) and "new --workdir" in str(e.value)
  with pytest.raises(ValueError, match="d_model=16: train.steps: 2 -> 3"):
    sweep.run(_one_run_sweep(3, d_models=(16, 32)), tmp_path, _describe)
  assert not (tmp_path / "d_model=32").exists()  # refused before the first run trained
  assert before == {p: p.read_bytes() for p in before}


def test_unreadable_summaries_and_configs_are_named(tmp_path, caplog):
  (entry,) = sweep.run(_one_run_sweep(1), tmp_path, _describe)
  run_dir = tmp_path / "d_model=16"
  (tmp_path / "summary.json").write_text('[{"run": "model.d_mo')  # a truncated write
  (again,) = sweep.run(_one_run_sweep(1), tmp_path, _describe)
  assert again == entry | {"wall_s": None}  # rebuilt from the run's own files, not retrained
  assert json.loads((tmp_path / "summary.json").read_text()) == [again]
  assert f"{tmp_path / 'summary.json'} is not valid JSON" in caplog.text
  assert "rebuilding it from the runs' own files" in caplog.text

  for name, text, needle in [("summary.json", '{"loss": 1.', "is not valid JSON"),
                             ("config.json", "garbage", "is not valid JSON"),
                             ("config.json", "[1, 2]", "must hold a JSON object, got [1, 2]")]:
    good = (run_dir / name).read_text()
    (run_dir / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{run_dir / name} {needle}")) as e:
      sweep.run(_one_run_sweep(1), tmp_path, _describe)
    assert f"delete {run_dir} to train the run again" in str(e.value)
    (run_dir / name).write_text(good)


def _preemptible_sweep():
  """Two runs: one of 2 steps, then one long enough to be stopped by SIGTERM while it trains."""
  cfg = _tiny_sweep(1)
  cfg.train.bottleneck_every = 0
  cfg.sweep = ({"train.steps": (2, 300)},)
  return cfg


def test_sigterm_mid_sweep_writes_the_summary_and_repeating_resumes(tmp_path):
  code = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "tests" / "runs")!r}]
import test_sweep
from lmhead_jax.runs import grid, sweep
sweep.run(test_sweep._preemptible_sweep(), {str(tmp_path)!r}, test_sweep._describe)
"""
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  long_run = tmp_path / "steps=300"
  deadline = time.time() + 120
  while time.time() < deadline and not ((long_run / "metrics.jsonl").exists() and
                                        (long_run / "metrics.jsonl").read_text().strip()):
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "[2/2] steps=300: PREEMPTED" in out and "repeat the command to resume" in out
  first, stopped = json.loads((tmp_path / "summary.json").read_text())
  assert first["run"] == "steps=2" and first["steps"] == 2 and "loss" in first
  assert stopped == {"run": "steps=300", "overrides": {"train.steps": 300}, "D": 32,
                     "coverage": 2400, "preempted": True}

  # Both the finished and the stopped run are refused under another config.
  changed = _preemptible_sweep()
  changed.optimizer.learning_rate = 0.002
  with pytest.raises(ValueError) as e:
    sweep.run(changed, tmp_path, _describe)
  assert "steps=2: optimizer.learning_rate" in str(e.value)
  assert "steps=300: optimizer.learning_rate" in str(e.value)

  mtime = (tmp_path / "steps=2" / "metrics.jsonl").stat().st_mtime_ns
  entries = sweep.run(_preemptible_sweep(), tmp_path, _describe)
  assert [(e["run"], e["steps"], "preempted" in e) for e in entries] == [
      ("steps=2", 2, False), ("steps=300", 300, False)]
  assert json.loads((tmp_path / "summary.json").read_text()) == entries
  assert (tmp_path / "steps=2" / "metrics.jsonl").stat().st_mtime_ns == mtime
  starts = [h["step"] for h in json.loads((long_run / "config.json").read_text())["history"]]
  assert starts[0] == 0 and 0 < starts[1] < 300 and len(starts) == 2  # resumed, not restarted
  with open(long_run / "metrics.jsonl") as f:
    assert {json.loads(line)["step"] for line in f} == set(range(1, 301))
