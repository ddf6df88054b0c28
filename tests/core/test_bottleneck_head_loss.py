"""head_loss / head_fn_loss: the loss and gradients of a plain CE and the stats of
linear_head_stats, from one pass; every option against float64; HF's ignore id −100."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import OPTIONS, assert_close, confident, confident_reference, options_reference
from test_bottleneck import FIELDS, RTOL, assert_stats, batch, head_cases, reference

from lmhead_jax.core import bottleneck, heads
from lmhead_jax.core.loss import cross_entropy, fused_head_loss


PATHS = [None, 16, 7]  # dense; chunks that divide N = 96; chunks that do not


def plain_ce(h, w, y, m):
  """The plain loss a user would write: mean CE of h Wᵀ, differentiated by jax."""
  return cross_entropy(jnp.matmul(h, w.T, precision="highest"), y, m)


def masked_problem(seed=0, v=128, d=16):
  h, w, w64, y = batch(seed, 96, v, d)
  mask = np.random.default_rng(seed).random(96) > 0.3
  return h.reshape(8, 12, d), w, w64, y.reshape(8, 12), mask.reshape(8, 12)


def float64_grads(ref, h, w):
  """dℒ/dh = G W and dℒ/dW = Gᵀ H in float64 from the reference G."""
  g, h = ref["g"], np.asarray(h, np.float64).reshape(len(ref["g"]), -1)
  return g @ np.asarray(w, np.float64), g.T @ h


@pytest.mark.parametrize("chunk_size", PATHS)
def test_loss_grads_and_stats_match_plain_ce_and_float64(chunk_size):
  h, w, _, y, mask = masked_problem()
  f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size)
  (loss, stats), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w)
  assert dh.shape == h.shape and dw.shape == w.shape
  # A plain CE differentiated by jax.
  want_loss, (want_dh, want_dw) = jax.jit(jax.value_and_grad(plain_ce, (0, 1)))(h, w, y, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
  for got, want in ((dh, want_dh), (dw, want_dw)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  # float64 numpy: the loss, both gradients and every stat.
  ref = reference(h, w, y, mask)
  assert_stats(stats, ref)
  for got, want in zip((dh.reshape(96, -1), dw), float64_grads(ref, h, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  # The stats of linear_head_stats on the same batch.
  lin = bottleneck.linear_head_stats(h, w, y, mask)
  assert_stats(stats, {k: getattr(lin, k) for k in FIELDS})


@pytest.mark.parametrize("rank", [None, 4])
def test_eager_and_low_rank(rank):
  h, w, w64, y = batch(1, 40, 64, 12, rank)
  for chunk_size in (None, 8):
    loss, stats = bottleneck.head_loss(h, w, y, chunk_size=chunk_size)
    assert_stats(stats, reference(h, w, y, w_range=w64))
    np.testing.assert_allclose(loss, reference(h, w, y)["loss"], rtol=RTOL)


def test_a_given_range_map_is_used():
  h, w, w64, y = batch(1, 40, 64, 12, 4)
  _, given = bottleneck.head_loss(h, w, y, w_range_map=bottleneck.range_map(w))
  assert_stats(given, reference(h, w, y, w_range=w64))
  _, none_visible = bottleneck.head_loss(h, w, y, w_range_map=jnp.zeros((12, 12)))
  assert float(none_visible.visible_norm) == 0 and float(none_visible.destroyed_ratio) == 1


@pytest.mark.parametrize("case", range(3))
def test_head_fn_loss_for_any_head(case):
  """Linear, tied and factorized heads as head_fn(params, h): gradients reach every parameter
  and h as with a plain CE; stats as float64 with Π onto range(W)."""
  _, logits_of_h, w, w64 = head_cases()[case]
  p, hc = logits_of_h.args[0], logits_of_h.keywords["cfg"]
  head_fn = lambda p, h: heads.logits(p, h, hc)
  h, _, _, y = batch(5, 48, 128, 16)
  mask = np.random.default_rng(5).random(48) > 0.2
  f = lambda p, h: bottleneck.head_fn_loss(head_fn, p, h, y, mask)
  (loss, stats), grads = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(p, h)
  plain = lambda p, h: cross_entropy(head_fn(p, h), y, mask)
  want_loss, want = jax.value_and_grad(plain, (0, 1))(p, h)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  assert_stats(stats, reference(h, w, y, mask, w_range=w64))


def test_head_fn_loss_nonlinear_head_per_token():
  """A head that is not linear in h: Π is taken per token, as in head_stats."""
  h, w, _, y = batch(6, 12, 64, 8)
  head_fn = lambda p, h: jnp.tanh(h) @ p.T
  _, stats = bottleneck.head_fn_loss(head_fn, jnp.asarray(w), h, y, linear_in_h=False)
  want = bottleneck.head_stats(lambda x: head_fn(jnp.asarray(w), x), h, y, linear_in_h=False)
  assert_stats(stats, {k: getattr(want, k) for k in FIELDS})
  # ∂z_t/∂h_t = W diag(1 − tanh²(h_t)) has the range of W: Π is that of the linear head on
  # tanh(h), and the backbone receives G W diag(1 − tanh²).
  ref = reference(np.tanh(h), w, y)
  back = (ref["g"] @ w.astype(np.float64)) * (1 - np.tanh(h.astype(np.float64)) ** 2)
  assert_stats(stats, ref | {"backbone_norm": np.linalg.norm(back)})


@pytest.mark.parametrize("margin", [20, 30])
def test_confident_tokens(margin):
  """1 − p_y far below float32 ε: the stats still match float64 (dense and chunked)."""
  h, w, y, m = confident(margin)
  want = confident_reference(h, w, y, m)
  for chunk_size in (None, 16):
    loss, stats = bottleneck.head_loss(h, w, y, m, chunk_size=chunk_size)
    got = {k: getattr(stats, k) for k in FIELDS if k != "loss"}
    assert_close(got, want, list(got))


def test_bfloat16_params_and_hidden_states():
  """bf16 h and W: gradients come in bf16; the loss and ‖G‖ are float32-accurate for the rounded
  inputs (exact bf16 products, float32 accumulation), G W carries G's rounding to bf16 (≤ 2⁻⁹
  per entry) as the gradient does."""
  h, w, _, y, mask = masked_problem(seed=2)
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  ref = reference(hb.astype(jnp.float32), wb.astype(jnp.float32), y, mask)
  for chunk_size in (None, 16):
    f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size)
    (loss, stats), (dh, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(hb, wb)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    for name in FIELDS:
      rtol = RTOL if name in ("loss", "full_norm") else 2.0**-8
      np.testing.assert_allclose(getattr(stats, name), ref[name], rtol=rtol, err_msg=name)
    want_dh, want_dw = float64_grads(ref, hb.astype(jnp.float32), wb.astype(jnp.float32))
    for got, want in ((dh.reshape(96, -1), want_dh), (dw, want_dw)):
      err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
      assert err < 1e-2, (chunk_size, err)  # G and the gradients are rounded to bf16


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_one_pass(chunk_size):
  """value_and_grad runs the plain CE's three head matmuls (and chunk loop) once, plus one
  N×D by D×D matmul for the stats: no second pass over the logits."""
  h, w, _, y, _ = masked_problem()
  def count(f):
    hlo = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True)).lower(h, w).compile().as_text()
    return hlo.count(" dot("), len(re.findall(r" while\(", hlo))
  plain = lambda h, w: fused_head_loss(h, w, y, chunk_size=chunk_size)
  ours = lambda h, w: bottleneck.head_loss(h, w, y, chunk_size=chunk_size)
  loops = 0 if chunk_size is None else 1
  assert count(plain) == (3, loops)
  assert count(ours) == (4, loops)


def test_stats_are_not_differentiated():
  h, w, _, y, mask = masked_problem()
  for f in (lambda w: bottleneck.head_loss(h, w, y, mask)[1].destroyed_ratio,
            lambda w: bottleneck.head_fn_loss(lambda w, h: h @ w.T, w, h, y, mask)[1].full_norm):
    assert not np.any(np.asarray(jax.grad(f)(jnp.asarray(w))))


IGNORED = [0, 5, 6, 30, 95]  # flat positions whose target is −100


def ignored_problem():
  h, w, _, y, mask = masked_problem(seed=3)
  y = y.reshape(-1).copy()
  y[IGNORED] = -100
  return h, w, y.reshape(8, 12), mask


@pytest.mark.parametrize("jit", [False, True])
def test_ignore_index_is_masked(jit):
  """HF's ignore_index: −100 targets count as masked in eager calls and under jit alike."""
  h, w, y, mask = ignored_problem()
  keep = np.ones(96, bool)
  keep[IGNORED] = False
  both = mask & keep.reshape(8, 12)
  ref = reference(h[both], w, y[both])  # the ignored tokens simply absent
  wrap = jax.jit if jit else (lambda f: f)
  for chunk_size in (None, 16):
    f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size)
    (_, stats), (dh, _) = wrap(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w)
    assert_stats(stats, ref)
    assert not np.any(np.asarray(dh)[~both])
    lin = functools.partial(bottleneck.linear_head_stats, chunk_size=chunk_size)
    assert_stats(wrap(lin)(h, w, y, mask), ref)
  lin_fn = lambda x: x @ jnp.asarray(w).T
  assert_stats(wrap(bottleneck.head_stats, static_argnums=0)(lin_fn, h, y, mask)
               if jit else bottleneck.head_stats(lin_fn, h, y, mask), ref)
  np.testing.assert_allclose(wrap(plain_ce)(h, w, y, mask), ref["loss"], rtol=RTOL)


