"""Input checks that name the offending shapes and values.

Range checks on ids run only on concrete (eager) arrays. Under `jax.jit` the ids are tracers,
so no check is possible without a host sync: a target outside [0, V) makes the loss NaN (G's row
for that token then lacks its −e_y); an input id goes through JAX's gather, which reads NaN for
an id ≥ V or < −V and wraps one in [−V, 0) around to V + id. Validate data before it reaches a
jitted step (the data pipelines do). The one exception is the target −100 (`loss.IGNORE_INDEX`,
Hugging Face's ignore_index): it marks a masked position, in eager calls and under jit alike.
"""

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def token_ids(ids, vocab_size: int, name: str, ignore_index: int | None = None):
  """Checks an id array: integer dtype always, values in [0, vocab_size) (or = ignore_index)
  when concrete."""
  ids = jnp.asarray(ids) if not isinstance(ids, jax.Array) else ids
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
  if is_concrete(ids):
    host = np.asarray(ids)  # np.min(ids) would dispatch to a traced jnp.min under jit
    host = host[host != ignore_index] if ignore_index is not None else host
    lo, hi = (int(host.min()), int(host.max())) if host.size else (0, 0)
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      also = "" if ignore_index is None else f" and not the ignore id {ignore_index}"
      raise ValueError(f"{name} contains id {bad} outside [0, {vocab_size}){also}")
  return ids
