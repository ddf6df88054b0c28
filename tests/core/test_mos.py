"""The Mixture-of-Softmaxes head against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from references import np_logit_grad, np_softmax

from lmhead_jax.core import bottleneck, config, heads
from lmhead_jax.core.params import materialize


def np_mos_log_p(p, h):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  h_k = np.tanh(np.einsum("nd,ked->nke", h, p["p_SxDxD"]))
  q = np_softmax(np.einsum("nke,ve->nkv", h_k, p["w_VxD"]))
  pi = np_softmax(h @ p["pi_SxD"].T)
  return np.log(np.einsum("nk,nkv->nv", pi, q))


def mos_problem(n=10, v=48, d=6, k=3):
  hc = config.HeadConfig(vocab_size=v, d_model=d, kind="mos", mixtures=k)
  params = materialize(jax.random.key(2), heads.specs(hc))
  rng = np.random.default_rng(0)
  return hc, params, rng.normal(size=(n, d)), rng.integers(0, v, n), (rng.random(n) > .2) * 1.


def test_mos_logits_equal_float64():
  hc, params, h, _, _ = mos_problem()
  got = heads.logits(params, jnp.float32(h), hc)
  np.testing.assert_allclose(got, np_mos_log_p(params, h), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)).sum(-1), 1, rtol=1e-5)


def test_mos_head_stats_equal_per_token_jacobian_projector():
  hc, params, h, y, m = mos_problem()
  stats = bottleneck.head_stats(lambda x: heads.logits(params, x, hc), jnp.float32(h), y, m,
                                linear_in_h=False)
  g = np_logit_grad(np_mos_log_p(params, h), y, m)
  eps, d = 1e-6, h.shape[1]
  vis, back = [], []
  for t in range(len(y)):  # central differences of the float64 numpy head: J_t[V, D]
    e = np.eye(d) * eps
    j = np.stack([(np_mos_log_p(params, h[t:t + 1] + e[i])[0]
                   - np_mos_log_p(params, h[t:t + 1] - e[i])[0]) / (2 * eps) for i in range(d)], 1)
    vis.append(g[t] @ j @ np.linalg.pinv(j))  # g_t Π_t
    back.append(g[t] @ j)
  vis, back = np.array(vis), np.array(back)
  n = m.sum()
  np.testing.assert_allclose(stats.full_norm, np.linalg.norm(g) / n, rtol=1e-5)
  np.testing.assert_allclose(stats.backbone_norm, np.linalg.norm(back) / n, rtol=1e-4)
  np.testing.assert_allclose(stats.visible_norm, np.linalg.norm(vis) / n, rtol=1e-4)
  np.testing.assert_allclose(stats.destroyed_ratio,
                             np.linalg.norm(g - vis) / np.linalg.norm(g), rtol=1e-4)
  tok = np.linalg.norm(g - vis, axis=1) / np.maximum(np.linalg.norm(g, axis=1), 1e-300)
  np.testing.assert_allclose(stats.token_destroyed_ratio, np.sum(tok * m) / n, rtol=1e-4)
