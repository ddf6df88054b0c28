"""A measurement config's models: the trained model built once, cached and restored."""

import json
import pathlib

import numpy as np
import pytest
from helpers import counting, tiny_measurement_config

from lmhead_jax.runs import measurement, runner
from lmhead_jax.training import sharding


@pytest.mark.slow  # ~12 s: compiles init, a train step and restores twice
def test_trained_model_cached_and_restored(tmp_path, cache_dir, monkeypatch):
  runs = counting(monkeypatch, runner, "run")
  cfg = tiny_measurement_config()
  cfg.train.steps = 2
  mesh = sharding.make_mesh()
  first = next(measurement.load(cfg, tmp_path / "a", mesh))
  cfg.measure.num_sequences, cfg.dtype = 8, "bfloat16"  # not part of the model's key
  second = next(measurement.load(cfg, tmp_path / "b", mesh))
  assert len(runs) == 1 and first.name == second.name == "trained-d16"
  entries = list((cache_dir / "runs").iterdir())
  assert [e.name for e in entries] == [runs[0][1].name.split(".tmp-")[0][1:]]  # built beside
  assert (entries[0] / "checkpoints" / "2").is_dir()
  assert json.loads((entries[0] / "summary.json").read_text())["steps"] == 2
  np.testing.assert_array_equal(first.params["head"]["w_VxD"], second.params["head"]["w_VxD"])
  assert second.data.path == str(cache_dir / "tokens" / pathlib.Path(second.data.path).parent.name
                                 / "train")
  assert not (tmp_path / "b").exists()  # nothing written to the new workdir