def test_other_negative_targets_are_errors():
  """Only −100 is ignored: another negative id raises eagerly and makes the loss NaN under jit
  (as checks.py and the README say)."""
  h, w, y, mask = ignored_problem()
  y = np.where(np.arange(96).reshape(8, 12) == 7, -1, y)
  with pytest.raises(ValueError, match=r"id -1 outside \[0, 128\) and not the ignore id -100"):
    bottleneck.head_loss(h, w, y, mask)
  with pytest.raises(ValueError, match=r"id -1 outside \[0, 128\)"):
    bottleneck.head_fn_loss(lambda w, h: h @ w.T, w, h, y, mask)
  with pytest.raises(ValueError, match=r"id 128 outside \[0, 128\)"):
    bottleneck.head_loss(h, w, np.where(y == -1, 128, y), mask)
  loss, stats = jax.jit(bottleneck.head_loss)(h, w, y, mask)
  assert np.isnan(loss) and np.isfinite(stats.full_norm)


def test_bad_input():
  h, w, _, y, mask = masked_problem()
  with pytest.raises(ValueError, match=r"\[V, D\] matrix, got shape \(128,\)"):
    bottleneck.head_loss(h, w[:, 0], y)
  with pytest.raises(ValueError, match=r"D=15 but h has shape \(8, 12, 16\)"):
    bottleneck.head_loss(h, w[:, :15], y)
  with pytest.raises(ValueError, match=r"targets shape \(8, 11\) does not match"):
    bottleneck.head_loss(h, w, y[:, :11])
  with pytest.raises(ValueError, match=r"mask shape \(96,\) does not match targets shape"):
    bottleneck.head_loss(h, w, y, mask.reshape(-1))
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    bottleneck.head_loss(h, w, y, chunk_size=0)


