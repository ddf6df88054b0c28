"""Parameter counts, model FLOPs per token and collective bytes per step, from typed configs.

Training FLOPs per token follow the PaLM convention: 6 · (matmul parameters) for the forward and
backward passes, plus 12 · n_layers · n_heads · head_dim · seq_len for the attention scores and
values (causal masking not discounted). Matmul parameters are every weight a token is multiplied
by: the stacked layers (whose norm scales count too, negligibly) and the head (V·D, or V·r + r·D
when factorized); the embedding lookup is free. `model.remat` recomputes the trunk's forward:
`recompute_flops_per_token` more hardware FLOPs, the same model FLOPs.

`collective_bytes` is the analytic count of what one device sends per step (the convention of
`collectives`, ring algorithms) under FSDP, data and tensor parallelism; its docstring lists
every term and the algorithm it assumes.
"""

import math
import types

import jax
import numpy as np

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.training import sharding
from lmhead_jax.tools.collectives import SENT


def param_shapes(c: ModelConfig, hc: HeadConfig) -> dict:
  """ShapeDtypeStructs of every parameter (`jax.eval_shape` of init)."""
  return jax.eval_shape(lambda k: model.init(k, c, hc), jax.random.key(0))


def param_counts(c: ModelConfig, hc: HeadConfig) -> dict[str, int]:
  """{'total', 'embed', 'layers', 'head'} parameter counts, from `jax.eval_shape` of init."""
  shapes = param_shapes(c, hc)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  counts = {name: size(sub) for name, sub in shapes.items()}
  counts.setdefault("head", 0)
  counts["total"] = size(shapes)
  return counts


def head_matmul_params(hc: HeadConfig) -> int:
  if hc.kind == "factorized":
    return hc.vocab_size * hc.rank + hc.rank * hc.d_model
  return hc.vocab_size * hc.d_model


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of the attention scores and values, per token (causal not discounted)."""
  return 4.0 * c.n_layers * c.n_heads * c.hd * seq_len


def model_flops_per_token(c: ModelConfig, hc: HeadConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token."""
  matmul = param_counts(c, hc)["layers"] + head_matmul_params(hc)
  return 6.0 * matmul + 3 * attention_flops_per_token(c, seq_len)


def recompute_flops_per_token(c: ModelConfig, hc: HeadConfig, seq_len: int) -> float:
  """The trunk's forward again, when `model.remat` recomputes it in the backward pass."""
  if not c.remat:
    return 0.0
  return 2.0 * param_counts(c, hc)["layers"] + attention_flops_per_token(c, seq_len)


def collective_bytes(c: ModelConfig, hc: HeadConfig, mesh_shape: dict, batch_size: int,
                     grad_accum: int, seq_len: int,
                     grad_sync: str = "reduce-scatter") -> dict[str, float]:
  """{kind: bytes} that one device sends per train step (`collectives.KINDS`), analytically.

  Sharding as `training.sharding` (d, f, t: the data, fsdp and tensor sizes); n = tokens of a
  micro-batch per device; matmul weights move in the compute dtype, the rest in float32.
  Per micro-batch:
  - every fsdp-sharded layer weight is all-gathered in the forward and again in the backward
    (remat or not: the recompute shares the backward's gather); the embedding table once for
    the lookup (all-to-all of its [n, D] output instead when fsdp splits D), an unchunked
    head's matrix once (the backward reuses it);
  - the layers' gradients: `grad_sync='reduce-scatter'` over fsdp then an all-reduce of the
    shard over data (FSDP; XLA:TPU at the paper scale, by windowed einsums), or 'all-reduce'
    over data × fsdp (what XLA emits for small scanned layers);
  - tensor parallelism: 4 all-reduces of the [n, D] activations per layer (attention and MLP
    outputs in the forward, their input gradients in the backward), 5 with remat; with the
    vocabulary split over tensor, two more in float32 (the lookup's and ∂L/∂h's partial sums);
  - a chunked head whose vocabulary is split over fsdp moves activations, not W: each chunk's h
    is all-gathered over fsdp, its ∂L/∂h reduce-scattered (float32), and the accuracy's argmax
    all-to-alls the int32 logits (n·V/f per device); W's gradient stays local.
  Per step, after accumulation: the other gradients outside the layers (embedding, head, final
  norm), all-reduced in float32 over data × fsdp. Scalar reductions are left out.
  """
  d, f, t = (int(mesh_shape[a]) for a in sharding.MESH_AXES)
  dp = d * f
  n = batch_size // grad_accum // dp * seq_len
  cb = np.dtype(c.compute_dtype).itemsize
  mesh = types.SimpleNamespace(shape=dict(mesh_shape))
  micro, once = dict.fromkeys(SENT, 0.0), dict.fromkeys(SENT, 0.0)
  leaves = zip(jax.tree_util.tree_leaves_with_path(param_shapes(c, hc)),
               jax.tree.leaves(model.param_axes(c, hc), is_leaf=lambda x: isinstance(x, tuple)))
  for (path, s), axes in leaves:
    group, spec = path[0].key, sharding.spec_for(s.shape, axes, mesh)
    split = lambda axis: "vocab" in axes and spec[axes.index("vocab")] == axis
    kept = math.prod(s.shape) / (t if "tensor" in spec else 1)  # elements after the fsdp gather
    moved = kept * (cb if len(s.shape) - (group == "layers") >= 2 else 4)
    if group == "layers":
      if "fsdp" in spec:
        micro["all-gather"] += 2 * SENT["all-gather"](f) * moved / f
      if grad_sync == "reduce-scatter" and "fsdp" in spec:
        micro["reduce-scatter"] += SENT["reduce-scatter"](f) * moved
        micro["all-reduce"] += SENT["all-reduce"](d) * moved / f
      else:
        micro["all-reduce"] += SENT["all-reduce"](dp) * moved
      continue
    if group == "head" and hc.chunk_size and split("fsdp"):
      micro["all-gather"] += SENT["all-gather"](f) * n * c.d_model * cb
      micro["reduce-scatter"] += SENT["reduce-scatter"](f) * f * n * c.d_model * 4
      micro["all-to-all"] += SENT["all-to-all"](f) * n * hc.vocab_size * 4
      continue
    if group == "embed" and "fsdp" in spec and not split("fsdp"):
      micro["all-to-all"] += SENT["all-to-all"](f) * n * c.d_model * cb
    elif "fsdp" in spec:
      micro["all-gather"] += SENT["all-gather"](f) * moved / f
    if split("tensor"):
      micro["all-reduce"] += SENT["all-reduce"](t) * n * c.d_model * 4
    once["all-reduce"] += SENT["all-reduce"](dp) * kept * 4
  if t > 1:
    micro["all-reduce"] += SENT["all-reduce"](t) * n * c.d_model * cb * c.n_layers * (
        5 if c.remat else 4)
  return {k: grad_accum * micro[k] + once[k] for k in SENT}
