"""Parameter, FLOP and collective counts from typed configs, against eval_shape and hand counts."""

import pytest
from helpers import tiny_config

from lmhead_jax.core.config import ModelConfig
from lmhead_jax.runs import experiment
from lmhead_jax.tools import costs


def test_flops_per_token_formula():
  cfg = tiny_config()
  c, hc = experiment.configs(cfg)
  layer = (c.d_model * (c.n_heads + 2 * c.kv_heads) * c.hd + c.n_heads * c.hd * c.d_model
           + 3 * c.d_model * c.ff + 2 * c.d_model)
  expected = 6 * (c.n_layers * layer + c.vocab_size * c.d_model) + 12 * c.n_layers * c.d_model * 16
  assert costs.model_flops_per_token(c, hc, 16) == expected
  cfg.head.update(kind="factorized", rank=4)
  assert costs.model_flops_per_token(*experiment.configs(cfg), 16) == expected - 6 * (
      c.vocab_size * c.d_model - (c.vocab_size * 4 + 4 * c.d_model))
  # remat runs the trunk's forward again: 2 FLOPs per layer weight and the attention forward
  assert costs.recompute_flops_per_token(c, hc, 16) == 0
  remat = ModelConfig.of({**cfg.model.to_dict(), "remat": True})
  assert costs.recompute_flops_per_token(remat, hc, 16) == (
      2 * c.n_layers * layer + 4 * c.n_layers * c.d_model * 16)


def counts(cfg):
  """Parameters of the tiny model by role: layer matmul weights, layer norms, V·D, D."""
  c, hc = experiment.configs(cfg)
  layers = costs.param_counts(c, hc)["layers"]
  norms = 2 * c.n_layers * c.d_model
  return layers - norms, norms, c.vocab_size * c.d_model, c.d_model


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_collective_formula_by_hand(grad_accum):
  """tiny_config in bf16: every dimension divides 8, so fsdp shards every leaf."""
  cfg = tiny_config(dtype="bfloat16")
  c, hc = experiment.configs(cfg)
  matmul, norms, vd, d = counts(cfg)
  layer_bytes = 2 * matmul + 4 * norms
  fsdp = costs.collective_bytes(c, hc, {"data": 1, "fsdp": 8, "tensor": 1}, 32, grad_accum, 16)
  assert fsdp["all-gather"] == pytest.approx(grad_accum * 7 / 8 * (
      2 * layer_bytes + 2 * (2 * vd) + 4 * d))  # layers twice; embedding, head, final norm once
  assert fsdp["reduce-scatter"] == pytest.approx(grad_accum * 7 / 8 * layer_bytes)
  assert fsdp["all-reduce"] == pytest.approx(2 * 7 / 8 * 4 * (2 * vd + d))  # after accumulation
  data = costs.collective_bytes(c, hc, {"data": 8, "fsdp": 1, "tensor": 1}, 32, grad_accum, 16)
  assert data["all-reduce"] == pytest.approx(
      2 * 7 / 8 * (grad_accum * layer_bytes + 4 * (2 * vd + d)))
  assert data["all-gather"] == data["reduce-scatter"] == data["all-to-all"] == 0
  # tensor=2 on top of data=4: per layer 4 all-reduces of the [tokens, D] bf16 activations of a
  # device's micro-batch; the vocabulary is split too, so the lookup and ∂L/∂h add 2 in float32.
  tokens = 32 // grad_accum // 4 * 16
  both = costs.collective_bytes(c, hc, {"data": 4, "fsdp": 1, "tensor": 2}, 32, grad_accum, 16)
  activations = grad_accum * 2 * 1 / 2 * tokens * c.d_model * (4 * c.n_layers * 2 + 2 * 4)
  assert both["all-reduce"] - activations == pytest.approx(2 * 3 / 4 * (
      grad_accum * (2 * matmul / 2 + 4 * norms) + 4 * (2 * vd / 2 + d)))
