"""Mixed precision as the paper trained: float32 master weights, bf16 compute, bottleneck
metrics from float32-accumulated logits; the bf16 step agrees with the all-float32 step."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import copy, one_device_mesh, random_batch, tiny_config

from lmhead_jax.runs import experiment
from lmhead_jax.training import train


def test_bf16_step_keeps_float32_masters_and_agrees_with_float32():
  mesh = one_device_mesh()
  steps, states = {}, {}
  for dtype in ("float32", "bfloat16"):
    cfg = tiny_config(n_layers=1, dtype=dtype)
    cfg.train.bottleneck_every = 1
    setup = experiment.resolve(cfg, mesh)
    states[dtype], _ = train.init_state(jax.random.key(0), setup)
    steps[dtype] = train.make_train_step(setup)
  for a, b in zip(jax.tree.leaves(states["float32"].params),
                  jax.tree.leaves(states["bfloat16"].params)):
    assert a.dtype == b.dtype == jnp.float32  # the masters are float32 either way
    np.testing.assert_array_equal(a, b)
  batch = random_batch(tiny_config())
  out = {k: steps[k](copy(states[k]), batch) for k in steps}
  (new32, m32), (new16, m16) = out["float32"], out["bfloat16"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new16.params))
  # bf16 rounds at 2⁻⁹ relative: the loss to ≈ 1e-3, the ratios to a few 1e-3
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=1e-2)
  for key in ("bottleneck/destroyed_ratio", "bottleneck/visible_cosine"):
    np.testing.assert_allclose(m16[key], m32[key], atol=1e-2, err_msg=key)
  np.testing.assert_allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)
