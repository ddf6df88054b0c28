"""Sweep grids: expansion, run names and overrides."""

import pytest
from helpers import tiny_config

from lmhead_jax.runs import grid


def test_expand_is_the_union_of_grid_products_without_repeats():
  grids = ({"model.d_model": (4, 8), "optimizer.name": ("adamw", "sgd")},
           {"optimizer.name": ("sgd",), "model.d_model": (8, 16)})
  assert grid.expand(grids) == [
      {"model.d_model": 4, "optimizer.name": "adamw"},
      {"model.d_model": 4, "optimizer.name": "sgd"},
      {"model.d_model": 8, "optimizer.name": "adamw"},
      {"model.d_model": 8, "optimizer.name": "sgd"},
      {"model.d_model": 16, "optimizer.name": "sgd"}]


def test_run_names():
  assert grid.run_name({"optimizer.name": "sgd", "model.d_model": 16}) == (
      "model.d_model=16,optimizer.name=sgd")
  assert grid.run_name({"optimizer.learning_rate": 1e-2, "model.tie_embeddings": True}) == (
      "model.tie_embeddings=True,optimizer.learning_rate=0.01")
  assert grid.run_name({"optimizer.learning_rate": 3e-5}) == "optimizer.learning_rate=3e-05"


@pytest.mark.parametrize("bare,needle", [({"model.d_model": 4}, "tuple of values"),
                                         ({"optimizer.name": "sgd"}, "tuple of values")])
def test_expand_rejects_a_bare_value(bare, needle):
  with pytest.raises(ValueError, match=needle):
    grid.expand((bare,))


def test_configure_sets_overrides_and_strips_the_sweep():
  cfg = tiny_config()
  cfg.sweep = ({"model.d_model": (16,)},)
  cfg.lock()
  out = grid.configure(cfg, {"model.d_model": 16, "optimizer.learning_rate": 1})
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
    grid.configure(tiny_config(), {key: value})