def option_batch(seed=3):
  """ignored_problem() (mask, −100 targets) with random per-token weights in [0, 2)."""
  h, w, y, mask = ignored_problem()
  weights = np.random.default_rng(seed).random(y.shape).astype(np.float32) * 2
  return h, w, y, mask, weights


def option_stats(ref, w):
  """The stats of the float64 G of options_reference; the per-token ratio averaged
  with the token weights m·w."""
  g, w = ref["g"], np.asarray(w, np.float64)
  gp = g @ (w @ np.linalg.pinv(w))
  full, vis = np.linalg.norm(g), np.linalg.norm(gp)
  tw = ref["weights"]
  per_token = np.linalg.norm(g - gp, axis=1) / np.where(tw > 0, np.linalg.norm(g, axis=1), 1.0)
  m = ref["g_sq_N"] > 0
  return dict(loss=ref["loss"], full_norm=full, backbone_norm=np.linalg.norm(g @ w),
              visible_norm=vis, destroyed_ratio=np.linalg.norm(g - gp) / full,
              visible_cosine=vis / full, token_destroyed_ratio=np.sum(per_token * tw) / tw.sum(),
              accuracy=np.sum(ref["correct_N"]) / m.sum())


def assert_option_stats(stats, want, names=FIELDS, rtol=1e-5):
  for k in names:
    np.testing.assert_allclose(getattr(stats, k), want[k], rtol=rtol, atol=1e-7, err_msg=k)


