"""Escaping the bottleneck: realized_cosine, head.backward, regularizers, the mos head, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (copy, one_device_mesh, plain_loss, random_batch, sgd_lr1,
                     tiny_config)

from lmhead_jax.core import backward, bottleneck, config, heads, model, mos, regularize
from lmhead_jax.training import experiment, train
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.core.params import materialize


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


def all_logits(params, batch, cfg):
  c, hc = train.configs(cfg)
  h = model.hidden(params, batch["inputs"], c)
  return np.asarray(heads.logits(heads.params_of(params, hc), h, hc), np.float64)


def lab_config(kind="linear", **head):
  cfg = tiny_config(tie_embeddings=kind == "tied", n_layers=1)
  cfg.head.update(kind=kind, rank=8, mixtures=3, **head)
  return cfg


# --- realized_cosine -------------------------------------------------------------------------

@pytest.mark.parametrize("opt,lr", [("sgd", 1e-4), ("adamw", 1e-5)])
def test_realized_cosine_equals_finite_difference(opt, lr):
  cfg = lab_config()
  cfg.optimizer.update(name=opt, learning_rate=lr, momentum=0.9, weight_decay=0.1)
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  batch = random_batch(cfg)
  old = copy(state.params)
  new_state, m = train.make_train_step(cfg, mesh)(state, batch)
  z0, z1 = all_logits(old, batch, cfg), all_logits(copy(new_state.params), batch, cfg)
  y, msk = batch["targets"].reshape(-1), batch["mask"].reshape(-1).astype(np.float64)
  g = np_logit_grad(z0.reshape(len(y), -1), y, msk)
  dz = (z1 - z0).reshape(len(y), -1) * msk[:, None]
  expected = np_cos(-g, dz)
  assert 0.05 < abs(expected)  # a real signal, not noise around 0
  # the gap is second order: it shrinks with lr (sgd: 7.7e-5 at 1e-3, 3e-6 at 1e-4)
  np.testing.assert_allclose(float(m["bottleneck/realized_cosine"]), expected, atol=1e-4)


def test_realized_cosine_chunked_equals_dense():
  cfg = lab_config("factorized")
  params = model.init(jax.random.key(1), *train.configs(cfg))
  batch = random_batch(cfg)
  updates = jax.tree.map(lambda g: -0.1 * g, jax.grad(plain_loss)(params, batch, cfg))
  dense = train.realized_cosine(params, updates, batch, cfg)
  cfg.head.chunk_size = 24  # 128 tokens: 6 chunks, the last one padded
  np.testing.assert_allclose(train.realized_cosine(params, updates, batch, cfg), dense, rtol=1e-5)
  assert dense > 0.05
  cfg.train.grad_accum = 2  # a micro-batch at a time: the same sums
  np.testing.assert_allclose(train.realized_cosine(params, updates, batch, cfg), dense, rtol=1e-5)


# --- head.backward ---------------------------------------------------------------------------

def random_problem(n=12, v=40, d=6, seed=0):
  rng = np.random.default_rng(seed)
  h, w = rng.normal(size=(n, d)), rng.normal(size=(v, d)) / np.sqrt(d)
  y, m = rng.integers(0, v, n), (rng.random(n) > 0.2).astype(np.float64)
  return h, w, y, m


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


def np_truncated(b, w, r):
  """b V_r V_rᵀ from float64 numpy's SVD of W: for b = G W, G W_r (W_r the best rank-r W)."""
  v_r = np.linalg.svd(w, full_matrices=False)[2][:r].T
  return b @ v_r @ v_r.T


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


@pytest.mark.parametrize("kind,rule", [("linear", "feedback_alignment"), ("tied", "whitened"),
                                       ("linear", "truncated"),
                                       pytest.param("factorized", "whitened",
                                                    marks=pytest.mark.slow)])
