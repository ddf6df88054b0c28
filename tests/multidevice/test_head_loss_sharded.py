"""Vocab-parallel head_loss (issue 23): W sharded over V on `tensor`, tokens over `data`. The
loss, gradients and stats equal one device's, and no V-sized buffer is all-gathered by the loss:
the logits never are, W only by the stats' Householder QR (range_map "qr", what "auto" picks
off TPU; on TPU it picks "gram", a D×D all-reduce)."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from lmhead_jax.core import bottleneck
from lmhead_jax.core.loss import fused_head_loss

N, V, D, TENSOR = 64, 512, 16, 4
OPTIONS = dict(softcap=3.0, z_loss=0.01, label_smoothing=0.1)


def problem():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(N, D)).astype(np.float32)
  w = (rng.normal(size=(V, D)) / 4).astype(np.float32)
  y = rng.integers(0, V, N).astype(np.int32)
  y[::7] = -100
  m = rng.random(N) > 0.3
  weights = (rng.random(N) * 2).astype(np.float32)
  return h, w, y, m, weights


def vocab_gathers(hlo):
  """Shapes of the all-gathers with a dimension of a vocabulary shard's size or more."""
  shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
  return [s for s in shapes if any(int(x) >= V // TENSOR for x in s.split(",") if x)]


def on_mesh(f, kind, h, w, *per_token):
  """f(h, w, *per_token) jitted on a (data 2, tensor 4) mesh, W on tensor and the rest on data:
  (its value, the compiled HLO text)."""
  mesh = jax.make_mesh((2, TENSOR), ("data", "tensor"), axis_types=(kind, kind))
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, P("data")) for x in (h, *per_token)]
    placed.insert(1, jax.device_put(w, P("tensor")))
    compiled = jax.jit(f).lower(*placed).compile()
    return compiled(*placed), compiled.as_text()


def assert_same(got, want):
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(np.abs(b).max(), 1e-30),
                               err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_fused_head_loss_vocab_parallel(chunk_size, kind):
  """Loss, per-token stats (lse, argmax included) and gradients of every option as on one
  device, with no V-sized all-gather."""
  args = problem()
  f = jax.value_and_grad(lambda h, w, y, m, weights: fused_head_loss(
      h, w, y, m, chunk_size=chunk_size, weights=weights, **OPTIONS), (0, 1), has_aux=True)
  got, hlo = on_mesh(f, kind, *args)
  assert_same(got, jax.jit(f)(*args))
  assert vocab_gathers(hlo) == []


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_head_loss_vocab_parallel(chunk_size):
  """head_loss: loss, gradients and every stat as on one device; the one V-sized all-gather is
  that of range_map(W) alone, W itself ([V, D])."""
  args = problem()
  f = jax.value_and_grad(lambda h, w, y, m, weights: bottleneck.head_loss(
      h, w, y, m, chunk_size=chunk_size, weights=weights, return_lse=True, **OPTIONS),
                         (0, 1), has_aux=True)
  got, hlo = on_mesh(f, AxisType.Auto, *args)
  assert_same(got, jax.jit(f)(*args))
  _, range_map_hlo = on_mesh(lambda h, w: bottleneck.range_map(w), AxisType.Auto, *args[:2])
  assert vocab_gathers(hlo) == vocab_gathers(range_map_hlo) == [f"{V},{D}"]
