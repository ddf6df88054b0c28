"""Mixture of Softmaxes head (Yang et al. 2018, "Breaking the Softmax Bottleneck").

  π = softmax(W_π h),  h_k = tanh(P_k h),  p = Σ_k π_k softmax(W h_k),  k = 1..S,

with S = `head.mixtures` components.

`logits` returns log p (a log-sum-exp over k, float32), so that softmax(log p) = p and the
cross-entropy of these "logits" is −log p_y: the train step, the loss and the bottleneck metrics
treat it like any other head, with G = p − e_y. It is non-linear in h, so every token has its
own Jacobian ∂ log p/∂h (V×D) and its own projector. Unlike Yang et al., no biases and no
dropout; W, P_k and W_π are drawn N(0, 1/D) like the linear head's W.
"""

import jax
import jax.numpy as jnp

from lmhead_jax.core.params import ParamSpec


def specs(v: int, d: int, s: int) -> dict:
  return {"w_VxD": ParamSpec((v, d), ("vocab", "embed"), std=d**-0.5),
          "p_SxDxD": ParamSpec((s, d, d), (None, None, "embed"), std=d**-0.5),
          "pi_SxD": ParamSpec((s, d), (None, "embed"), std=d**-0.5)}


def logits(params: dict, h: jax.Array) -> jax.Array:
  """log p[..., V] (float32) of the mixture; matmuls in h's dtype, float32 accumulation."""
  f32 = dict(preferred_element_type=jnp.float32)
  dt = h.dtype
  h_k = jnp.tanh(jnp.einsum("...d,ked->...ke", h, params["p_SxDxD"].astype(dt), **f32))
  z_k = jnp.einsum("...ke,ve->...kv", h_k.astype(dt), params["w_VxD"].astype(dt), **f32)
  log_pi = jax.nn.log_softmax(jnp.einsum("...d,kd->...k", h, params["pi_SxD"].astype(dt), **f32))
  return jax.nn.logsumexp(log_pi[..., None] + jax.nn.log_softmax(z_k), axis=-2)
