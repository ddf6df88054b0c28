"""spectrum.py against numpy float64: singular values, spectrum stats, the rank-2D update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.analysis import spectrum
from lmhead_jax.core import bottleneck

EPS = float(np.finfo(np.float32).eps)


def f64(x):
  return np.asarray(x, np.float64)


def np_stats(s, shape, d):
  """The spectrum stats by their definitions, in float64 loops."""
  eps = np.finfo(np.asarray(s).dtype).eps
  s = np.asarray(s, np.float64)
  sq, total = s**2, np.sum(s**2)
  k_p = lambda p: next(k for k in range(1, len(s) + 1) if sq[:k].sum() >= p * total)
  p = s / s.sum()
  p = p[p > 0]
  return dict(numerical_rank=np.sum(s > s[0] * max(shape) * eps),
              effective_rank=np.exp(-np.sum(p * np.log(p))), k_70=k_p(0.70), k_999=k_p(0.999),
              residual_d=np.sqrt(sq[d:].sum() / total),
              residual_2d=np.sqrt(sq[2 * d:].sum() / total),
              max_cosine_2d=np.sqrt(sq[:2 * d].sum() / total))


def low_rank_plus_decay(seed, n, v, k):
  """An N×V matrix of exact rank k (float64) with a decaying spectrum."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, k)) * np.logspace(0, -2, k)) @ rng.normal(size=(k, v))


@pytest.mark.parametrize("n,v", [(40, 64), (64, 40)])
def test_singular_values_float32(n, v):
  g = low_rank_plus_decay(0, n, v, min(n, v))
  s = spectrum.singular_values(jnp.asarray(g, jnp.float32))
  assert s.dtype == jnp.float32 and s.shape == (min(n, v),)
  ref = np.linalg.svd(g.astype(np.float32).astype(np.float64), compute_uv=False)
  # Backward-stable SVD: |σ − σ_ref| ≤ c·ε·σ_1.
  np.testing.assert_allclose(s, ref, atol=16 * EPS * ref[0])


def test_singular_values_float64():
  g = low_rank_plus_decay(1, 30, 50, 30)
  with jax.enable_x64(True):
    s = spectrum.singular_values(jnp.asarray(g))
    assert s.dtype == jnp.float64
  np.testing.assert_allclose(s, np.linalg.svd(g, compute_uv=False), rtol=1e-12)


def test_singular_values_bad_input():
  with pytest.raises(ValueError, match=r"float \[N, V\] matrix, got shape \(3,\)"):
    spectrum.singular_values(jnp.ones(3))
  with pytest.raises(ValueError, match="dtype int32"):
    spectrum.singular_values(jnp.ones((3, 4), jnp.int32))


@pytest.mark.parametrize("k", [5, 30])
def test_spectrum_stats_float64(k):
  n, v, d = 30, 50, 4
  g = low_rank_plus_decay(2, n, v, k)
  with jax.enable_x64(True):
    s = spectrum.singular_values(jnp.asarray(g))
    st = jax.jit(spectrum.spectrum_stats, static_argnums=(1, 2))(s, (n, v), d)
  ref = np_stats(np.linalg.svd(g, compute_uv=False), (n, v), d)
  assert int(st.numerical_rank) == ref["numerical_rank"] == k == np.linalg.matrix_rank(g)
  assert int(st.k_70) == ref["k_70"] and int(st.k_999) == ref["k_999"]
  for name in ("effective_rank", "residual_d", "residual_2d", "max_cosine_2d"):
    # Fractions of ‖G‖ in [0, 1]: float64 SVDs agree to ~1e-15 of ‖G‖ (the k = 5 tails are 0).
    np.testing.assert_allclose(getattr(st, name), ref[name], rtol=1e-10, atol=1e-13,
                               err_msg=name)
  np.testing.assert_allclose(st.residual_2d**2 + st.max_cosine_2d**2, 1.0, rtol=1e-12)


def test_spectrum_stats_float32_and_edges():
  s = np.array([4.0, 2.0, 1.0, 0.5, 1e-9, 0.0], np.float32)
  st = spectrum.spectrum_stats(jnp.asarray(s), (6, 9), 1)
  ref = np_stats(s, (6, 9), 1)
  assert int(st.numerical_rank) == 4 == ref["numerical_rank"]
  assert int(st.k_70) == ref["k_70"] == 1 and int(st.k_999) == ref["k_999"] == 4
  for name in ("effective_rank", "residual_d", "residual_2d", "max_cosine_2d"):
    np.testing.assert_allclose(getattr(st, name), ref[name], rtol=4 * EPS, err_msg=name)
  flat = spectrum.spectrum_stats(jnp.ones(8), (8, 8), 4)  # 2D ≥ len(σ): residual 0
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


