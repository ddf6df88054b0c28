"""Mean cross-entropy over valid tokens (dense). Its gradient w.r.t. the logits is G."""

import jax
import jax.numpy as jnp


def valid_mask(targets: jax.Array, mask=None) -> jax.Array:
  """The float32 0/1 mask of valid positions (all valid when mask is None)."""
  m = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask).astype(
      jnp.float32)
  if m.shape != targets.shape:
    raise ValueError(f"mask shape {m.shape} does not match targets shape {targets.shape}")
  return m


def cross_entropy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Mean CE over valid positions, in float32. G = ∂/∂z has rows (p_t − e_{y_t}) / N."""
  m = valid_mask(targets, mask)
  z = z.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  z_y = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - z_y) * m) / jnp.maximum(jnp.sum(m), 1.0)


def accuracy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Fraction of valid positions whose argmax logit is the target."""
  m = valid_mask(targets, mask)
  hit = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)
