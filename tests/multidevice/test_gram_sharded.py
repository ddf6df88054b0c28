"""gram on 8 devices: growing_spectrum against a dense float64 numpy SVD of G; C split by rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.runs import measurement
from lmhead_jax.analysis import gram
from lmhead_jax.core import model
from lmhead_jax.data import pipeline
from lmhead_jax.training import sharding


class W:
  seq_len = 16
  def __init__(self, v): self.v = v
  def __len__(self): return 64
  def __getitem__(self, i):
    r = np.random.default_rng(i).integers(0, self.v, 17).astype(np.int32)
    return {"inputs": r[:-1], "targets": r[1:], "mask": np.ones(16, np.float32)}


@pytest.mark.parametrize("v", [64, 60])
def test_gram_on_eight_devices(v):
  """V = 60 does not split over 8 devices: C is padded to 64, and the summary is unchanged."""
  cfg = measurement.base_config()
  cfg.fresh = "8"
  cfg.model.update(vocab_size=v, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=16)
  mesh = sharding.make_mesh(data=8)
  s = next(measurement.load(cfg, "/x", mesh))
  got = gram.growing_spectrum(s, W(v), mesh, tokens=[512], batch_size=8, method="gram")[-1]
  it, rows = iter(pipeline.make_dataset(W(v), global_batch_size=8, seed=0)), []
  w = np.asarray(s.params["head"]["w_VxD"], np.float64)
  for _ in range(4):
    b = next(it)
    z = np.asarray(model.hidden(s.params, b["inputs"], s.model_cfg), np.float64) @ w.T
    p = np.exp(z - z.max(-1, keepdims=True)).reshape(-1, v)
    rows.append(p / p.sum(-1, keepdims=True) - np.eye(v)[b["targets"].reshape(-1)])
  g = np.concatenate(rows) / 512
  sv = np.linalg.svd(g, compute_uv=False)
  assert got["tokens"] == 512
  assert got["numerical_rank_fine"] == np.linalg.matrix_rank(g) == v - 1
  np.testing.assert_allclose(got["sigma_1"], sv[0], rtol=1e-5)
  np.testing.assert_allclose(got["residual_2d"], np.sqrt(np.sum(sv[16:]**2) / np.sum(sv**2)),
                             rtol=1e-5)
  np.testing.assert_allclose(got["effective_rank"], np.exp(-np.sum(
      (sv / sv.sum()) * np.log(sv / sv.sum()))), rtol=1e-4)


@pytest.mark.parametrize("v", [64, 60])
def test_each_device_holds_its_rows_of_the_gram(v):
  """C = GᵀG split by rows over 8 devices, before and after an update: 8 rows each, V = 60
  padded to 64 with zero rows and columns; the per-device budget is what lets a V×V larger than
  one device's share take the Gram path."""
  mesh = sharding.make_mesh(data=8)
  rng = np.random.default_rng(0)
  h = rng.standard_normal((8, 4, 16)).astype(np.float32)
  w = rng.standard_normal((v, 16)).astype(np.float32)
  y, m = rng.integers(0, v, (8, 4)).astype(np.int32), np.ones((8, 4), np.float32)
  with jax.enable_x64(True):
    update, c = gram.make_gram(mesh, v, jnp.float64)
    assert {s.data.shape for s in c.addressable_shards} == {(8, 64)}
    c = update(c, jax.device_put(h, sharding.batch_sharding(mesh, 3)), w, y, m)
    assert {s.data.shape for s in c.addressable_shards} == {(8, 64)}
    z = h.reshape(-1, 16).astype(np.float64) @ w.T.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    g = np.pad(p / p.sum(-1, keepdims=True) - np.eye(v)[y.reshape(-1)], ((0, 0), (0, 64 - v)))
    np.testing.assert_allclose(np.asarray(c), g.T @ g, rtol=1e-5, atol=1e-6)
  share = 64 * 64 * 8 / 8 / 2**30  # one device's rows, in GiB
  assert gram.choose_method("auto", v, "float64", share, 8, host_max_gib=1.0) == "gram"
  assert gram.choose_method("auto", v, "float64", share, 1, host_max_gib=1.0) == "randomized"