def test_step_backward_rule_equals_tap_gradient(kind, rule):
  """The train step's explicit rule = jax.grad through the custom_vjp tap (validated above)."""
  rank = {"backward_rank": 3} if rule == "truncated" else {}
  cfg = sgd_lr1(lab_config(kind, backward=rule, **rank))
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  params, batch = copy(state.params), random_batch(cfg)
  new_state, _ = train.make_train_step(cfg, mesh, with_bottleneck=False)(state, batch)
  c, hc = train.configs(cfg)
  b_fa = backward.feedback_matrix(cfg.seed, hc.vocab_size, hc.d_model)

  def tapped_loss(p):
    h = model.hidden(p, batch["inputs"], c)
    hp = heads.params_of(p, hc)
    if rule == "whitened":
      z = heads.logits(hp, backward.whitened(h, jax.lax.stop_gradient(heads.matrix(hp))), hc)
    elif rule == "truncated":
      z = heads.logits(hp, backward.truncated(h, jax.lax.stop_gradient(heads.matrix(hp)), 3), hc)
    else:
      z = backward.feedback(heads.logits(hp, jax.lax.stop_gradient(h), hc), h, b_fa)
    return cross_entropy(z, batch["targets"], batch["mask"])

  expected = jax.grad(tapped_loss)(params)
  got = jax.tree.map(lambda a, b: a - b, params, copy(new_state.params))
  exact = jax.grad(plain_loss)(params, batch, cfg)
  assert not np.allclose(got["layers"]["mlp"]["w_up"], exact["layers"]["mlp"]["w_up"], rtol=1e-2)
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_feedback_matrix_is_fixed_by_the_seed():
  b = np.asarray(backward.feedback_matrix(3, 512, 16))
  np.testing.assert_array_equal(b, backward.feedback_matrix(3, 512, 16))
  assert not np.allclose(b, backward.feedback_matrix(4, 512, 16))
  assert abs(b.std() * np.sqrt(16) - 1) < 0.05  # N(0, 1/D)


# --- regularizers ----------------------------------------------------------------------------

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


@pytest.mark.slow
def test_step_with_regularizers_equals_jax_grad():
  cfg = sgd_lr1(lab_config(ortho_weight=0.3))
  cfg.train.alignment_weight = 0.7
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  params, batch = copy(state.params), random_batch(cfg)
  new_state, m = train.make_train_step(cfg, mesh, with_bottleneck=False)(state, batch)
  c, hc = train.configs(cfg)

  def total(p):
    h = model.hidden(p, batch["inputs"], c)
    w = heads.matrix(heads.params_of(p, hc))
    z = heads.logits(heads.params_of(p, hc), h, hc)
    g = jax.grad(cross_entropy)(z, batch["targets"], batch["mask"])
    return (cross_entropy(z, batch["targets"], batch["mask"]) + 0.3 * regularize.ortho(w)
            + 0.7 * regularize.alignment(g, h, w, batch["mask"]))

  expected = jax.grad(total)(params)
  got = jax.tree.map(lambda a, b: a - b, params, copy(new_state.params))
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert m["ortho_penalty"] > 0 and 0 < m["alignment_loss"] < 1


# --- mos -------------------------------------------------------------------------------------

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


