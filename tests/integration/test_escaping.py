"""Escaping the bottleneck in the train step: realized_cosine, head.backward, regularizers and the mos head against jax.grad and float64 numpy, and which combinations the config refuses."""

import jax
import numpy as np
import pytest
from helpers import copy, one_device_mesh, plain_loss, random_batch, sgd_lr1, tiny_config
from references import np_cos, np_logit_grad, np_truncated

from lmhead_jax.core import backward, config, heads, model, regularize
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.runs import experiment
from lmhead_jax.training import train


def all_logits(params, batch, cfg):
  c, hc = experiment.configs(cfg)
  h = model.hidden(params, batch["inputs"], c)
  return np.asarray(heads.logits(heads.params_of(params, hc), h, hc), np.float64)


def lab_config(kind="linear", **head):
  cfg = tiny_config(tie_embeddings=kind == "tied", n_layers=1)
  cfg.head.update(kind=kind, rank=8, mixtures=3, **head)
  return cfg


@pytest.mark.parametrize("opt,lr", [("sgd", 1e-4), ("adamw", 1e-5)])
def test_realized_cosine_equals_finite_difference(opt, lr):
  cfg = lab_config()
  cfg.optimizer.update(name=opt, learning_rate=lr, momentum=0.9, weight_decay=0.1)
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  batch = random_batch(cfg)
  old = copy(state.params)
  new_state, m = train.make_train_step(experiment.resolve(cfg, mesh))(state, batch)
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
  params = model.init(jax.random.key(1), *experiment.configs(cfg))
  batch = random_batch(cfg)
  updates = jax.tree.map(lambda g: -0.1 * g, jax.grad(plain_loss)(params, batch, cfg))
  dense = train.realized_cosine(params, updates, batch, experiment.resolve(cfg))
  cfg.head.chunk_size = 24  # 128 tokens: 6 chunks, the last one padded
  np.testing.assert_allclose(train.realized_cosine(params, updates, batch, experiment.resolve(cfg)), dense, rtol=1e-5)
  assert dense > 0.05
  cfg.train.grad_accum = 2  # a micro-batch at a time: the same sums
  np.testing.assert_allclose(train.realized_cosine(params, updates, batch, experiment.resolve(cfg)), dense, rtol=1e-5)


@pytest.mark.parametrize("kind,rule", [("linear", "feedback_alignment"), ("tied", "whitened"),
                                       ("linear", "truncated"),
                                       pytest.param("factorized", "whitened",
                                                    marks=pytest.mark.slow)])
def test_step_backward_rule_equals_tap_gradient(kind, rule):
  """The train step's explicit rule = jax.grad through the custom_vjp tap (validated above)."""
  rank = {"backward_rank": 3} if rule == "truncated" else {}
  cfg = sgd_lr1(lab_config(kind, backward=rule, **rank))
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  params, batch = copy(state.params), random_batch(cfg)
  new_state, _ = train.make_train_step(experiment.resolve(cfg, mesh), with_bottleneck=False)(state, batch)
  c, hc = experiment.configs(cfg)
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


@pytest.mark.slow
def test_step_with_regularizers_equals_jax_grad():
  cfg = sgd_lr1(lab_config(ortho_weight=0.3))
  cfg.train.alignment_weight = 0.7
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  params, batch = copy(state.params), random_batch(cfg)
  new_state, m = train.make_train_step(experiment.resolve(cfg, mesh), with_bottleneck=False)(state, batch)
  c, hc = experiment.configs(cfg)

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


