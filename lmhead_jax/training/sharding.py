"""Device mesh (data, fsdp, tensor) and the shardings of parameters and batches.

Logical axes map to mesh axes in two steps: tensor parallelism first (heads, kv_heads, mlp and
vocab over `tensor`), then FSDP shards the largest remaining dimension of each weight over `fsdp`
(never the scanned `layers` axis). A dimension that the mesh axis does not divide stays
replicated. Batches are sharded over (`data`, `fsdp`) on their leading axis.
"""

import functools
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lmhead_jax.core.params import BATCH_AXES

MESH_AXES = ("data", "fsdp", "tensor")
TENSOR_AXES = ("heads", "kv_heads", "mlp", "vocab")


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
  """Resolves at most one -1 to the remaining devices; checks the product."""
  sizes = [int(data), int(fsdp), int(tensor)]
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {named}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {named}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f"mesh {named}: the fixed axes' product {fixed} does not divide "
                       f"the {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh {named} has {fixed} devices but {n_devices} are available")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh) -> P:
  """PartitionSpec of one parameter from its logical axes."""
  out: list[str | None] = [None] * len(shape)
  t = mesh.shape["tensor"]
  for i, (n, a) in enumerate(zip(shape, axes)):
    if a in TENSOR_AXES and t > 1 and n % t == 0 and "tensor" not in out:
      out[i] = "tensor"
  f = mesh.shape["fsdp"]
  if f > 1:
    free = [i for i, a in enumerate(axes) if out[i] is None and a != "layers" and shape[i] % f == 0]
    if free:
      out[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*out)


def param_shardings(shapes, axes, mesh):
  """NamedShardings for a tree of ShapeDtypeStructs (or arrays) with matching logical axes."""
  return jax.tree.map(lambda s, a: NamedSharding(mesh, spec_for(s.shape, a, mesh)), shapes, axes)


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def traced_on(mesh, fn):
  """`fn` traced with `mesh` in context, so that the model's activation shardings
  (`params.batch_sharded`) apply; wrap a function in it before `jax.jit`."""
  @functools.wraps(fn)
  def on_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return on_mesh


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)
