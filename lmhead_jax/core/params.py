"""Parameter specs: shape, logical axes and initializer, one source for init and sharding."""

import dataclasses

import jax
import jax.numpy as jnp


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
