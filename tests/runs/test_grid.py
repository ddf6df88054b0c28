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


def test_run_names_are_shell_and_object_store_safe():
  assert grid.run_name({"optimizer.name": "sgd", "model.d_model": 16}) == "d_model=16+name=sgd"
  assert grid.run_name({"optimizer.learning_rate": 1e-2, "model.tie_embeddings": True}) == (
      "tie_embeddings=True+learning_rate=0.01")  # sorted by the full key
  assert grid.run_name({"optimizer.learning_rate": 3e-5}) == "learning_rate=3e-05"
  assert grid.run_name({"optimizer.learning_rate": 1e20}) == "learning_rate=1e20"
  assert grid.run_name({"model.dtype": "float32", "measure.dtype": "bfloat16"}) == (
      "measure.dtype=bfloat16+model.dtype=float32")  # a shared leaf keeps its key
  assert grid.run_name({"data.path": "gs://b/x y"}) == "path=gs___b_x_y"
  assert grid.legacy_name({"optimizer.name": "sgd", "model.d_model": 16}) == (
      "model.d_model=16,optimizer.name=sgd")


def test_colliding_run_names_are_refused():
  with pytest.raises(ValueError, match="would share the directory 'path=a_b'"):
    grid.expand(({"data.path": ("a/b", "a b")},))


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
