"""Offline plans: slice parsing, byte counts against jax.eval_shape, FLOPs formula."""

import math

import jax
import pytest
from conftest import tiny_config

from lmhead_jax import costs, model, plan
from lmhead_jax.config import HeadConfig, ModelConfig


def test_parse_slice():
  assert plan.parse_slice("v5p-64")[2] == 32  # v5p counts TensorCores, 2 per chip
  assert plan.parse_slice("v6e-64")[2] == 64
  assert plan.parse_slice("v5litepod-16")[2] == 16
  with pytest.raises(ValueError, match="unknown slice 'v9-8'"):
    plan.parse_slice("v9-8")
  with pytest.raises(ValueError, match="not a multiple of 2"):
    plan.parse_slice("v5p-3")


def test_memory_matches_eval_shape_bytes():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  row = plan.plan(cfg, "v6e-8")
  c = ModelConfig.of(cfg.model)
  shapes = jax.eval_shape(lambda k: model.init(k, c, HeadConfig.of(cfg.head, c)),
                          jax.random.key(0))
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  assert row["params_gb"] * 1e9 == pytest.approx(total)  # replicated on a pure data mesh
  assert row["opt_state_gb"] == pytest.approx(2 * row["params_gb"])  # AdamW: mu and nu
  cfg.mesh.update(data=1, fsdp=-1)
  # Every leaf here has a non-'layers' dimension divisible by 8: FSDP stores exactly 1/8 of it.
  assert plan.plan(cfg, "v6e-8")["params_gb"] * 1e9 == pytest.approx(total / 8)


def test_flops_per_token_formula():
  cfg = tiny_config()
  c = ModelConfig.of(cfg.model)
  layer = (c.d_model * (c.n_heads + 2 * c.kv_heads) * c.hd + c.n_heads * c.hd * c.d_model
           + 3 * c.d_model * c.ff + 2 * c.d_model)
  expected = 6 * (c.n_layers * layer + c.vocab_size * c.d_model) + 12 * c.n_layers * c.d_model * 16
  assert costs.model_flops_per_token(cfg) == expected
  cfg.head.update(kind="factorized", rank=4)
  assert costs.model_flops_per_token(cfg) == expected - 6 * (c.vocab_size * c.d_model
                                                              - (c.vocab_size * 4 + 4 * c.d_model))
