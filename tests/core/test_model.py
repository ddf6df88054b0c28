"""Trunk properties for every family: causality, jit, remat, bf16, param tree and input checks.

Numerical parity of each family with `transformers` is in test_hf.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.core import model
from lmhead_jax.core.config import FAMILIES, ModelConfig
from lmhead_jax.core.params import is_spec

BASE = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_seq_len=12)
CONFIGS = {
    "llama": ModelConfig(**BASE, n_kv_heads=2, rope_theta=100.0, rope_scaling=(4.0, 1.0, 4.0, 8)),
    "qwen3": ModelConfig(**BASE, family="qwen3", n_kv_heads=2, head_dim=6, tie_embeddings=True),
    "olmo2": ModelConfig(**BASE, family="olmo2", n_kv_heads=2),
    "gpt2": ModelConfig(**BASE, family="gpt2", tie_embeddings=True),
    "gpt_neox": ModelConfig(**BASE, family="gpt_neox", rotary_pct=0.5),
}


def _params(c: ModelConfig, seed=0):
  """Random init with norm scales and biases moved off 1 and 0, so every parameter matters."""
  specs, treedef = jax.tree.flatten(model.specs(c), is_leaf=is_spec)
  leaves = jax.tree.leaves(model.init(jax.random.key(seed), c))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      x + 0.2 * rng.standard_normal(x.shape, np.float32) if s.std is None else x
      for s, x in zip(specs, leaves)])


def _tokens(c: ModelConfig, shape=(2, 9), seed=2):
  return jax.random.randint(jax.random.key(seed), shape, 0, c.vocab_size)


def test_configs_cover_every_family():
  assert set(CONFIGS) == set(FAMILIES)


def test_family_flags_and_overrides():
  c = CONFIGS["gpt2"]
  assert (c.norm, c.bias, c.mlp_act, c.pos, c.parallel_residual) == (
      "layer", True, "gelu_tanh", "learned", False)
  c = CONFIGS["gpt_neox"]
  assert (c.norm, c.mlp_act, c.parallel_residual, c.rotary_dim) == ("layer", "gelu", True, 2)
  assert CONFIGS["olmo2"].norm_position == "post" and CONFIGS["olmo2"].qk_norm == "full"
  assert CONFIGS["qwen3"].qk_norm == "head" and CONFIGS["qwen3"].hd == 6
  assert ModelConfig(**BASE, qk_norm="head").qk_norm == "head"  # an explicit flag wins
  assert ModelConfig(**BASE, family="gpt_neox", head_dim=8).rotary_pct == 0.25
  hash(ModelConfig(**BASE, rope_scaling=[8, 1, 4, 64]))  # lists from ConfigDicts become tuples


def test_llama_tree_is_unchanged():
  p = model.specs(ModelConfig(**BASE))
  assert set(p) == {"embed", "layers", "final_norm", "head"}
  assert set(p["layers"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
  assert set(p["layers"]["attn"]) == {"wq", "wk", "wv", "wo"}
  assert set(p["layers"]["mlp"]) == {"w_gate", "w_up", "w_down"}
  assert set(p["final_norm"]) == {"scale"}


def test_family_trees():
  axes = model.param_axes(CONFIGS["gpt2"])
  assert "head" not in axes and axes["pos_embed"]["w_PxD"] == (None, "embed")
  assert axes["layers"]["attn"]["bq"] == ("layers", "heads", "head_dim")
  assert axes["layers"]["mlp"]["b_up"] == ("layers", "mlp")
  assert axes["final_norm"]["bias"] == ("embed",)
  assert "w_gate" not in axes["layers"]["mlp"]
  p = model.specs(CONFIGS["olmo2"])
  assert p["layers"]["attn"]["q_norm"]["scale"].shape == (2, 4, 4)
  assert p["layers"]["attn"]["k_norm"]["scale"].shape == (2, 2, 4)
  p = model.specs(CONFIGS["qwen3"])
  assert p["layers"]["attn"]["q_norm"]["scale"].shape == (2, 6)
  assert p["layers"]["attn"]["wq"].shape == (2, 16, 4, 6)
  assert p["layers"]["attn"]["wo"].shape == (2, 4, 6, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
  """d h[t] / d x[s] is exactly 0 for s > t, and nonzero for s <= t."""
  c = CONFIGS[family]
  params = _params(c)
  x = jax.random.normal(jax.random.key(3), (1, 6, c.d_model))
  jac = jax.jit(jax.jacrev(lambda x: model.hidden_from_embeddings(params, x, c)))(x)[0, :, :, 0]
  norms = np.asarray(jnp.sqrt(jnp.sum(jac**2, axis=(1, 3))))  # [t, s]
  assert np.all(norms[np.triu_indices(6, 1)] == 0.0), norms
  assert np.all(norms[np.tril_indices(6)] > 0.0), norms


@pytest.mark.parametrize("family", FAMILIES)
def test_jit_and_bf16(family):
  c = CONFIGS[family]
  params, tokens = _params(c), _tokens(c)
  h = model.hidden(params, tokens, c)
  assert h.shape == (2, 9, c.d_model) and h.dtype == jnp.float32
  h_jit = jax.jit(model.hidden, static_argnums=2)(params, tokens, c)
  np.testing.assert_allclose(h_jit, h, rtol=1e-5, atol=1e-5)
  h16 = model.hidden(params, tokens, dataclasses.replace(c, dtype="bfloat16"))
  assert h16.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(h16.astype(jnp.float32) - h) / jnp.linalg.norm(h)
  assert rel < 0.03, rel


def test_remat_same_values_and_gradients():
  c = CONFIGS["olmo2"]
  rc = dataclasses.replace(c, remat=True)
  params, tokens = _params(c), _tokens(c)
  for cfg, remat in ((c, False), (rc, True)):
    jaxpr = jax.make_jaxpr(lambda p, t: model.hidden(p, t, cfg))(params, tokens)
    assert ("remat" in str(jaxpr)) == remat

  @jax.jit
  def value_and_grads(p, tokens):
    return [jax.value_and_grad(lambda p: jnp.sum(jnp.sin(model.hidden(p, tokens, cfg))))(p)
            for cfg in (c, rc)]

  (v, g), (v_remat, g_remat) = value_and_grads(params, tokens)
  np.testing.assert_allclose(v_remat, v, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g)):  # fp32 re-association only
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), r"n_heads=4.*d_model=30"),
    (dict(n_heads=4, n_kv_heads=3), r"n_kv_heads=3.*n_heads=4"),
    (dict(family="gpt3"), "gpt3"),
    (dict(norm="batch"), r"model\.norm='batch'"),
    (dict(qk_norm="yes"), r"model\.qk_norm='yes'"),
    (dict(head_dim=5), r"head_dim=5.*even"),
    (dict(family="olmo2", parallel_residual=True), "parallel_residual"),
    (dict(rotary_pct=0.0), "rotary_pct=0.0"),
    (dict(rope_scaling=(8.0, 1.0)), "rope_scaling"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**(BASE | kwargs))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_too_long_sequence(family):
  c = CONFIGS[family]
  with pytest.raises(ValueError, match="exceeds model.max_seq_len=12"):
    model.hidden(_params(c), _tokens(c, (1, 13)), c)


def test_token_ids_checked_eagerly():
  c = CONFIGS["llama"]
  params = _params(c)
  with pytest.raises(ValueError, match="id 40 outside"):
    model.hidden(params, jnp.array([[1, 40]]), c)
  with pytest.raises(ValueError, match="id -1 outside"):
    model.hidden(params, jnp.array([[-1, 3]]), c)
  with pytest.raises(ValueError, match="integer dtype"):
    model.hidden(params, jnp.zeros((1, 3)), c)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.hidden(params, jnp.zeros((3,), jnp.int32), c)
