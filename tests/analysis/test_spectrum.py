"""spectrum.py against numpy float64: spectrum stats, and the rank-2D limit on the joint SGD update
(`directions.directions`, the live code that forms it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.analysis import directions, spectrum
from lmhead_jax.core import bottleneck

EPS = float(np.finfo(np.float32).eps)


def f64(x):
  return np.asarray(x, np.float64)


def np_stats(s, d):
  """The spectrum stats by their definitions, in float64 loops."""
  s = np.asarray(s, np.float64)
  sq, total = s**2, np.sum(s**2)
  k_p = lambda p: next(k for k in range(1, len(s) + 1) if sq[:k].sum() >= p * total)
  p = s / s.sum()
  p = p[p > 0]
  return dict(effective_rank=np.exp(-np.sum(p * np.log(p))), k_70=k_p(0.70), k_999=k_p(0.999),
              residual_d=np.sqrt(sq[d:].sum() / total),
              residual_2d=np.sqrt(sq[2 * d:].sum() / total),
              max_cosine_2d=np.sqrt(sq[:2 * d].sum() / total))


def low_rank_plus_decay(seed, n, v, k):
  """An N×V matrix of exact rank k (float64) with a decaying spectrum."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, k)) * np.logspace(0, -2, k)) @ rng.normal(size=(k, v))


@pytest.mark.parametrize("k", [5, 30])
def test_spectrum_stats_float64(k):
  n, v, d = 30, 50, 4
  g = low_rank_plus_decay(2, n, v, k)
  with jax.enable_x64(True):
    s = jnp.linalg.svd(jnp.asarray(g), compute_uv=False)
    st = jax.jit(spectrum.spectrum_stats, static_argnums=1)(s, d)
  ref = np_stats(np.linalg.svd(g, compute_uv=False), d)
  assert int(st.k_70) == ref["k_70"] and int(st.k_999) == ref["k_999"]
  for name in ("effective_rank", "residual_d", "residual_2d", "max_cosine_2d"):
    # Fractions of ‖G‖ in [0, 1]: float64 SVDs agree to ~1e-15 of ‖G‖ (the k = 5 tails are 0).
    np.testing.assert_allclose(getattr(st, name), ref[name], rtol=1e-10, atol=1e-13,
                               err_msg=name)
  np.testing.assert_allclose(st.residual_2d**2 + st.max_cosine_2d**2, 1.0, rtol=1e-12)


def test_spectrum_stats_float32_and_edges():
  s = np.array([4.0, 2.0, 1.0, 0.5, 1e-9, 0.0], np.float32)
  st = spectrum.spectrum_stats(jnp.asarray(s), 1)
  ref = np_stats(s, 1)
  assert int(st.k_70) == ref["k_70"] == 1 and int(st.k_999) == ref["k_999"] == 4
  for name in ("effective_rank", "residual_d", "residual_2d", "max_cosine_2d"):
    np.testing.assert_allclose(getattr(st, name), ref[name], rtol=4 * EPS, err_msg=name)
  flat = spectrum.spectrum_stats(jnp.ones(8), 4)  # 2D ≥ len(σ): residual 0
  assert float(flat.residual_2d) == 0.0 and float(flat.max_cosine_2d) == 1.0
  np.testing.assert_allclose(flat.effective_rank, 8.0, rtol=4 * EPS)
  assert int(flat.k_70) == 6 and int(flat.k_999) == 8


def update_case(seed=3, n=48, v=64, d=4, masked=False):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(v, d)) / np.sqrt(d)).astype(np.float32)
  t = rng.integers(0, v, n).astype(np.int32)
  mask = rng.random(n) > 0.25 if masked else np.ones(n, bool)
  return h, w, t, mask


def cos(a, b):
  return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))


def rank32(x):
  """Numerical rank of a float32 result: σ > σ_1·max(shape)·ε₃₂."""
  s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  return int(np.sum(s > s[0] * max(np.shape(x)) * EPS))


def test_joint_update_is_the_first_order_sgd_step():
  """ΔZ = −(∂ℒ/∂H Wᵀ + H (∂ℒ/∂W)ᵀ), with the gradients from jax.grad of the loss of H Wᵀ."""
  h, w, t, _ = update_case(seed=4)
  ones = jnp.ones(len(t))
  loss = lambda hh, ww: bottleneck.logit_grad(hh, ww, jnp.asarray(t), ones)[0]
  gh, gw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
  ref = -(f64(gh) @ f64(w).T + f64(h) @ f64(gw).T)
  _, _, us = directions.directions(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), ones)
  np.testing.assert_allclose(us["joint"], ref, rtol=1e-5, atol=16 * EPS * np.abs(ref).max())


@pytest.mark.parametrize("n,v,d", [(48, 64, 4), (80, 40, 6)])
def test_rank_2d_bound(n, v, d):
  """N, V > 2D: the joint update has rank 2D, G much more; no cosine beats its rank's bound."""
  h, w, t, _ = update_case(seed=5, n=n, v=v, d=d)
  _, g, us = jax.jit(directions.directions)(h, w, t, jnp.ones(n))
  g, joint, hidden = f64(g), f64(us["joint"]), f64(us["hidden"])
  assert rank32(joint) == 2 * d and rank32(hidden) == d
  assert rank32(g) == min(n, v - 1) > 2 * d  # rows of G sum to 0
  sigma = np.linalg.svd(g, compute_uv=False)
  st = spectrum.spectrum_stats(jnp.asarray(sigma, jnp.float32), d)
  ref = np_stats(sigma, d)
  np.testing.assert_allclose(st.max_cosine_2d, ref["max_cosine_2d"], rtol=1e-5)
  assert st.max_cosine_2d < 1.0
  assert cos(joint, -g) <= st.max_cosine_2d
  assert cos(hidden, -g) <= np.sqrt(1 - ref["residual_d"] ** 2)  # Eckart–Young at rank D
  # −GΠ is the closest matrix to −G with rows in range(W): its cosine is visible_cosine.
  np.testing.assert_allclose(cos(hidden, -g), bottleneck.linear_head_stats(h, w, t).visible_cosine,
                             rtol=1e-5)