def value_grads(f, h, w, ct):
  """jit(vjp) of f(h, w) -> (loss, stats) with cotangent ct (1 when None)."""
  def run(h, w):
    loss, vjp, stats = jax.vjp(f, h, w, has_aux=True)
    return loss, stats, vjp(jnp.ones_like(loss) if ct is None else ct)
  return jax.jit(run)(h, w)


def float64_grads_of(ref, h, w, ct=None):
  g = ref["g"] if ct is None else ref["g"] * np.asarray(ct, np.float64).reshape(-1, 1)
  return g @ np.asarray(w, np.float64), g.T @ np.asarray(h, np.float64).reshape(len(g), -1)


def assert_grads_close(got, want):
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a).reshape(b.shape), b, rtol=1e-5,
                               atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("opt", OPTIONS)
def test_head_loss_options_match_float64(opt, chunk_size):
  """Each option with weights, a mask and −100 targets: loss, dℒ/dh, dℒ/dW and every stat,
  G being the gradient of the whole objective with respect to the raw logits."""
  h, w, y, mask, weights = option_batch()
  opts = OPTIONS[opt]
  f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size, weights=weights,
                                        **opts)
  loss, stats, grads = value_grads(f, h, w, None)
  ref = options_reference(h, w, y, mask, weights, **opts)
  assert_option_stats(stats, option_stats(ref, w))
  assert_grads_close(grads, float64_grads_of(ref, h, w))
  assert loss == stats.loss and stats.lse is stats.argmax is stats.accuracy is None


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_head_loss_reductions(reduction, chunk_size):
  """sum; none: per-token losses in the targets' shape (0 where masked), differentiated with a
  random per-token cotangent, its stats those of the sum of the per-token losses."""
  h, w, y, mask, weights = option_batch()
  opts = OPTIONS["all"]
  ct = None
  if reduction == "none":
    ct = jnp.asarray(np.random.default_rng(4).normal(size=y.shape), jnp.float32)
  f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size, weights=weights,
                                        reduction=reduction, **opts)
  loss, stats, grads = value_grads(f, h, w, ct)
  ref = options_reference(h, w, y, mask, weights, reduction, **opts)
  np.testing.assert_allclose(np.asarray(loss).reshape(-1), ref["loss"], rtol=1e-5, atol=1e-7)
  assert loss.shape == (() if reduction == "sum" else y.shape)
  assert_option_stats(stats, option_stats(ref, w), [k for k in FIELDS if k != "loss"])
  assert_grads_close(grads, float64_grads_of(ref, h, w, ct))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_head_fn_loss_options(reduction):
  """A factorized head W = A B through head_fn, every option: dℒ/dA = dℒ/dW Bᵀ, dℒ/dB =
  Aᵀ dℒ/dW and dℒ/dh in float64, stats with Π onto range(A B)."""
  h, w, y, mask, weights = option_batch()
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(128, 4)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
  head_fn = lambda p, h: (h @ p["b"].T) @ p["a"].T
  opts = OPTIONS["all"]
  ct = None if reduction == "mean" else jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  f = lambda p, h: bottleneck.head_fn_loss(head_fn, p, h, y, mask, weights=weights,
                                           reduction=reduction, return_lse=True, **opts)
  loss, stats, (dp, dh) = value_grads(f, {"a": a, "b": b}, h, ct)
  w64 = a.astype(np.float64) @ b.astype(np.float64)
  ref = options_reference(h, w64, y, mask, weights, reduction, **opts)
  np.testing.assert_allclose(np.asarray(loss).reshape(-1), ref["loss"], rtol=1e-5, atol=1e-7)
  want_dh, want_dw = float64_grads_of(ref, h, w64, ct)
  assert_grads_close((dh, dp["a"], dp["b"]), (want_dh, want_dw @ b.T, a.T @ want_dw))
  assert_option_stats(stats, option_stats(ref, w64), [k for k in FIELDS if k != "loss"] +
                      ["accuracy"])
  np.testing.assert_allclose(stats.lse, ref["lse_N"].reshape(y.shape), rtol=1e-5)
  np.testing.assert_array_equal(stats.argmax, ref["argmax_N"].reshape(y.shape))


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_return_lse_and_accuracy(chunk_size):
  """Per-token lse (of the capped logits) and argmax in the targets' shape, and the accuracy
  over valid tokens, from the loss's own pass; metrics() is unchanged."""
  h, w, y, mask, _ = option_batch()
  z = np.asarray(h, np.float64).reshape(96, -1) @ np.asarray(w, np.float64).T
  y = np.where((np.arange(96) % 3 == 0) & (y.reshape(-1) != -100), z.argmax(-1),
               y.reshape(-1)).reshape(y.shape)  # a third of the tokens right
  opts = dict(softcap=3.0)
  _, stats = jax.jit(lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size,
                                                       return_lse=True, **opts))(h, w)
  ref = options_reference(h, w, y, mask, **opts)
  assert stats.lse.shape == stats.argmax.shape == y.shape
  np.testing.assert_allclose(stats.lse, ref["lse_N"].reshape(y.shape), rtol=1e-6)
  np.testing.assert_array_equal(stats.argmax, ref["argmax_N"].reshape(y.shape))
  np.testing.assert_allclose(stats.accuracy, option_stats(ref, w)["accuracy"], rtol=1e-6)
  assert 0 < stats.accuracy < 1
  assert set(stats.metrics()) == {"bottleneck/" + k for k in FIELDS if k != "loss"}


