"""The train step on 8 fake CPU devices equals the single-device run, on three meshes, with
the chunked head, and refining a carried range map."""

import jax
import numpy as np
import pytest

from helpers import one_device_mesh, tiny_config
from lmhead_jax.runs import experiment
from lmhead_jax.training import sharding, train


def run(mesh, chunk_size=None, carry=False):
  """Metrics of 3 steps on `mesh`, and the sharding spec of the first query weight; carry:
  each step refines the range map of the step before."""
  cfg = tiny_config()
  cfg.head.chunk_size = chunk_size
  rng = np.random.default_rng(0)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batches = [{"inputs": rng.integers(0, 256, shape).astype(np.int32),
              "targets": rng.integers(0, 256, shape).astype(np.int32),
              "mask": (rng.random(shape) > 0.2).astype(np.float32)} for _ in range(3)]
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  step = train.make_train_step(experiment.resolve(cfg, mesh), carry_range_map=carry)
  out, range_map = [], None
  for b in batches:
    state, m, *carried = step(state, b, range_map) if carry else step(state, b)
    range_map = carried[0] if carry else None
    out.append({k: float(v) for k, v in m.items() if k != "bottleneck/range_map_drift"})
  return out, state.params["layers"]["attn"]["wq"].sharding.spec


@pytest.fixture(scope="module")
def ref():
  return run(one_device_mesh())[0]


def worst_rel(got, ref):
  return max(abs(g[k] - r[k]) / max(abs(r[k]), 1e-12) for g, r in zip(got, ref) for k in r)


@pytest.mark.parametrize("shape,axis", [
    pytest.param((8, 1, 1), None, marks=pytest.mark.slow),  # (2, 2, 2) shards all three axes
    pytest.param((2, 4, 1), "fsdp", marks=pytest.mark.slow),
    ((2, 2, 2), "tensor")])
def test_sharded_steps_match_single_device(ref, shape, axis):
  got, spec = run(sharding.make_mesh(*shape))
  assert worst_rel(got, ref) < 1e-5, shape
  assert {"bottleneck/destroyed_ratio", "grad_norm"} <= set(got[0])
  assert axis is None or axis in str(spec)


def test_chunked_head_matches_single_device(ref):
  got, _ = run(sharding.make_mesh(2, 2, 2), chunk_size=16)
  assert worst_rel(got, ref) < 1e-5


def test_a_carried_range_map_matches_single_device(ref):
  got, _ = run(sharding.make_mesh(2, 2, 2), carry=True)
  assert worst_rel(got, ref) < 1e-5
