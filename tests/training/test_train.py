"""The train step on one device: gradients, bottleneck metrics, accumulation, bad input."""

import jax
import numpy as np
import pytest
from helpers import (copy, one_device_mesh, plain_loss, random_batch, sgd_lr1,
                     tiny_config)

from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.runs import experiment
from lmhead_jax.training import train


@pytest.mark.parametrize("kind", ["linear", pytest.param("tied", marks=pytest.mark.slow),
                                  pytest.param("factorized", marks=pytest.mark.slow)])
def test_step_gradient_equals_jax_grad(kind):
  cfg = sgd_lr1(tiny_config(tie_embeddings=kind == "tied"))
  cfg.head.kind, cfg.head.rank = kind, 8
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  params = copy(state.params)
  batch = random_batch(cfg)
  new_state, _ = train.make_train_step(experiment.resolve(cfg, mesh))(state, batch)
  expected = jax.grad(plain_loss)(params, batch, cfg)
  got = jax.tree.map(lambda a, b: a - b, params, copy(new_state.params))
  for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", ["linear", pytest.param("factorized", marks=pytest.mark.slow)])
def test_step_bottleneck_equals_linear_head_stats(kind):
  cfg = tiny_config()
  cfg.head.kind, cfg.head.rank = kind, 8
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(1), experiment.resolve(cfg, mesh))
  params = copy(state.params)
  batch = random_batch(cfg)
  _, metrics = train.make_train_step(experiment.resolve(cfg, mesh))(state, batch)
  c, hc = experiment.configs(cfg)
  h = model.hidden(params, batch["inputs"], c)
  ref = bottleneck.linear_head_stats(h, heads.matrix(heads.params_of(params, hc)),
                                     batch["targets"], batch["mask"])
  for name, value in ref.metrics().items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics["loss"], ref.loss, rtol=1e-6)
  if kind == "factorized":  # rank-8 head: far more is destroyed than with D=32
    assert metrics["bottleneck/destroyed_ratio"] > np.sqrt(1 - 32 / 256)


@pytest.fixture(scope="module")
def initial():
  """The initial state of tiny_config() on one device, on the host (one compile of init_state);
  `fresh()` puts a copy on the device (a train step donates its input)."""
  cfg, mesh = tiny_config(), one_device_mesh()
  state, shardings = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  host = copy(state)
  return lambda: jax.device_put(host, shardings)


def test_grad_accumulation_equals_big_batch(initial):
  cfg = tiny_config()
  state = initial()
  batch = random_batch(cfg, seed=3)
  results = []
  for k in (1, 4):
    cfg.train.grad_accum = k
    results.append(jax.jit(lambda p, b: train.loss_and_grads(p, b, experiment.resolve(cfg)))(state.params, batch))
  (out1, g1), (out4, g4) = results
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
  np.testing.assert_allclose(out4["loss"], out1["loss"], rtol=1e-6)
  np.testing.assert_allclose(out4["accuracy"], out1["accuracy"], rtol=1e-6)
  for name, value in out1["stats"].metrics().items():
    np.testing.assert_allclose(out4["stats"].metrics()[name], value, rtol=1e-5, err_msg=name)


def test_range_map_once_per_step_not_per_micro_batch(initial):
  cfg = tiny_config()
  cfg.train.grad_accum = 4
  setup = experiment.resolve(cfg)
  batch = random_batch(cfg, seed=3)
  jaxpr = jax.make_jaxpr(lambda p, b: train.loss_and_grads(p, b, setup))(initial().params, batch)
  (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  # range_map (its CPU path's SVD, its TPU path's eigh) sits outside the micro-batch loop
  for kernel in ("svd", "eigh"):
    assert kernel in str(jaxpr) and kernel not in str(scan.params["jaxpr"]), kernel


def test_a_carried_range_map_gives_the_stats_of_a_fresh_one(initial):
  """Metric steps that refine the previous step's map (`refine_range_map`) report the stats of
  steps that compute it afresh, on the same states and batches."""
  cfg = tiny_config()
  setup = experiment.resolve(cfg, one_device_mesh())
  carried, fresh = train.make_train_step(setup, carry_range_map=True), train.make_train_step(setup)
  a, b, range_map = initial(), initial(), None
  for seed in range(3):
    batch = random_batch(cfg, seed=seed)
    a, got, range_map = carried(a, batch, range_map)
    b, want = fresh(b, batch)
    assert float(got["bottleneck/head_rank"]) == cfg.model.d_model
    assert (float(got["bottleneck/range_map_drift"]) > 0) == (seed > 0)  # 0: computed afresh
    for name, value in want.items():
      if name != "bottleneck/range_map_drift":
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)


def test_range_map_carry_refines_only_a_full_rank_head_that_drifts_little():
  cfg = tiny_config()
  cfg.head.kind, cfg.head.rank = "factorized", 8
  carry = train.RangeMapCarry(experiment.resolve(cfg))
  assert carry.start() is None
  carry.update(np.ones((32, 32)))
  for rank, drift, refines in [(8, 0.01, True), (7, 0.01, False), (8, 2.0, False)]:
    carry.observe({"bottleneck/head_rank": rank, "bottleneck/range_map_drift": drift})
    assert (carry.start() is not None) == refines
  carry.observe({"loss": 1.0})  # a step without the stats changes nothing
  assert carry.start() is None
  cfg.head.kind, cfg.head.mixtures = "mos", 2
  with pytest.raises(ValueError, match="carry_range_map needs"):
    train.make_train_step(experiment.resolve(cfg, one_device_mesh()), carry_range_map=True)


