"""Mesh shapes and parameter/batch shardings, against specs worked out by hand."""

import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from lmhead_jax.training import sharding


def mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_mesh_shape_resolves_one_free_axis():
  assert sharding.mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  assert sharding.mesh_shape(2, 1, -1, 8) == (2, 1, 4)
  assert sharding.mesh_shape(2, 2, 2, 8) == (2, 2, 2)


def test_bad_mesh_errors_name_values():
  with pytest.raises(ValueError, match="3 devices but 1"):
    sharding.mesh_shape(3, 1, 1, 1)
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.mesh_shape(-1, 3, 1, 8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="positive or -1, got {'data': 0"):
    sharding.mesh_shape(0, 1, 1, 8)


@pytest.mark.parametrize("shape,axes,m,want", [
    # tensor takes the tensor-parallel axis, fsdp the largest other one (never `layers`)
    ((4, 64, 128), ("layers", "embed", "mlp"), (2, 2, 2), P(None, "fsdp", "tensor")),
    ((4, 64, 128), ("layers", "embed", "mlp"), (1, 8, 1), P(None, None, "fsdp")),
    ((4, 3), ("layers", "embed"), (1, 2, 1), P(None, None)),
    # a dimension that the axis does not divide stays replicated
    ((3, 5), ("vocab", "embed"), (1, 2, 2), P(None, None)),
    ((6, 4), ("vocab", "embed"), (1, 4, 2), P("tensor", "fsdp")),
    # one dimension per mesh axis
    ((4, 4), ("heads", "mlp"), (1, 1, 2), P("tensor", None)),
    ((16,), ("embed",), (8, 1, 1), P(None)),
])
def test_spec_for(shape, axes, m, want):
  assert sharding.spec_for(shape, axes, mesh(*m)) == want


def test_batches_split_over_data_and_fsdp():
  assert sharding.data_parallel_size(mesh(2, 2, 2)) == 4
  m = mesh(2, 2, 2)
  assert sharding.batch_sharding(m, 3).spec == P(("data", "fsdp"), None, None)
  assert sharding.replicated(m).spec == P()
