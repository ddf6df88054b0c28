"""Optimizers and schedules against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.training.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule


def test_schedule_warmup_then_cosine():
  o = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1)
  s = make_schedule(o, 110)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-5, atol=1e-7)


def test_linear_and_constant_schedules():
  o = OptimizerConfig(learning_rate=2.0, warmup_steps=0, schedule="linear", end_lr_fraction=0.25)
  s = make_schedule(o, 100)
  np.testing.assert_allclose([s(0), s(50), s(100)], [2.0, 1.25, 0.5], rtol=1e-6)
  o = OptimizerConfig(learning_rate=2.0, schedule="constant")
  np.testing.assert_allclose([make_schedule(o, 100)(k) for k in (0, 99)], [2.0, 2.0])


AXES = {"embed": {"w_VxD": ("vocab", "embed")},
        "layers": {"norm": ("layers", "embed"), "w": ("layers", "embed", "mlp")},
        "final_norm": {"scale": ("embed",)}}


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_is_matrices_only(decay_embeddings):
  assert decay_mask(AXES, decay_embeddings) == {
      "embed": {"w_VxD": decay_embeddings}, "layers": {"norm": False, "w": True},
      "final_norm": {"scale": False}}


def test_sgd_step_decays_masked_weights():
  o = OptimizerConfig(name="sgd", learning_rate=0.5, warmup_steps=0, schedule="constant",
                      momentum=0.0, weight_decay=0.1, decay_embeddings=False)
  params = {"embed": {"w_VxD": jnp.ones((3, 2))},
            "layers": {"norm": jnp.ones((1, 2)), "w": jnp.ones((1, 2, 4))},
            "final_norm": {"scale": jnp.ones(2)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
  tx, _ = make_optimizer(o, 10, AXES)
  updates, _ = tx.update(grads, tx.init(params), params)
  want = {"embed": {"w_VxD": -0.1}, "layers": {"norm": -0.1, "w": -0.5 * (0.2 + 0.1)},
          "final_norm": {"scale": -0.1}}
  for got, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, w, rtol=1e-6)


def test_bad_names_are_refused():
  with pytest.raises(ValueError, match=r"optimizer.name='lion' is not one of \('adamw', 'sgd'\)"):
    OptimizerConfig(name="lion")
  with pytest.raises(ValueError, match="optimizer.schedule='step' is not one of"):
    OptimizerConfig(name="sgd", schedule="step")