def test_bottleneck_off_has_no_extra_outputs(initial):
  cfg = tiny_config()
  mesh = one_device_mesh()
  state = initial()
  batch = random_batch(cfg)
  on = train.make_train_step(experiment.resolve(cfg, mesh), with_bottleneck=True)
  off = train.make_train_step(experiment.resolve(cfg, mesh), with_bottleneck=False)
  hlo_on = on.lower(state, batch).as_text()
  hlo_off = off.lower(state, batch).as_text()
  _, m_off = off(state, batch)
  assert not any(k.startswith("bottleneck/") for k in m_off)
  # The range map of W (LAPACK QR + SVD on CPU) is only in the metric step's program.
  for kernel in ("geqrf", "gesdd"):
    assert kernel in hlo_on and kernel not in hlo_off


def test_nonfinite_is_reported_and_state_kept(initial):
  cfg = tiny_config()
  mesh = one_device_mesh()
  state = initial()
  params = copy(state.params)
  params["final_norm"]["scale"][0] = np.nan
  state = state.replace(params=jax.device_put(params, experiment.resolve(cfg, mesh).state_shardings.params))
  new_state, metrics = train.make_train_step(experiment.resolve(cfg, mesh))(state, random_batch(cfg))
  assert not np.isfinite(metrics["loss"])
  np.testing.assert_array_equal(new_state.params["embed"]["w_VxD"], params["embed"]["w_VxD"])


def test_nonfinite_learning_rate_is_not_applied():
  """Loss and gradient are finite; only the update is not (it used to be applied)."""
  cfg = tiny_config()
  cfg.optimizer.learning_rate = float("nan")
  mesh = one_device_mesh()
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, mesh))
  before = copy(state.params)
  new_state, metrics = train.make_train_step(experiment.resolve(cfg, mesh))(state, random_batch(cfg))
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert [k for k in train.GUARDED if not np.isfinite(metrics[k])] == [
      "learning_rate", "update_norm", "param_norm"]
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_eval_step_matches_plain_loss(initial):
  cfg = tiny_config()
  mesh = one_device_mesh()
  state = initial()
  batch = random_batch(cfg)
  out = train.make_eval_step(experiment.resolve(cfg, mesh))(state.params, batch)
  np.testing.assert_allclose(out["loss"], plain_loss(state.params, batch, cfg), rtol=1e-6)


def test_bad_input_errors_name_values():
  cfg = tiny_config()
  mesh = one_device_mesh()
  cfg.train.batch_size, cfg.train.grad_accum = 10, 4
  with pytest.raises(ValueError, match="batch_size=10 is not divisible by train.grad_accum=4"):
    train.make_train_step(experiment.resolve(cfg, mesh))
  cfg = tiny_config()
  cfg.data.seq_len = 100
  with pytest.raises(ValueError, match="seq_len=100 exceeds model.max_seq_len=64"):
    train.make_train_step(experiment.resolve(cfg, mesh))
  cfg = tiny_config()
  cfg.optimizer.name = "lion"
  with pytest.raises(ValueError, match="'lion'"):
    train.make_train_step(experiment.resolve(cfg, mesh))
  cfg = tiny_config()
  cfg.optimizer.schedule = "step"
  with pytest.raises(ValueError, match="'step'"):
    train.make_train_step(experiment.resolve(cfg, mesh))


@pytest.mark.parametrize("kind", ["linear", pytest.param("tied", marks=pytest.mark.slow),
                                  pytest.param("factorized", marks=pytest.mark.slow)])
def test_chunked_head_equals_dense(kind):
  """head.chunk_size gives the dense step's loss, gradients and bottleneck metrics (7 ∤ N)."""
  cfg = tiny_config(tie_embeddings=kind == "tied")
  cfg.head.kind, cfg.head.rank = kind, 8
  state, _ = train.init_state(jax.random.key(4), experiment.resolve(cfg, one_device_mesh()))
  batch = random_batch(cfg, seed=5)
  results = []
  for chunk in (None, 7):
    cfg.head.chunk_size = chunk
    results.append(jax.jit(lambda p, b: train.loss_and_grads(p, b, experiment.resolve(cfg)))(state.params, batch))
  (dense, g_dense), (chunked, g_chunked) = results
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_dense), jax.tree.leaves(g_chunked)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(),
                               err_msg=jax.tree_util.keystr(path))
  np.testing.assert_allclose(chunked["loss"], dense["loss"], rtol=1e-6)
  np.testing.assert_allclose(chunked["accuracy"], dense["accuracy"], rtol=1e-6)
  for name, value in dense["stats"].metrics().items():
    np.testing.assert_allclose(chunked["stats"].metrics()[name], value, rtol=1e-5, err_msg=name)


def test_linear_head_stats_chunked_equals_dense():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 11, 16)).astype(np.float32)
  w = rng.normal(size=(300, 16)).astype(np.float32) / 4
  y = rng.integers(0, 300, (3, 11)).astype(np.int32)
  m = (rng.random((3, 11)) > 0.25).astype(np.float32)
  dense = bottleneck.linear_head_stats(h, w, y, m)
  chunked = bottleneck.linear_head_stats(h, w, y, m, chunk_size=5)
  for name, value in dense.metrics().items():
    np.testing.assert_allclose(chunked.metrics()[name], value, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(chunked.loss, dense.loss, rtol=1e-6)