def np_update(h, w, t, mask):
  """Float64 G, −(GWWᵀ + HHᵀG) and −GWWᵀ on the valid rows."""
  h, w = h[mask].astype(np.float64), w.astype(np.float64)
  z = h @ w.T
  p = np.exp(z - z.max(-1, keepdims=True))
  g = (p / p.sum(-1, keepdims=True) - np.eye(w.shape[0])[t[mask]]) / mask.sum()
  hidden = -g @ w @ w.T
  return g, hidden - h @ h.T @ g, hidden


def cos(a, b):
  return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.parametrize("masked", [False, True])
def test_realizable_update_matches_float64(masked):
  h, w, t, mask = update_case(masked=masked)
  u = spectrum.realizable_update(h, w, t, mask if masked else None)
  g, joint, hidden = np_update(h, w, t, mask)
  for got, ref in ((u.g, g), (u.delta_joint, joint), (u.delta_hidden, hidden)):
    np.testing.assert_allclose(np.asarray(got)[mask], ref, rtol=1e-5,
                               atol=16 * EPS * np.abs(ref).max())
    assert not np.any(np.asarray(got)[~mask])  # masked rows are dropped
  np.testing.assert_allclose(u.cosine_joint, cos(joint, -g), rtol=1e-5)
  np.testing.assert_allclose(u.cosine_hidden, cos(hidden, -g), rtol=1e-5)


def test_realizable_update_is_the_first_order_sgd_step():
  """ΔZ = −(∂ℒ/∂H Wᵀ + H (∂ℒ/∂W)ᵀ), with the gradients from jax.grad of the loss of H Wᵀ."""
  h, w, t, _ = update_case(seed=4)
  loss = lambda hh, ww: bottleneck.logit_grad(hh, ww, jnp.asarray(t), jnp.ones(len(t)))[0]
  gh, gw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
  ref = -(f64(gh) @ f64(w).T + f64(h) @ f64(gw).T)
  u = spectrum.realizable_update(h, w, t)
  np.testing.assert_allclose(u.delta_joint, ref, rtol=1e-5, atol=16 * EPS * np.abs(ref).max())


@pytest.mark.parametrize("n,v,d", [(48, 64, 4), (80, 40, 6)])
def test_rank_2d_bound(n, v, d):
  """N, V > 2D: the updates have rank exactly D and 2D, G much more; cosines obey the bounds."""
  h, w, t, _ = update_case(seed=5, n=n, v=v, d=d)
  u = jax.jit(spectrum.realizable_update)(h, w, t)
  g, joint, hidden = np_update(h, w, t, np.ones(n, bool))
  assert int(u.rank_hidden) == d == np.linalg.matrix_rank(hidden)
  assert int(u.rank_joint) == 2 * d == np.linalg.matrix_rank(joint)
  s = spectrum.singular_values(u.g)
  st = spectrum.spectrum_stats(s, (n, v), d)
  assert int(st.numerical_rank) == min(n, v - 1) > 2 * d  # rows of G sum to 0
  ref = np_stats(np.linalg.svd(g, compute_uv=False), (n, v), d)
  np.testing.assert_allclose(u.cosine_bound_2d, ref["max_cosine_2d"], rtol=1e-5)
  assert u.cosine_bound_2d < 1.0
  assert u.cosine_joint <= u.cosine_bound_2d
  assert u.cosine_hidden <= np.sqrt(1 - ref["residual_d"] ** 2)  # Eckart–Young at rank D
  # −GWWᵀ has rows in range(W), where GΠ is the closest: its cosine is at most visible_cosine.
  assert u.cosine_hidden <= bottleneck.linear_head_stats(h, w, t).visible_cosine * (1 + 1e-6)


def test_realizable_update_bad_input():
  h, w, t, _ = update_case()
  with pytest.raises(ValueError, match=r"D=3 but h has shape \(48, 4\)"):
    spectrum.realizable_update(h, w[:, :3], t)
  with pytest.raises(ValueError, match=r"id 64 outside \[0, 64\)"):
    spectrum.realizable_update(h, w, np.where(t == t[0], 64, t))
