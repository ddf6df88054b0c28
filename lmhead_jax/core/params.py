"""Parameter specs: shape, logical axes and initializer, one source for init and sharding; and
the sharding rules for activations: their batch axis over the mesh's batch axes, and a head
matrix inside the loss split over `tensor` only (vocab-parallel), whole on the other axes."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over
TENSOR_AXIS = "tensor"  # the mesh axis that tensor parallelism splits heads, MLP and vocab over


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


def batch_shards(n: int) -> int:
  """How many ways the mesh in context splits a batch axis of length n (1: no mesh, or its batch
  axes do not divide n)."""
  mesh = jax.sharding.get_abstract_mesh()
  s = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
  return s if n % s == 0 else 1


def batch_sharded(x: jax.Array) -> jax.Array:
  """`x` with its leading (batch) axis pinned to the batch axes of the mesh in context (`pinned`).

  Without it XLA propagates the FSDP weights' sharding (over D) into the activations: XLA:GPU
  then all-gathers the whole batch in every layer (docs/PERFORMANCE.md).
  """
  return pinned(x, batch=0)


def pinned(x: jax.Array, *, batch: int | None = None, vocab: int | None = None) -> jax.Array:
  """`x` with axis `batch` split over the batch axes of the mesh in context (`jax.set_mesh`,
  `jax.sharding.use_abstract_mesh`), axis `vocab` over its `tensor` axis where that divides it,
  and whole on every other mesh axis; `x` unchanged without such a mesh, or when the batch axes
  do not divide axis `batch` (and no `vocab` is asked). A head matrix pinned with `vocab` before a loop over token chunks
  is gathered over `fsdp` once, not in every chunk."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  split = batch is not None and batch_shards(x.shape[batch]) > 1
  if not axes or (batch is not None and not split and vocab is None):
    return x
  spec = [None] * x.ndim
  if split:
    spec[batch] = axes
  t = mesh.shape.get(TENSOR_AXIS, 1)
  if vocab is not None and t > 1 and x.shape[vocab] % t == 0:
    spec[vocab] = TENSOR_AXIS
  if all(k == jax.sharding.AxisType.Explicit for k in mesh.axis_types):
    return jax.sharding.reshard(x, P(*spec))  # a constraint only asserts on Explicit axes
  return jax.lax.with_sharding_constraint(x, P(*spec))
