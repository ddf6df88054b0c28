"""Sweeps: expansion, per-run configs, and a tiny sweep end to end on real files."""

import json
import math

import pytest
from helpers import tiny_config

from lmhead_jax.training import sweep


def test_expand_is_the_union_of_grid_products_without_repeats():
  grids = ({"model.d_model": (4, 8), "optimizer.name": ("adamw", "sgd")},
           {"optimizer.name": ("sgd",), "model.d_model": (8, 16)})
  assert sweep.expand(grids) == [
      {"model.d_model": 4, "optimizer.name": "adamw"},
      {"model.d_model": 4, "optimizer.name": "sgd"},
      {"model.d_model": 8, "optimizer.name": "adamw"},
      {"model.d_model": 8, "optimizer.name": "sgd"},
      {"model.d_model": 16, "optimizer.name": "sgd"}]


def test_run_names():
  assert sweep.run_name({"optimizer.name": "sgd", "model.d_model": 16}) == (
      "model.d_model=16,optimizer.name=sgd")
  assert sweep.run_name({"optimizer.learning_rate": 1e-2, "model.tie_embeddings": True}) == (
      "model.tie_embeddings=True,optimizer.learning_rate=0.01")
  assert sweep.run_name({"optimizer.learning_rate": 3e-5}) == "optimizer.learning_rate=3e-05"


@pytest.mark.parametrize("grid,needle", [({"model.d_model": 4}, "tuple of values"),
                                         ({"optimizer.name": "sgd"}, "tuple of values")])
def test_expand_rejects_a_bare_value(grid, needle):
  with pytest.raises(ValueError, match=needle):
    sweep.expand((grid,))


def test_configure_sets_overrides_and_strips_the_sweep():
  cfg = tiny_config()
  cfg.sweep = ({"model.d_model": (16,)},)
  cfg.lock()
  out = sweep.configure(cfg, {"model.d_model": 16, "optimizer.learning_rate": 1})
  assert out.model.d_model == 16 and out.optimizer.learning_rate == 1.0
  assert "sweep" not in out
  assert cfg.model.d_model == 32 and "sweep" in cfg  # the base config is untouched


@pytest.mark.parametrize("key,value,needle", [
    ("model.d_modell", 4, "'model.d_modell' is not a key"),
    ("nope.x", 4, "'nope.x' is not a key"),
    ("model.d_model.x", 4, "'model.d_model.x' is not a key"),
    ("train.steps", 1.5, "'train.steps' cannot take 1.5")])
def test_configure_names_a_bad_key(key, value, needle):
  with pytest.raises(ValueError, match=needle):
    sweep.configure(tiny_config(), {key: value})


def _tiny_sweep(steps):
  cfg = tiny_config()
  cfg.train.update(steps=steps, log_every=1, bottleneck_every=1, eval_every=0, eval_batches=1)
  cfg.sweep = ({"model.d_model": (16, 32)},
               {"model.d_model": (16,), "optimizer.learning_rate": (math.nan,)})
  return cfg


def _describe(cfg):
  return {"D": cfg.model.d_model, "coverage": cfg.train.steps * cfg.train.batch_size}


def test_tiny_sweep_end_to_end(tmp_path, capsys):
  entries = sweep.run(_tiny_sweep(3), tmp_path, _describe)
  names = ["model.d_model=16", "model.d_model=32",
           "model.d_model=16,optimizer.learning_rate=nan"]
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
  assert "[1/3] model.d_model=16: loss=" in out and "[3/3]" in out and "DIVERGED" in out

  # Started again: every run is finished (or diverged), so nothing trains.
  mtimes = {n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
  again = sweep.run(_tiny_sweep(3), tmp_path, _describe)
  assert again == entries
  assert mtimes == {n: (tmp_path / n / "metrics.jsonl").stat().st_mtime_ns for n in names}

  # More steps: a finished run resumes from its last checkpoint (step 3).
  longer = _tiny_sweep(4)
  longer.sweep = ({"model.d_model": (16,)},)
  (entry,) = sweep.run(longer, tmp_path, _describe)
  assert entry["steps"] == 4 and entry["run"] == names[0]
  with open(tmp_path / names[0] / "metrics.jsonl") as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged == [1, 2, 3, 4]


def test_no_sweep_is_a_single_run_into_the_workdir(tmp_path):
  cfg = tiny_config()
  cfg.train.update(steps=2, log_every=1, eval_every=0, eval_batches=0)
  (entry,) = sweep.run(cfg, tmp_path, _describe)
  assert entry["run"] == "" and entry["D"] == 32
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
