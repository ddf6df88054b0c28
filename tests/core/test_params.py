"""Parameter specs: init statistics, logical axes, layer stacking, and the batch sharding rule."""

import jax
import numpy as np

from lmhead_jax.core.params import ParamSpec, batch_sharded, logical_axes, materialize, stack

SPECS = {"w": ParamSpec((256, 128), ("vocab", "embed"), std=0.5),
         "norm": {"scale": ParamSpec((128,), ("embed",), value=1.0)}}


def test_materialize_draws_each_leaf_with_its_init():
  params = materialize(jax.random.key(0), SPECS)
  w, scale = np.asarray(params["w"]), np.asarray(params["norm"]["scale"])
  assert w.dtype == np.float32 and w.shape == (256, 128)
  assert abs(w.std() - 0.5) < 0.01 and abs(w.mean()) < 0.01  # 32k draws: 3σ ≈ 0.005
  np.testing.assert_array_equal(scale, np.ones(128, np.float32))
  again = materialize(jax.random.key(0), SPECS)
  np.testing.assert_array_equal(again["w"], w)  # the key fixes every draw
  assert not np.array_equal(materialize(jax.random.key(1), SPECS)["w"], w)


def test_logical_axes_and_stack():
  assert logical_axes(SPECS) == {"w": ("vocab", "embed"), "norm": {"scale": ("embed",)}}
  stacked = stack(SPECS, 3)
  assert stacked["w"].shape == (3, 256, 128) and stacked["w"].axes == ("layers", "vocab", "embed")
  assert materialize(jax.random.key(0), stacked)["norm"]["scale"].shape == (3, 128)


def test_batch_sharded_is_the_identity_without_a_mesh():
  x = np.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(batch_sharded(x), x)