@pytest.mark.slow
def test_mos_step_gradient_equals_jax_grad_and_reports_stats():
  cfg = sgd_lr1(lab_config("mos"))
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  params, batch = copy(state.params), random_batch(cfg)
  new_state, m = train.make_train_step(cfg, mesh)(state, batch)
  expected = jax.grad(plain_loss)(params, batch, cfg)
  got = jax.tree.map(lambda a, b: a - b, params, copy(new_state.params))
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # the stats of the strided sample of MOS_STAT_TOKENS tokens
  c, hc = train.configs(cfg)
  h = model.hidden(params, batch["inputs"], c).reshape(-1, c.d_model)
  idx = np.arange(train.MOS_STAT_TOKENS) * (h.shape[0] // train.MOS_STAT_TOKENS)
  hp = heads.params_of(params, hc)
  g = np_logit_grad(np.asarray(heads.logits(hp, h[idx], hc), np.float64),
                    batch["targets"].reshape(-1)[idx], batch["mask"].reshape(-1)[idx])
  assert np.isclose(m["bottleneck/full_norm"], np.linalg.norm(g) / batch["mask"].reshape(-1)[
      idx].sum(), rtol=1e-4)
  assert 0 < m["bottleneck/destroyed_ratio"] < 1 and -1 <= m["bottleneck/realized_cosine"] <= 1


# --- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override,words", [
    ({"head.kind": "mos", "head.mixtures": None}, "head.mixtures"),
    ({"head.kind": "mos", "head.chunk_size": 64}, "head.chunk_size"),
    ({"head.kind": "mos", "head.backward": "whitened"}, "head.backward"),
    ({"head.kind": "mos", "head.ortho_weight": 0.1}, "head.ortho_weight"),
    ({"head.backward": "feedback_alignment", "head.chunk_size": 64}, "head.chunk_size"),
    ({"head.backward": "whiten"}, "head.backward='whiten'"),
    ({"head.backward": "truncated"}, "head.backward_rank=None must be"),
    ({"head.backward": "truncated", "head.backward_rank": 33}, "head.backward_rank=33 must be"),
    ({"head.backward_rank": 4}, "head.backward_rank=4 needs head.backward='truncated'"),
    ({"head.ortho_weight": -1.0}, "head.ortho_weight=-1.0"),
    ({"train.alignment_weight": -0.5}, "train.alignment_weight=-0.5"),
    ({"train.alignment_weight": 0.5, "head.chunk_size": 64}, "head.chunk_size=64"),
    ({"train.alignment_weight": 0.5, "head.kind": "mos"}, "head.kind='mos'"),
])
def test_bad_combinations_are_refused_naming_keys(override, words):
  cfg = tiny_config()
  cfg.head.mixtures = 2
  for key, value in override.items():
    group, name = key.split(".")
    cfg[group][name] = value
  with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
    experiment.validate(cfg)


def test_every_backward_works_with_every_matrix_head():
  for kind in ("linear", "tied", "factorized"):
    for rule in config.HEAD_BACKWARDS:
      rank = {"backward_rank": 4} if rule == "truncated" else {}
      experiment.validate(lab_config(kind, backward=rule, ortho_weight=0.1, **rank))
  experiment.validate(lab_config("mos"))


def test_truncated_metrics_describe_what_the_trunk_receives():
  """backbone_norm = ‖G W_r‖ and visible_norm = ‖G Π_r‖ (Π_r onto W's top-r left singular
  directions), from float64 logits; at r = D the step equals `exact`."""
  cfg = lab_config(backward="truncated", backward_rank=3)
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  batch = random_batch(cfg)
  _, metrics = train.make_train_step(cfg, mesh)(copy(state), batch)
  c, hc = train.configs(cfg)
  z = all_logits(state.params, batch, cfg).reshape(-1, hc.vocab_size)
  y, m = batch["targets"].reshape(-1), batch["mask"].reshape(-1)
  g = np_logit_grad(z, y, m) / m.sum()
  w = np.asarray(heads.matrix(heads.params_of(state.params, hc)), np.float64)
  u = np.linalg.svd(w, full_matrices=False)[0][:, :3]
  np.testing.assert_allclose(metrics["bottleneck/backbone_norm"],
                             np.linalg.norm(np_truncated(g @ w, w, 3)), rtol=1e-4)
  np.testing.assert_allclose(metrics["bottleneck/visible_norm"], np.linalg.norm(g @ u @ u.T),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["bottleneck/full_norm"], np.linalg.norm(g), rtol=1e-4)
  exact = train.make_train_step(lab_config(), mesh)(copy(state), batch)
  full = train.make_train_step(lab_config(backward="truncated", backward_rank=hc.d_model), mesh)(
      copy(state), batch)
  for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)


def test_truncated_chunked_step_equals_dense():
  mesh = one_device_mesh()
  dense = lab_config(backward="truncated", backward_rank=3)
  chunked = lab_config(backward="truncated", backward_rank=3, chunk_size=16)
  state, _ = train.init_state(jax.random.key(0), dense, mesh)
  batch = random_batch(dense)
  a, ma = train.make_train_step(dense, mesh)(copy(state), batch)
  b, mb = train.make_train_step(chunked, mesh)(copy(state), batch)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for k in ("bottleneck/backbone_norm", "bottleneck/visible_norm", "bottleneck/destroyed_ratio"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4)
