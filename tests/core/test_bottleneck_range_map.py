"""bottleneck.range_map's two formulations (Householder QR, Gram passes) against float64 truth."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scipy.linalg
from helpers import run_with_devices
from lmhead_jax.core import bottleneck

EPS = float(np.finfo(np.float32).eps)


def conditioned(v, d, kappa, seed=0):
  """float32 W = U diag(s) Qᵀ, U, Q orthonormal, s log-spaced from 1 to 1/kappa."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(v, d)))
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return ((u * np.logspace(0, -np.log10(kappa), d)) @ q.T).astype(np.float32)


def low_rank(v, d, r, seed=0):
  """W = A·B of rank r, multiplied in float32 (round-off adds tiny σ beyond r), and A·B in float64."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(v, r)).astype(np.float32), rng.normal(size=(r, d)).astype(np.float32)
  return np.asarray(jnp.matmul(a, b, precision="highest")), a.astype(np.float64) @ b


def near_tolerance(v, d, factors, seed=0):
  """float32 W = U diag(s) Qᵀ with s = 1 but its last values, factors × the rank tolerance
  σ_max·max(D, √V)·ε; U's rows have log-normal norms (the Gram's round-off is uneven)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(np.exp(2 * rng.normal(size=(v, 1))) * rng.normal(size=(v, d)))
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  s = np.ones(d)
  s[d - len(factors):] = np.asarray(factors) * max(d, v**0.5) * EPS
  return ((u * s) @ q.T).astype(np.float32)


def visible_norms(w_VxD, m_DxK, w_range=None):
  """‖g_t Π‖ read off b = g W (float32) through m, for 64 random rows g, and the float64 truth
  ‖g_t U_r‖ (U_r: left singular vectors of w_range (default w) above the rank rule's tolerance)."""
  g = np.random.default_rng(1).normal(size=(64, w_VxD.shape[0]))
  b = jnp.asarray(g.astype(np.float32) @ w_VxD)
  got = np.sqrt(np.asarray(bottleneck.visible_sq(b, m_DxK)))
  w_range = w_VxD if w_range is None else w_range
  u, s, _ = np.linalg.svd(np.asarray(w_range, np.float64), full_matrices=False)
  r = np.sum(s > s[0] * max(w_VxD.shape[1], w_VxD.shape[0]**0.5) * EPS)
  return got, np.linalg.norm(g @ u[:, :r], axis=1)


def kept(m_DxK) -> int:
  return int(np.sum(np.any(np.asarray(m_DxK) != 0, axis=0)))


@pytest.mark.parametrize("kappa", [1, 1e2, 1e3, 1e4])
def test_gram_matches_float64_up_to_condition_1e4(kappa):
  w = conditioned(8192, 256, kappa)
  m = bottleneck.range_map(jnp.asarray(w), "gram")
  got, truth = visible_norms(w, m)
  assert kept(m) == 256
  np.testing.assert_allclose(got, truth, rtol=(8 + kappa) * EPS)  # b's round-off + κ·ε


@pytest.mark.parametrize("kappa", [1e3, 1e4])
def test_naive_gram_eigh_squares_the_condition_number(kappa):
  """One eigh of the float32 WᵀW resolves σ only down to ≈ √ε·σ_max: at κ ≥ 1e3 its visible
  norms miss the κ·ε bound that the two-pass Gram path meets by 10×."""
  w = conditioned(8192, 256, kappa)
  lam, u = jnp.linalg.eigh(jnp.matmul(w.T, w, precision="highest"))
  m = u * jnp.where(lam > 0, 1.0 / jnp.sqrt(jnp.where(lam > 0, lam, 1.0)), 0.0)
  got, truth = visible_norms(w, m)
  assert np.max(np.abs(got / truth - 1)) > 10 * kappa * EPS


@pytest.mark.parametrize("v,d,r", [(4096, 256, 64), (8192, 128, 127),
                                   pytest.param(16384, 1024, 64, marks=pytest.mark.slow),
                                   (1024, 64, 1), (24, 32, 8)])
def test_rank_deficient_keeps_the_qr_rank(v, d, r):
  w, w64 = low_rank(v, d, r)
  m_gram, m_qr = (bottleneck.range_map(jnp.asarray(w), k) for k in ("gram", "qr"))
  assert m_gram.shape == m_qr.shape == (d, min(v, d))
  assert kept(m_gram) == kept(m_qr) == r
  np.testing.assert_allclose(*visible_norms(w, m_gram, w_range=w64), rtol=1e-5)


def test_duplicated_columns_and_zero_head():
  w = np.random.default_rng(0).normal(size=(2048, 48)).astype(np.float32)
  w = np.concatenate([w, w[:, :16]], axis=1)  # rank 48 of 64
  assert kept(bottleneck.range_map(jnp.asarray(w), "gram")) == 48
  np.testing.assert_allclose(*visible_norms(w, bottleneck.range_map(jnp.asarray(w), "gram")),
                             rtol=1e-5)
  assert not np.any(np.asarray(bottleneck.range_map(jnp.zeros((64, 8)), "gram")))


