"""Setup from typed configs: its checks, its placement on a mesh, a state of its shapes."""

import jax
import pytest
from helpers import one_device_mesh

from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.training import setup
from lmhead_jax.training.optim import OptimizerConfig

MODEL = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
HEAD = HeadConfig(64, 16)


def build(**kw):
  args = dict(seed=0, steps=10, batch_size=8, grad_accum=2, seq_len=16) | kw
  return setup.build(MODEL, HEAD, OptimizerConfig(), **args)


@pytest.mark.parametrize("kw, needle", [
    (dict(grad_accum=3), "train.batch_size=8 is not divisible by train.grad_accum=3"),
    (dict(grad_accum=0), "train.grad_accum=0"),
    (dict(seq_len=33), "data.seq_len=33 exceeds model.max_seq_len=32"),
])
def test_build_refuses_naming_the_keys(kw, needle):
  with pytest.raises(ValueError, match=needle):
    build(**kw)


def test_on_a_mesh_it_gets_the_shardings_of_every_leaf():
  s = build()
  assert s.mesh is None and s.state_shardings is None
  placed = s.on(one_device_mesh())
  shapes = placed.abstract_state()
  assert shapes.params["embed"]["w_VxD"].shape == (64, 16)
  assert jax.tree.structure(shapes) == jax.tree.structure(placed.state_shardings)
  assert set(placed.batch_shardings) == {"inputs", "targets", "mask"}


def test_a_micro_batch_that_does_not_split_over_the_data_axes_is_refused():
  with pytest.raises(ValueError, match=r"per micro-batch 3\) is not divisible by the data-parallel"):
    setup.check_batch_split(6, 2, 2)
