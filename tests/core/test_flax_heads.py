"""The head matrix of Flax NNX and Linen layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmhead_jax.core import flax_heads


def test_head_matrix_of_flax_layers():
  """W[V, D] such that h Wᵀ is what the Flax layer itself computes (its own call, or attend)."""
  h = jax.random.normal(jax.random.key(0), (3, 8))
  linear = nnx.Linear(8, 40, use_bias=False, rngs=nnx.Rngs(0))
  embed = nnx.Embed(40, 8, rngs=nnx.Rngs(1))
  dense = nn.Dense(40, use_bias=False)
  dense_params = dense.init(jax.random.key(2), h)["params"]
  linen_embed = nn.Embed(40, 8)
  embed_params = linen_embed.init(jax.random.key(3), jnp.zeros(1, jnp.int32))["params"]
  for w, z in ((flax_heads.head_matrix(linear), linear(h)),
               (flax_heads.head_matrix(embed), embed.attend(h)),
               (flax_heads.head_matrix(dense_params), dense.apply({"params": dense_params}, h)),
               (flax_heads.head_matrix(embed_params),
                linen_embed.apply({"params": embed_params}, h, method="attend"))):
    assert w.shape == (40, 8)
    np.testing.assert_allclose(jnp.matmul(h, w.T, precision="highest"), z, rtol=1e-5, atol=1e-6)


def test_head_matrix_refuses_what_head_loss_cannot_take():
  with pytest.raises(ValueError, match="nnx.Linear head has a bias"):
    flax_heads.head_matrix(nnx.Linear(8, 40, rngs=nnx.Rngs(0)))
  params = nn.Dense(40).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  with pytest.raises(ValueError, match=r"got keys \['bias', 'kernel'\]"):
    flax_heads.head_matrix(params)
  with pytest.raises(ValueError, match=r"'kernel' must be a matrix, got shape \(8,\)"):
    flax_heads.head_matrix({"kernel": jnp.ones(8)})
  with pytest.raises(TypeError, match="got ndarray"):
    flax_heads.head_matrix(np.ones((8, 40)))