def test_auto_is_qr_on_cpu_and_gram_when_lowered_for_tpu():
  w = jnp.asarray(conditioned(300, 40, 10))
  np.testing.assert_array_equal(bottleneck.range_map(w), bottleneck.range_map(w, "qr"))
  qr_of_w = re.compile(r"@Qr\(.*tensor<300x40xf32>")  # XLA:TPU's QR custom call on W itself
  lower = lambda method: jax.jit(bottleneck.range_map, static_argnums=1).trace(w, method).lower(
      lowering_platforms=("tpu",)).as_text()
  assert qr_of_w.search(lower("qr"))
  assert not qr_of_w.search(lower("auto"))
  calls = lambda method: sorted(re.findall(r"custom_call @(\w+)", lower(method)))
  assert calls("auto") == calls("gram") != calls("qr")


def test_bad_method():
  with pytest.raises(ValueError, match="'cholesky'"):
    bottleneck.range_map(jnp.ones((8, 4)), "cholesky")


def test_gram_sharded_over_v_needs_no_gather():
  """On 8 devices with W sharded over V: the same map as on one device, and no all-gather."""
  out = run_with_devices("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lmhead_jax.core import bottleneck
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 64)) * np.logspace(0, -3, 64),
                    jnp.float32)
    mesh = jax.make_mesh((8,), ("v",), axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.jit(lambda w: bottleneck.range_map(w, "gram"),
                out_shardings=NamedSharding(mesh, P()))
    ws = jax.device_put(w, NamedSharding(mesh, P("v", None)))
    b = jnp.asarray(np.random.default_rng(1).normal(size=(16, 4096)), jnp.float32) @ w
    norm = lambda m: np.sqrt(np.asarray(bottleneck.visible_sq(b, m))).tolist()
    print(json.dumps({"sharded": norm(f(ws)), "single": norm(bottleneck.range_map(w, "gram")),
                      "hlo": f.lower(ws).compile().as_text()}))
  """)
  np.testing.assert_allclose(out["sharded"], out["single"], rtol=2e3 * EPS)  # each within κ·ε of the truth
  assert "all-reduce" in out["hlo"]  # the Gram matrices' sums over V
  assert "all-gather" not in out["hlo"]


@pytest.mark.parametrize("v,d", [(65536, 16), pytest.param(8192, 256, marks=pytest.mark.slow)])
def test_the_rank_rule_splits_at_the_tolerance(v, d):
  """σ at 3, 1.5, 0.6 and 0.3 × the tolerance: both formulations keep the first two and drop
  the last two, also where √V > D (the Gram's round-off above the first pass's floor)."""
  w = near_tolerance(v, d, [3.0, 1.5, 0.6, 0.3])
  for method in ("gram", "qr"):
    assert kept(bottleneck.range_map(jnp.asarray(w), method)) == d - 2, method


def rotated(w, theta, seed=3):
  """W exp(θ S), S a random skew-symmetric D×D: the same σ, the right singular vectors moved
  by ≈ θ (a head a few steps later), in float64 then float32."""
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(w.shape[1],) * 2)
  s = (s - s.T) / np.sqrt(2 * w.shape[1])
  return (w.astype(np.float64) @ scipy.linalg.expm(theta * s)).astype(np.float32)


@pytest.mark.parametrize("kappa", [1, 1e4])
@pytest.mark.parametrize("theta", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-1])
def test_refine_follows_a_moved_head_to_float64(kappa, theta):
  """From the map of W', one Cholesky pass gives W's map to the same κ·ε bound as `range_map`,
  also when W' and W are far apart (θ = 0.1 at κ = 1e4: a drift of 4e4)."""
  w0 = conditioned(4096, 128, kappa)
  w = rotated(w0, theta)
  m, drift = bottleneck.refine_range_map(jnp.asarray(w), bottleneck.range_map(jnp.asarray(w0)))
  got, truth = visible_norms(w, m)
  assert kept(m) == 128 and float(drift) > 0
  np.testing.assert_allclose(got, truth, rtol=(8 + kappa) * EPS)


def test_refine_keeps_a_low_rank_heads_rank():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4096, 64)), rng.normal(size=(64, 256))
  w0 = (a.astype(np.float32) @ b.astype(np.float32))
  a, b = a + 1e-2 * rng.normal(size=a.shape), b + 1e-2 * rng.normal(size=b.shape)
  w, w64 = a.astype(np.float32) @ b.astype(np.float32), a @ b
  m, _ = bottleneck.refine_range_map(jnp.asarray(w), bottleneck.range_map(jnp.asarray(w0)))
  assert m.shape == (256, 256) and kept(m) == 64
  np.testing.assert_allclose(*visible_norms(w, m, w_range=w64), rtol=1e-5)


def test_refine_of_the_same_head_does_not_drift():
  w = jnp.asarray(conditioned(2048, 64, 100))
  m = bottleneck.range_map(w)
  refined, drift = bottleneck.refine_range_map(w, m)
  assert float(drift) < 10 * 100 * EPS  # the Gram's round-off on X = W M (37ε here)
  np.testing.assert_allclose(*visible_norms(np.asarray(w), refined), rtol=108 * EPS)
