"""Flax bridge: the [V, D] head matrix of a Flax layer, for `bottleneck.head_loss`.

Flax's Dense layers hold a kernel[D, V] (z = h · kernel); head_loss takes W = kernelᵀ. Embeddings
(a tied head, z = h Eᵀ) hold E[V, D] already. The matrix is the layer's own parameter, so a
gradient of head_loss reaches the layer inside `nnx.value_and_grad` or `jax.grad` of Linen params.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def head_matrix(head) -> jax.Array:
  """W[V, D] of an nnx.Linear, a (tied) nnx.Embed, or a Linen Dense's or Embed's params
  ({"kernel": [D, V]} or {"embedding": [V, D]}). A head with a bias is refused: head_loss has
  none (use `bottleneck.head_fn_loss` for it)."""
  if isinstance(head, nnx.Embed):
    return head.embedding[...]
  if isinstance(head, nnx.Linear):
    if head.bias is not None:
      raise ValueError("the nnx.Linear head has a bias, which head_loss leaves out: build it with "
                       "use_bias=False or use bottleneck.head_fn_loss")
    return head.kernel[...].T
  if isinstance(head, Mapping) and set(head) in ({"kernel"}, {"embedding"}):
    (name, value), = head.items()
    value = jnp.asarray(value)
    if value.ndim != 2:
      raise ValueError(f"the Linen head's {name!r} must be a matrix, got shape {value.shape}")
    return value.T if name == "kernel" else value
  if isinstance(head, Mapping):
    raise ValueError(f"expected the params of one Linen Dense (kernel, no bias) or Embed "
                     f"(embedding), got keys {sorted(head)}")
  raise TypeError(f"expected an nnx.Linear, nnx.Embed or a Linen Dense/Embed params dict, got "
                  f"{type(head).__name__}")
