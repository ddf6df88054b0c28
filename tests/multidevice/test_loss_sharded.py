"""The chunked head loss on sharded tokens (and a vocab-sharded W) equals the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from lmhead_jax.core.loss import fused_head_loss


def step(h, w, y, m):
  f = lambda h, w: fused_head_loss(h, w, y, m, chunk_size=16)
  (loss, tok), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
  return loss, tok, grads


def problem(seed, n=96, v=64, d=16):
  """h[N, D], W[V, D], targets and a mask (about 70% valid)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32),
          (rng.normal(size=(v, d)) / 4).astype(np.float32),
          rng.integers(0, v, n).astype(np.int32), rng.random(n) > 0.3)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("shape,names,w_spec", [((8,), ("data",), P()),
                                                ((4, 2), ("data", "tensor"), P("tensor"))])
def test_sharded_matches_unsharded(kind, shape, names, w_spec):
  """Tokens sharded over `data` (8-way, or 4-way with W sharded on V over `tensor`), in both
  Auto and Explicit axis modes, give the unsharded result."""
  h, w, y, m = problem(0)
  want = jax.tree.leaves(jax.jit(step)(h, w, y, m))
  mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))
  with jax.set_mesh(mesh):
    args = [jax.device_put(h, P("data")), jax.device_put(w, w_spec),
            jax.device_put(y, P("data")), jax.device_put(m, P("data"))]
    got = jax.jit(step)(*args)
    dh, dw = got[2]
    assert dh.sharding.is_equivalent_to(jax.NamedSharding(mesh, P("data")), 2)
    assert dw.sharding.is_equivalent_to(jax.NamedSharding(mesh, w_spec), 2)
  err = max(float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30))
            for a, b in zip(jax.tree.leaves(got), want))
  assert err < 1e-5, err


BOTH = [AxisType.Auto, AxisType.Explicit]


@pytest.mark.parametrize("kind,chunk,vocab_block,reduction,tokens", [
    *[(k, 16, None, "mean", ("data", "fsdp")) for k in BOTH],  # per-shard dW partial sums
    # tokens over data only: 6 a chunk splits 2 ways, not 8 (one dW sum, C still split)
    *[(k, 6, None, "mean", "data") for k in BOTH],
    *[(k, 16, 24, "mean", ("data", "fsdp")) for k in BOTH],  # vocabulary blocks (V 64 → 72)
    *[(k, 16, None, "none", ("data", "fsdp")) for k in BOTH],  # chunks again in the backward
    # N = 96 padded to 100 = 5 · 20, 20 does not split 8 ways (Explicit mode cannot reshape
    # an axis split 8 ways into chunks of 20)
    (AxisType.Auto, 20, None, "sum", ("data", "fsdp"))])
def test_fsdp_mesh_matches_unsharded(kind, chunk, vocab_block, reduction, tokens):
  """data 2 × fsdp 4 (the paper presets' layout), W split by V over fsdp: the loss, the stats and
  both gradients equal the unsharded ones."""
  h, w, y, m = problem(1)
  ct = np.random.default_rng(2).normal(size=len(y)).astype(np.float32)  # per-token cotangents

  def f(h, w, y, m):
    loss, tok = fused_head_loss(h, w, y, m, chunk_size=chunk, vocab_block=vocab_block,
                                reduction=reduction)
    return (jnp.sum(loss * ct) if reduction == "none" else loss), tok

  run = lambda *a: jax.value_and_grad(f, (0, 1), has_aux=True)(*a)
  want = jax.tree.leaves(jax.jit(run)(h, w, y, m))
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(kind,) * 2)
  with jax.set_mesh(mesh):
    t = P(tokens)
    got = jax.tree.leaves(jax.jit(run)(jax.device_put(h, t), jax.device_put(w, P("fsdp")),
                                       jax.device_put(y, t), jax.device_put(m, t)))
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6)