def test_head_loss_bfloat16_with_options():
  """bf16 h and W, every option, dense and chunked: as test_bfloat16_params_and_hidden_states."""
  h, w, y, mask, weights = option_batch()
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  opts = OPTIONS["all"]
  h32, w32 = hb.astype(jnp.float32), wb.astype(jnp.float32)
  ref = options_reference(h32, w32, y, mask, weights, **opts)
  want = option_stats(ref, w32)
  for chunk_size in (None, 16):
    f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size, weights=weights,
                                          **opts)
    _, stats, (dh, dw) = value_grads(f, hb, wb, None)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    assert_option_stats(stats, want, ("loss", "full_norm"))
    assert_option_stats(stats, want, FIELDS, rtol=2.0**-8)
    for got, want_g in zip((dh, dw), float64_grads_of(ref, h32, w32)):
      got = np.asarray(got, np.float64).reshape(want_g.shape)
      assert np.linalg.norm(got - want_g) < 1e-2 * np.linalg.norm(want_g), chunk_size


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_one_pass_with_options(chunk_size):
  """Every option: still the plain CE's three head matmuls and one loop, plus the stats' one."""
  h, w, y, mask, weights = option_batch()
  f = lambda h, w: bottleneck.head_loss(h, w, y, mask, chunk_size=chunk_size, weights=weights,
                                        **OPTIONS["all"])
  hlo = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True)).lower(h, w).compile().as_text()
  assert (hlo.count(" dot("), len(re.findall(r" while\(", hlo))) == (4, 0 if chunk_size is None
                                                                     else 1)


def test_bad_options():
  h, w, y, mask, _ = option_batch()
  with pytest.raises(ValueError, match=r"softcap must be None or a Python float > 0, got -1"):
    bottleneck.head_loss(h, w, y, softcap=-1)
  with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'"):
    bottleneck.head_fn_loss(lambda w, h: h @ w.T, w, h, y, reduction="batchmean")
  with pytest.raises(ValueError, match=r"weights shape \(96,\) does not match targets shape "
                                       r"\(8, 12\)"):
    bottleneck.head_loss(h, w, y, weights=np.ones(96))
