"""Input checks that name the offending shapes and values.

Range checks on ids run only on concrete (eager) arrays. Under `jax.jit` the ids are tracers,
so no check is possible without a host sync: a target outside [0, V) makes the loss NaN (G's row
for that token then lacks its −e_y); an input id goes through JAX's gather, which reads NaN for
an id ≥ V or < −V and wraps one in [−V, 0) around to V + id. Validate data before it reaches a
jitted step (the data pipelines do).
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def token_ids(ids, vocab_size: int, name: str):
  """Checks an id array: integer dtype always, values in [0, vocab_size) when concrete."""
  ids = jnp.asarray(ids) if not isinstance(ids, jax.Array) else ids
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
  if is_concrete(ids) and ids.size:
    host = np.asarray(ids)  # np.min(ids) would dispatch to a traced jnp.min under jit
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      raise ValueError(f"{name} contains id {bad} outside [0, {vocab_size})")
  return ids
