"""Parameter specs: shape, logical axes and initializer, one source for init and sharding; and
the one sharding rule for activations: their leading (batch) axis over the mesh's batch axes."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """A parameter's shape, its logical axis names and its init (normal with `std`, or constant)."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  std: float | None = None  # None: constant `value`
  value: float = 0.0

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def materialize(key: jax.Array, specs) -> dict:
  """Draws every parameter of a spec tree (float32), one independent key per leaf."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  out = [
      (s.std * jax.random.normal(k, s.shape, jnp.float32)) if s.std is not None
      else jnp.full(s.shape, s.value, jnp.float32)
      for k, s in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, out)


def logical_axes(specs) -> dict:
  """The tree of logical axis-name tuples, same structure as the parameters."""
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def stack(specs, n: int):
  """Adds a leading 'layers' axis of size n to every spec (for scan over layers)."""
  return jax.tree.map(
      lambda s: dataclasses.replace(s, shape=(n, *s.shape), axes=("layers", *s.axes)),
      specs, is_leaf=is_spec)


def batch_sharded(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis pinned to the batch axes of the mesh in context, if one is
  set (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`); else `x` unchanged.

  Without it XLA propagates the FSDP weights' sharding (over D) into the activations: XLA:GPU
  then all-gathers the whole batch in every layer (docs/PERFORMANCE.md).
  """
  names = jax.sharding.get_abstract_mesh().axis_names
  axes = tuple(a for a in BATCH_AXES if a in names)
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
