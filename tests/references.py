"""float64 numpy references shared by several test files: the head loss with its options, and
confident tokens (p_y → 1)."""

import numpy as np


RTOL = 1e-4


def confident_reference(h, w, y, m):
  """float64: per-token loss, ‖g_t‖², correct; G = (p − e_y)·m/n, G W, Gᵀ H; bottleneck metrics.

  1 − p_y is summed as Σ_{j≠y} p_j: float64 p_y − 1 would itself cancel at 1 − p_y ≈ 1e-13.
  """
  h, w, m = (np.asarray(x, np.float64) for x in (h, w, m))
  z = h @ w.T
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  is_y = np.arange(w.shape[0]) == np.asarray(y)[:, None]
  q = np.sum(np.where(is_y, 0.0, p), -1)  # 1 − p_y
  g = np.where(is_y, -q[:, None], p)  # p − e_y, unscaled
  n = max(m.sum(), 1.0)
  big = (g * m[:, None]) / n  # G
  u, sv, _ = np.linalg.svd(w, full_matrices=False)
  basis = u[:, sv > sv[0] * 1e-9]  # range(W)
  lost = big - (big @ basis) @ basis.T  # G (I − Π)
  tok = np.linalg.norm(lost, axis=-1) / np.where(m > 0, np.linalg.norm(big, axis=-1), 1.0)
  full = np.linalg.norm(big)
  return dict(
      loss_N=-np.log1p(-q) * m, g_sq_N=np.sum(g * g, -1) * m,
      correct_N=(z.argmax(-1) == y) * m, dh=big @ w, dw=big.T @ h, one_minus_py=q,
      destroyed_ratio=np.linalg.norm(lost) / full,
      visible_cosine=np.linalg.norm(big @ basis) / full, full_norm=full,
      visible_norm=np.linalg.norm(big @ basis), backbone_norm=np.linalg.norm(big @ w),
      token_destroyed_ratio=np.sum(tok * m) / n)


def confident(margin, n=48, v=1000, d=32, seed=0):
  """h, W, y, mask (float32) with z_y − max_{j≠y} z_j ≈ margin: h moves along w_y."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(v, d)) / np.sqrt(d)
  h = rng.normal(size=(n, d)) * 4.0
  y = rng.integers(0, v, n)
  for _ in range(8):  # moving h also moves the other logits a little
    z = h @ w.T
    runner_up = np.max(np.where(np.arange(v) == y[:, None], -np.inf, z), -1)
    h += ((runner_up + margin - z[np.arange(n), y]) / np.sum(w[y] ** 2, -1))[:, None] * w[y]
  m = rng.random(n) > 0.2
  return (np.float32(h), np.float32(w), y.astype(np.int32), m.astype(np.float32))


def assert_close(got, want, names):
  for k in names:
    a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max(), err_msg=k)


OPTIONS = {"softcap": dict(softcap=3.0), "z_loss": dict(z_loss=0.01),
           "smoothing": dict(label_smoothing=0.1),
           "all": dict(softcap=3.0, z_loss=0.01, label_smoothing=0.1)}


IGNORED = [2, 3, 20]  # token positions whose target is −100


def reference_token_losses(z, y, z_loss=0.0, softcap=None, label_smoothing=0.0):
  """float64 per-token ℓ and lse of logits z[N, V]: (1 − ε)·CE + ε·(lse − mean s) + α·lse² on
  s = c·tanh(z/c); targets −100 read as 0 (their tokens are masked). CE = log(1 + Σ_{j≠y}
  e_j / e_y), accurate for confident tokens."""
  s = softcap * np.tanh(z / softcap) if softcap else z
  e = np.exp(s - s.max(-1, keepdims=True))
  is_y = np.arange(z.shape[1]) == np.where(y == -100, 0, y)[:, None]
  lse = s.max(-1) + np.log(e.sum(-1))
  ce = np.log1p(np.sum(np.where(is_y, 0.0, e), -1) / e[is_y])  # not lse − s_y, which cancels
  eps = label_smoothing
  return (1 - eps) * ce + eps * (lse - s.mean(-1)) + z_loss * lse**2, lse


def options_reference(h, w, y, mask, weights=None, reduction="mean", **opts):
  """float64: the loss, G = ∂ℒ/∂z (raw logits) written out, per-token stats, dℒ/dh, dℒ/dW."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  h = h.reshape(-1, w.shape[1])
  y = np.asarray(y).reshape(-1)
  m = (np.asarray(mask).reshape(-1) > 0) & (y != -100)
  wt = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  z = h @ w.T
  loss_n, lse = reference_token_losses(z, y, **opts)
  alpha, cap = opts.get("z_loss", 0.0), opts.get("softcap")
  eps, v = opts.get("label_smoothing", 0.0), w.shape[0]
  s = cap * np.tanh(z / cap) if cap else z
  p = np.exp(s - lse[:, None])
  is_y = np.arange(v) == np.where(y == -100, 0, y)[:, None]
  # ∂ℓ/∂s = p·(1 + 2α·lse) − (1 − ε)·e_y − ε/V, its target entry with p_y − 1 summed as
  # −Σ_{j≠y} p_j: float64 p_y − 1 would itself cancel for confident tokens.
  d = p * (1 + 2 * alpha * lse[:, None]) - eps / v
  q = np.sum(np.where(is_y, 0.0, p), -1)
  d[is_y] = -q + 2 * alpha * lse * p[is_y] + eps * (1 - 1 / v)  # one target per row
  if cap:
    d = d * (1 - np.tanh(z / cap) ** 2)
  r = m * wt / (max(m.sum(), 1.0) if reduction == "mean" else 1.0)
  g = r[:, None] * d
  loss = r * loss_n if reduction == "none" else np.sum(r * loss_n)
  return dict(loss=loss, loss_N=loss_n * m, g_sq_N=np.sum(d * d, -1) * m, lse_N=lse,
              correct_N=(z.argmax(-1) == y) * m, argmax_N=z.argmax(-1), g=g, dh=g @ w,
              dw=g.T @ h, weights=m * wt)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_logit_grad(z, y, m):
  """Rows (p − e_y)·m in float64 (G up to the 1/n, which no cosine sees)."""
  g = np_softmax(z)
  g[np.arange(len(y)), y] -= 1.0
  return g * m[:, None]


def np_cos(a, b):
  return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def random_problem(n=12, v=40, d=6, seed=0):
  rng = np.random.default_rng(seed)
  h, w = rng.normal(size=(n, d)), rng.normal(size=(v, d)) / np.sqrt(d)
  y, m = rng.integers(0, v, n), (rng.random(n) > 0.2).astype(np.float64)
  return h, w, y, m


def np_truncated(b, w, r):
  """b V_r V_rᵀ from float64 numpy's SVD of W: for b = G W, G W_r (W_r the best rank-r W)."""
  v_r = np.linalg.svd(w, full_matrices=False)[2][:r].T
  return b @ v_r @ v_r.T
