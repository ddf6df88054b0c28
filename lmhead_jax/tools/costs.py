"""Parameter counts and model FLOPs per token, from the config alone (no arrays).

Training FLOPs per token follow the PaLM convention: 6 · (matmul parameters) for the forward and
backward passes, plus 12 · n_layers · n_heads · head_dim · seq_len for the attention scores and
values (causal masking not discounted). Matmul parameters are every weight a token is multiplied
by: the stacked layers (whose norm scales count too, negligibly) and the head (V·D, or V·r + r·D when factorized); the embedding lookup is free.
"""

import math

import jax

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig


def param_counts(cfg) -> dict[str, int]:
  """{'total', 'embed', 'layers', 'head'} parameter counts, from `jax.eval_shape` of init."""
  c = ModelConfig.of(cfg.model)
  hc = HeadConfig.of(cfg.head, c)
  shapes = jax.eval_shape(lambda k: model.init(k, c, hc), jax.random.key(0))
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  counts = {name: size(sub) for name, sub in shapes.items()}
  counts.setdefault("head", 0)
  counts["total"] = size(shapes)
  return counts


def head_matmul_params(cfg) -> int:
  c = ModelConfig.of(cfg.model)
  hc = HeadConfig.of(cfg.head, c)
  if hc.kind == "factorized":
    return hc.vocab_size * hc.rank + hc.rank * hc.d_model
  return hc.vocab_size * hc.d_model


def model_flops_per_token(cfg, seq_len: int | None = None) -> float:
  """Training (forward + backward) FLOPs per token."""
  c = ModelConfig.of(cfg.model)
  counts = param_counts(cfg)
  matmul = counts["layers"] + head_matmul_params(cfg)
  s = int(seq_len or cfg.data.seq_len)
  return 6.0 * matmul + 12.0 * c.n_layers * c.n_heads * c.hd * s