@pytest.mark.slow
def test_mos_step_gradient_equals_jax_grad_and_reports_stats():
  cfg = sgd_lr1(lab_config("mos"))
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  params, batch = copy(state.params), random_batch(cfg)
  new_state, m = train.make_train_step(experiment.resolve(cfg, mesh))(state, batch)
  expected = jax.grad(plain_loss)(params, batch, cfg)
  got = jax.tree.map(lambda a, b: a - b, params, copy(new_state.params))
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # the stats of the strided sample of MOS_STAT_TOKENS tokens
  c, hc = experiment.configs(cfg)
  h = model.hidden(params, batch["inputs"], c).reshape(-1, c.d_model)
  idx = np.arange(train.MOS_STAT_TOKENS) * (h.shape[0] // train.MOS_STAT_TOKENS)
  hp = heads.params_of(params, hc)
  g = np_logit_grad(np.asarray(heads.logits(hp, h[idx], hc), np.float64),
                    batch["targets"].reshape(-1)[idx], batch["mask"].reshape(-1)[idx])
  assert np.isclose(m["bottleneck/full_norm"], np.linalg.norm(g) / batch["mask"].reshape(-1)[
      idx].sum(), rtol=1e-4)
  assert 0 < m["bottleneck/destroyed_ratio"] < 1 and -1 <= m["bottleneck/realized_cosine"] <= 1


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
    ({"head.forward_rank": 33}, "head.forward_rank=33 must be"),
    ({"head.forward_rank": 4, "head.kind": "factorized", "head.rank": 4},
     "head.forward_rank=4 needs head.kind"),
    ({"head.forward_rank": 4, "head.backward": "whitened"}, "head.backward 'exact' or"),
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
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  batch = random_batch(cfg)
  _, metrics = train.make_train_step(experiment.resolve(cfg, mesh))(copy(state), batch)
  c, hc = experiment.configs(cfg)
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
  exact = train.make_train_step(experiment.resolve(lab_config(), mesh))(copy(state), batch)
  full = train.make_train_step(experiment.resolve(lab_config(backward="truncated", backward_rank=hc.d_model), mesh))(
      copy(state), batch)
  for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_size", [None, pytest.param(16, marks=pytest.mark.slow)])
def test_forward_rank_step_trains_rank_r_logits_on_the_full_gradient(chunk_size):
  """head.forward_rank=r (the converse of truncated): loss of z_r = h W_rᵀ, in the train and the
  eval step; the trunk receives G_r W (backbone_norm), against float64 numpy; at r = D the step
  equals `exact`."""
  mesh = one_device_mesh()
  cfg = lab_config(forward_rank=3, chunk_size=chunk_size)
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  batch = random_batch(cfg)
  _, metrics = train.make_train_step(experiment.resolve(cfg, mesh))(copy(state), batch)
  c, hc = experiment.configs(cfg)
  h = np.asarray(model.hidden(state.params, batch["inputs"], c), np.float64).reshape(-1, hc.d_model)
  w = np.asarray(heads.matrix(heads.params_of(state.params, hc)), np.float64)
  v_r = np.linalg.svd(w, full_matrices=False)[2][:3].T
  z_r = h @ v_r @ v_r.T @ w.T
  y, m = batch["targets"].reshape(-1), batch["mask"].reshape(-1).astype(np.float64)
  g_r = np_logit_grad(z_r, y, m) / m.sum()
  lse = np.log(np.exp(z_r - z_r.max(1, keepdims=True)).sum(1)) + z_r.max(1)
  loss_r = ((lse - z_r[np.arange(len(y)), y]) * m).sum() / m.sum()
  np.testing.assert_allclose(metrics["loss"], loss_r, rtol=1e-5)
  # the eval step scores the same rank-r logits
  evaluated = train.make_eval_step(experiment.resolve(cfg, mesh))(state.params, batch)
  np.testing.assert_allclose(evaluated["loss"], loss_r, rtol=1e-5)
  np.testing.assert_allclose(metrics["bottleneck/backbone_norm"], np.linalg.norm(g_r @ w),
                             rtol=1e-4)
  np.testing.assert_allclose(metrics["bottleneck/full_norm"], np.linalg.norm(g_r), rtol=1e-4)
  exact = train.make_train_step(experiment.resolve(lab_config(chunk_size=chunk_size), mesh))(
      copy(state), batch)
  full = train.make_train_step(experiment.resolve(
      lab_config(forward_rank=hc.d_model, chunk_size=chunk_size), mesh))(copy(state), batch)
  for a, b in zip(jax.tree.leaves(exact), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)


def test_truncated_chunked_step_equals_dense():
  mesh = one_device_mesh()
  dense = lab_config(backward="truncated", backward_rank=3)
  chunked = lab_config(backward="truncated", backward_rank=3, chunk_size=16)
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(dense, mesh))
  batch = random_batch(dense)
  a, ma = train.make_train_step(experiment.resolve(dense, mesh))(copy(state), batch)
  b, mb = train.make_train_step(experiment.resolve(chunked, mesh))(copy(state), batch)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for k in ("bottleneck/backbone_norm", "bottleneck/visible_norm", "bottleneck/destroyed_ratio"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4)
