"""Confident tokens (p_y → 1): the head's loss, G, per-token stats and bottleneck metrics against
float64 numpy, where 1 − p_y and ‖p − e_y‖² are far below float32 ε (issue 11, part 1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from references import RTOL, assert_close, confident, confident_reference, options_reference

from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.core.loss import fused_head_loss
from lmhead_jax.runs import experiment
from lmhead_jax.training import sharding, train


MARGINS = [0, 10, 16, 20, 30]
PATHS = [dict(chunk_size=None), dict(chunk_size=16), dict(chunk_size=16, vocab_block=300)]


def test_problem_spans_the_confident_regime():
  q = [confident_reference(*confident(mg))["one_minus_py"] for mg in MARGINS]
  assert np.min(q[0]) > 0.5 and 1e-9 < np.median(q[3]) < 1e-8
  assert 1e-13 < np.median(q[-1]) < 2e-13  # far below float32 ε ≈ 1.2e-7


@pytest.mark.parametrize("kw", PATHS, ids=["dense", "chunked", "vocab_blocks"])
@pytest.mark.parametrize("margin", MARGINS)
def test_fused_head_loss_per_token_stats_and_gradients(margin, kw):
  h, w, y, m = confident(margin)
  f = lambda h, w: fused_head_loss(h, w, y, m, **kw)
  (_, tok), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w)
  got = dict(loss_N=tok.loss_N, g_sq_N=tok.g_sq_N, correct_N=tok.correct_N, dh=dh, dw=dw)
  assert_close(got, confident_reference(h, w, y, m), got)


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("margin", MARGINS)
def test_linear_head_stats(margin, chunk_size):
  h, w, y, m = confident(margin)
  got = jax.jit(lambda h, w: bottleneck.linear_head_stats(h, w, y, m, chunk_size=chunk_size)
                )(h, w).metrics(prefix="")
  assert len(got) == 6
  assert_close(got, confident_reference(h, w, y, m), got)


def test_logit_grad_and_head_stats():
  """The dense G (autodiff of `cross_entropy`) behind logit_grad and head_stats."""
  h, w, y, m = confident(30)
  want = confident_reference(h, w, y, m)
  _, g = bottleneck.logit_grad(jnp.asarray(h), jnp.asarray(w), y, m)
  np.testing.assert_allclose(g @ w, want["dh"], rtol=RTOL, atol=RTOL * np.abs(want["dh"]).max())
  got = bottleneck.head_stats(lambda x: x @ jnp.asarray(w).T, h, y, m).metrics(prefix="")
  assert_close(got, want, got)


@pytest.mark.parametrize("kind", ["linear", pytest.param("factorized", marks=pytest.mark.slow)])
def test_train_step_on_a_confident_model(kind):
  """A large-margin head whose targets are its own argmax: dense and chunked steps give the
  float64 bottleneck metrics, and the same loss and gradients."""
  cfg = tiny_config(n_layers=1)
  cfg.head.kind, cfg.head.rank = kind, 16
  c, hc = experiment.configs(cfg)
  state, _ = train.init_state(jax.random.key(0), experiment.resolve(cfg, sharding.make_mesh(devices=jax.devices()[:1])))
  params = state.params
  big = "a_VxR" if kind == "factorized" else "w_VxD"
  params["head"][big] = params["head"][big] * 30.0  # logits of RMS ≈ 30
  rng = np.random.default_rng(1)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  inputs = rng.integers(0, c.vocab_size, shape).astype(np.int32)
  h = model.hidden(params, inputs, c)
  hp = heads.params_of(params, hc)
  targets = np.asarray(jnp.argmax(heads.logits(hp, h, hc), -1), np.int32)
  batch = dict(inputs=inputs, targets=targets, mask=(rng.random(shape) > 0.2).astype(np.float32))
  w = functools.reduce(np.matmul, [np.float64(hp[k]) for k in sorted(hp)])  # A B: rank 16
  want = confident_reference(np.reshape(h, (-1, c.d_model)), w, targets.reshape(-1),
                   batch["mask"].reshape(-1))
  assert np.median(want["one_minus_py"]) < 0.05 and 1e-18 < np.min(want["one_minus_py"]) < 1e-12
  results = []
  for chunk in (None, 24):
    cfg.head.chunk_size = chunk
    out, grads = jax.jit(lambda p, b: train.loss_and_grads(p, b, experiment.resolve(cfg)))(params, batch)
    assert_close(out["stats"].metrics(prefix=""), want, out["stats"].metrics(prefix=""))
    results.append(grads)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[0]),
                          jax.tree.leaves(results[1])):
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * np.abs(a).max(),
                               err_msg=jax.tree_util.keystr(path))


CONFIDENT_OPTIONS = {"softcap": dict(softcap=100.0), "z_loss": dict(z_loss=1e-4),
                     "smoothing": dict(label_smoothing=0.1),
                     "all": dict(softcap=100.0, z_loss=1e-4, label_smoothing=0.1)}


@pytest.mark.parametrize("kw", PATHS, ids=["dense", "chunked", "vocab_blocks"])
@pytest.mark.parametrize("opt", CONFIDENT_OPTIONS)
def test_options_on_confident_tokens(opt, kw):
  """Margin 30 (1 − p_y ≈ 1e-9 under the softcap of 100, whose tanh saturates at |z| ≈ 200):
  loss, per-token stats and gradients of every option as float64."""
  h, w, y, m = confident(30)
  opts = CONFIDENT_OPTIONS[opt]
  f = lambda h, w: fused_head_loss(h, w, y, m, **kw, **opts)
  (loss, tok), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w)
  got = dict(loss=loss, loss_N=tok.loss_N, g_sq_N=tok.g_sq_N, lse_N=tok.lse_N, dh=dh, dw=dw)
  want = options_reference(h, w, y, m, **opts)
  assert_close(got, want, got)
  for k in ("loss_N", "g_sq_N"):  # per token: q spans 1e-11 to 1e-5 under the softcap
    np.testing.assert_allclose(got[k][m > 0], want[k][m > 0], rtol=RTOL, err_msg=k)
