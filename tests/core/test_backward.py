"""The head.backward rules as taps, against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from references import np_cos, np_logit_grad, np_truncated, random_problem

from lmhead_jax.core import backward
from lmhead_jax.core.loss import cross_entropy


def np_whiten(b, w, rel_lambda):
  s = w.T @ w
  x = b @ np.linalg.inv(s + rel_lambda * np.trace(s) / s.shape[0] * np.eye(s.shape[0]))
  return x * np.linalg.norm(b) / np.linalg.norm(x)


def test_whiten_equals_float64_and_realizes_g_pi():
  h, w, y, m = random_problem()
  g = np_logit_grad(h @ w.T, y, m)
  b = g @ w
  for lam in (1e-3, 1e-6):
    got = np.asarray(backward.whiten(jnp.float32(b), jnp.float32(w), lam), np.float64)
    np.testing.assert_allclose(got, np_whiten(b, w, lam), rtol=1e-5, atol=1e-5 * np.abs(b).max())
  g_pi = g @ w @ np.linalg.pinv(w.T @ w) @ w.T
  assert abs(np_cos(got @ w.T, g_pi) - 1) < 1e-5
  assert np_cos(b @ w.T, g_pi) < 0.99  # the exact G W Wᵀ is not G Π


def test_whitened_and_feedback_taps_change_dh_only():
  h, w, y, m = random_problem()
  b_fa = np.random.default_rng(5).normal(size=w.shape)
  h32, w32, bfa32 = (jnp.float32(x) for x in (h, w, b_fa))
  ce = lambda z: cross_entropy(z, y, m)
  exact_dh, exact_dw = jax.grad(lambda h, w: ce(h @ w.T), (0, 1))(h32, w32)
  wh_dh, wh_dw = jax.grad(lambda h, w: ce(backward.whitened(h, w) @ w.T), (0, 1))(h32, w32)
  fa_dh, fa_dw = jax.grad(
      lambda h, w: ce(backward.feedback(jax.lax.stop_gradient(h) @ w.T, h, bfa32)), (0, 1))(h32, w32)
  g = np_logit_grad(h @ w.T, y, m) / m.sum()
  np.testing.assert_allclose(exact_dw, g.T @ h, rtol=1e-5, atol=1e-7)
  for dw in (wh_dw, fa_dw):  # the head's own gradient stays exact
    np.testing.assert_allclose(dw, g.T @ h, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(wh_dh, np_whiten(g @ w, w, backward.LAMBDA), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fa_dh, g @ b_fa, rtol=1e-5, atol=1e-7)


def test_truncated_tap_passes_g_w_r_and_keeps_the_head_gradient():
  h, w, y, m = random_problem()
  h32, w32 = jnp.float32(h), jnp.float32(w)
  ce = lambda z: cross_entropy(z, y, m)
  g = np_logit_grad(h @ w.T, y, m) / m.sum()
  u, s_, vt = np.linalg.svd(w, full_matrices=False)
  for r in (1, 3, 6):
    dh, dw = jax.grad(lambda h, w: ce(backward.truncated(h, w, r) @ w.T), (0, 1))(h32, w32)
    w_r = (u[:, :r] * s_[:r]) @ vt[:r]  # Eckart–Young: the best rank-r approximation
    # float32 eigh of WᵀW: the subspace to ≈ ε·σ_max²/gap, so an absolute bound on the scale of dh
    np.testing.assert_allclose(dh, g @ w_r, rtol=1e-5, atol=2e-5 * np.abs(g @ w_r).max())
    np.testing.assert_allclose(np_truncated(g @ w, w, r), g @ w_r, atol=1e-12)
    np.testing.assert_allclose(dw, g.T @ h, rtol=1e-5, atol=1e-7)  # the head's own: exact
  np.testing.assert_array_equal(backward.truncate(jnp.float32(g @ w), w32, 6),
                                jnp.float32(g @ w))  # r = D: exact


def test_projected_tap_gives_rank_r_logits_and_passes_g_w_back():
  """The converse of `truncated`: logits h W_rᵀ, the trunk gets G_r W (G_r of those logits),
  W gets G_rᵀ (h V_r V_rᵀ), the exact gradient of the rank-r forward in W at a fixed projection."""
  h, w, y, m = random_problem()
  h32, w32 = jnp.float32(h), jnp.float32(w)
  ce = lambda z: cross_entropy(z, y, m)
  u, s_, vt = np.linalg.svd(w, full_matrices=False)
  for r in (1, 3):
    loss, (dh, dw) = jax.value_and_grad(
        lambda h, w: ce(backward.projected(h, jax.lax.stop_gradient(w), r) @ w.T), (0, 1))(h32, w32)
    w_r, p_r = (u[:, :r] * s_[:r]) @ vt[:r], vt[:r].T @ vt[:r]
    z_r = h @ w_r.T
    g_r = np_logit_grad(z_r, y, m) / m.sum()
    lse = np.log(np.exp(z_r - z_r.max(1, keepdims=True)).sum(1)) + z_r.max(1)
    np.testing.assert_allclose(loss, ((lse - z_r[np.arange(len(y)), y]) * m).sum() / m.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(dh, g_r @ w, rtol=1e-5, atol=1e-7)  # full W: straight through
    np.testing.assert_allclose(dw, g_r.T @ (h @ p_r), rtol=1e-4, atol=2e-6)
  np.testing.assert_array_equal(backward.projected(h32, w32, 6), h32)  # r = D: identity


def test_feedback_matrix_is_fixed_by_the_seed():
  b = np.asarray(backward.feedback_matrix(3, 512, 16))
  np.testing.assert_array_equal(b, backward.feedback_matrix(3, 512, 16))
  assert not np.allclose(b, backward.feedback_matrix(4, 512, 16))
  assert abs(b.std() * np.sqrt(16) - 1) < 0.05  # N(0, 1/D)
