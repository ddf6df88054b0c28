"""The regularizers against float64 numpy: value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from references import np_cos, np_logit_grad, random_problem

from lmhead_jax.core import regularize


def test_ortho_equals_float64():
  _, w, _, _ = random_problem()
  s = w.T @ w
  expected = np.sum((s / (np.trace(s) / s.shape[0]) - np.eye(s.shape[0]))**2)
  np.testing.assert_allclose(float(regularize.ortho(jnp.float32(w))), expected, rtol=1e-5)
  q, _ = np.linalg.qr(w)
  assert float(regularize.ortho(jnp.float32(3 * q))) < 1e-10


def np_alignment(g, h, w, m):
  h = h * m[:, None]
  dz = g @ w @ w.T + h @ h.T @ g
  return 1 - np_cos(g, dz)


def test_alignment_equals_float64_value_and_gradient():
  h, w, y, m = random_problem()
  g = np_logit_grad(h @ w.T, y, m)
  f = lambda h, w: regularize.alignment(jnp.float32(g) / 7, h, w, jnp.float32(m))
  np.testing.assert_allclose(float(f(jnp.float32(h), jnp.float32(w))), np_alignment(g, h, w, m),
                             rtol=1e-5)
  dh, dw = jax.grad(f, (0, 1))(jnp.float32(h), jnp.float32(w))
  eps = 1e-6
  for x, dx, which in ((h, dh, 0), (w, dw, 1)):
    for idx in [(0, 0), (3, 2), (5, 5)]:
      e = np.zeros_like(x)
      e[idx] = eps
      args = [h, w]
      args[which] = x + e
      up = np_alignment(g, *args, m)
      args[which] = x - e
      down = np_alignment(g, *args, m)
      np.testing.assert_allclose(float(dx[idx]), (up - down) / (2 * eps), rtol=1e-3, atol=1e-6)
