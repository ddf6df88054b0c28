"""Cross-entropy: dense CE/accuracy and the chunked head loss against float64 numpy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import IGNORED, OPTIONS, options_reference, reference_token_losses

from lmhead_jax.core.loss import accuracy, cross_entropy, fused_head_loss, logit_loss


def reference(h, w, y, m):
  """float64 numpy: loss, per-token stats and the gradients dL/dh, dL/dW of the mean CE."""
  h, w, m = (np.asarray(x, np.float64) for x in (h, w, m))
  z = h @ w.T
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  e = np.eye(w.shape[0])[y]
  n = max(m.sum(), 1.0)
  loss_n = -np.log(np.sum(p * e, -1))
  g = (p - e) * m[:, None] / n
  return dict(loss=np.sum(loss_n * m) / n, loss_N=loss_n * m,
              g_sq_N=np.sum((p - e) ** 2, -1) * m,
              correct_N=(z.argmax(-1) == y) * m, dh=g @ w, dw=g.T @ h)


def run(h, w, y, m, **kw):
  """fused_head_loss under jit: loss, stats and gradients w.r.t. h and w."""
  f = lambda h, w, y, m: fused_head_loss(h, w, y, m, **kw)
  (loss, tok), (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(h, w, y, m)
  return dict(loss=loss, loss_N=tok.loss_N, g_sq_N=tok.g_sq_N, correct_N=tok.correct_N,
              dh=dh, dw=dw)


def assert_close(got, want, rtol, names=None):
  """Elementwise to rtol, with an absolute floor of rtol·max|want| (near-zero entries)."""
  for k in names or want:
    a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-30),
                               err_msg=k)


def problem(n=37, v=50, d=8, mask="random", dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)) * 2.0
  w = rng.normal(size=(v, d)) / np.sqrt(d)
  y = rng.integers(0, v, n)
  m = {"random": rng.random(n) > 0.3, "none": np.ones(n, bool), "all": np.zeros(n, bool),
       "one": np.arange(n) == n // 2}[mask]
  return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(y, jnp.int32), jnp.asarray(m)


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_and_accuracy_match_numpy(shape, masked):
  rng = np.random.default_rng(1)
  z = rng.normal(size=shape + (11,)) * 3
  y = rng.integers(0, 11, shape)
  y.reshape(-1)[0] = z.reshape(-1, 11)[0].argmax()  # at least one hit
  m = (rng.random(shape) > 0.4) if masked else np.ones(shape, bool)
  m.reshape(-1)[0] = True
  lse = np.log(np.exp(z).sum(-1))
  want_ce = np.sum((lse - np.take_along_axis(z, y[..., None], -1)[..., 0]) * m) / m.sum()
  want_acc = np.sum((z.argmax(-1) == y) * m) / m.sum()
  args = (jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(m) if masked else None)
  np.testing.assert_allclose(cross_entropy(*args), want_ce, rtol=1e-6)
  np.testing.assert_allclose(accuracy(*args), want_acc, rtol=1e-6)


def test_cross_entropy_fully_masked_is_zero_and_mask_shape_checked():
  z, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
  assert float(cross_entropy(z, y, jnp.zeros(4))) == 0.0
  with pytest.raises(ValueError, match=r"mask shape \(3,\)"):
    cross_entropy(z, y, jnp.ones(3))


@pytest.mark.parametrize("chunk_size,vocab_block,mask", [
    (None, None, "random"),  # dense path
    (8, None, "random"),  # N = 37 is not a multiple of the chunk
    (8, 7, "random"),  # V = 50 is not a multiple of the block
    (5, 50, "none"),  # one block of exactly V
    (64, 16, "random"),  # chunk ≥ N
    (1, None, "random"),
    (4, None, "one"),  # all chunks but one fully masked
])
def test_fused_matches_float64_reference(chunk_size, vocab_block, mask):
  h, w, y, m = problem(mask=mask)
  got = run(h, w, y, m, chunk_size=chunk_size, vocab_block=vocab_block)
  want = reference(h, w, y, m)
  assert_close(got, want, 1e-5)
  assert got["dh"].dtype == jnp.float32 and got["dw"].dtype == jnp.float32


def test_fused_matches_dense_autodiff():
  h, w, y, m = problem(n=45, v=70, seed=3)
  dense = lambda h, w: cross_entropy(h @ w.T, y, m)
  loss, (dh, dw) = jax.value_and_grad(dense, (0, 1))(h, w)
  got = run(h, w, y, m, chunk_size=16, vocab_block=32)
  assert_close(got, dict(loss=loss, dh=dh, dw=dw), 1e-5)
  np.testing.assert_allclose(np.sum(got["correct_N"]) / np.sum(m), accuracy(h @ w.T, y, m),
                             rtol=1e-6)


def test_fully_masked_batch_gives_zeros():
  h, w, y, m = problem(mask="all")
  got = run(h, w, y, m, chunk_size=8, vocab_block=16)
  for k, v in got.items():
    assert not np.any(np.asarray(v)), k


def test_factorized_head_gradients_reach_both_factors():
  rng = np.random.default_rng(4)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((50, 3), (3, 8)))
  h, _, y, m = problem()
  fused = lambda a, b: fused_head_loss(h, a @ b, y, m, chunk_size=8)[0]
  dense = lambda a, b: cross_entropy(h @ (a @ b).T, y, m)
  for got, want in zip(jax.grad(fused, (0, 1))(a, b), jax.grad(dense, (0, 1))(a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_batched_inputs_flatten_to_tokens():
  h, w, y, m = problem(n=24)
  (loss, tok) = fused_head_loss(h.reshape(4, 6, -1), w, y.reshape(4, 6), m.reshape(4, 6),
                                chunk_size=5)
  want = reference(h, w, y, m)
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(tok.loss_N, want["loss_N"], rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs():
  """bf16 h and w: logits accumulate in fp32 from exact bf16 products, so the loss stays within
  fp32 rounding of the float64 value on the same (rounded) inputs. G is rounded to bf16 for
  the two gradient matmuls and dh, dW are returned in bf16: each entry carries ≤ 2⁻⁸ relative
  error from those two roundings, so the gradients are checked to 1e-2 of their norm."""
  h, w, y, m = problem(n=64, v=300, d=32, dtype=jnp.bfloat16, seed=5)
  want = reference(h.astype(jnp.float32), w.astype(jnp.float32), y, m)
  for chunk_size, vocab_block in ((None, None), (16, None), (16, 128)):
    got = run(h, w, y, m, chunk_size=chunk_size, vocab_block=vocab_block)
    assert got["dh"].dtype == jnp.bfloat16 and got["dw"].dtype == jnp.bfloat16
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert_close(got, want, 1e-5, ["loss_N", "g_sq_N", "correct_N"])
    for k in ("dh", "dw"):
      err = np.linalg.norm(np.asarray(got[k], np.float64) - want[k]) / np.linalg.norm(want[k])
      assert err < 1e-2, (chunk_size, vocab_block, k, err)


def test_compute_dtype_bfloat16_on_float32_inputs():
  h, w, y, m = problem(n=64, v=300, d=32, seed=6)
  got = run(h, w, y, m, chunk_size=16, compute_dtype=jnp.bfloat16)
  assert got["dh"].dtype == jnp.float32 and got["dw"].dtype == jnp.float32
  rounded = reference(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), y, m)
  np.testing.assert_allclose(got["loss"], rounded["loss"], rtol=1e-5)
  err = np.linalg.norm(np.asarray(got["dh"], np.float64) - rounded["dh"])
  assert err < 1e-2 * np.linalg.norm(rounded["dh"])


def test_one_scan_and_three_matmuls():
  """The training path is one loop over chunks with the dense path's three matmuls per chunk;
  gradients that are not requested are not computed."""
  h, w, y, _ = problem(n=64, v=50, d=8)
  def compiled(argnums):
    f = jax.grad(lambda h, w, y: fused_head_loss(h, w, y, chunk_size=16)[0], argnums)
    jaxpr = str(jax.make_jaxpr(f)(h, w, y))
    hlo = jax.jit(f).lower(h, w, y).compile().as_text()
    return jaxpr.count("scan["), len(re.findall(r" while\(", hlo)), hlo.count(" dot(")
  assert compiled((0, 1)) == (1, 1, 3)
  assert compiled(0) == (1, 1, 2)
  assert compiled(1) == (1, 1, 2)


def test_temp_memory_does_not_scale_with_n_times_v():
  v, d, chunk = 2048, 16, 64
  w = jnp.zeros((v, d))
  def temp_bytes(n, chunk_size):
    h, y = jnp.zeros((n, d)), jnp.zeros(n, jnp.int32)
    f = jax.grad(lambda h, w, y: fused_head_loss(h, w, y, chunk_size=chunk_size)[0], (0, 1))
    return jax.jit(f).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
  small, large = 1024, 4096
  logits_bytes = large * v * 4
  fused_small, fused_large = temp_bytes(small, chunk), temp_bytes(large, chunk)
  assert temp_bytes(large, None) >= logits_bytes  # the dense path holds N×V logits
  assert fused_large < logits_bytes / 10
  # Growth with N is O(N·D) (padded h, dh), nowhere near the (large − small)·V·4 of logits.
  assert fused_large - fused_small < 4 * (large - small) * d * 4


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=None, vocab_block=8), "vocab_block needs chunk_size"),
    (dict(chunk_size=4, vocab_block=2.5), "vocab_block must be a positive int"),
])
def test_bad_options(kw, match):
  h, w, y, m = problem()
  with pytest.raises(ValueError, match=match):
    fused_head_loss(h, w, y, m, **kw)


def test_bad_shapes():
  h, w, y, m = problem()
  with pytest.raises(ValueError, match=r"w must be a \[V, D\] matrix"):
    fused_head_loss(h, w[None], y, chunk_size=4)
  with pytest.raises(ValueError, match=r"h has shape \(37, 7\) but w has shape \(50, 8\)"):
    fused_head_loss(h[:, :7], w, y, chunk_size=4)
  with pytest.raises(ValueError, match="targets shape"):
    fused_head_loss(h, w, y[:-1], chunk_size=4)
  with pytest.raises(ValueError, match="targets contains id 50"):
    fused_head_loss(h, w, y.at[0].set(50), chunk_size=4)


# Options (issue 23): softcap, z-loss, label smoothing, weights, reductions, against float64.


def test_reference_gradient_is_the_derivative_of_the_reference_loss():
  """The reference's written-out G = central differences of its loss (all options, weights)."""
  rng = np.random.default_rng(7)
  z, y, r = rng.normal(size=(4, 6)) * 3, np.array([0, 5, 2, -100]), rng.random(4)
  opts = OPTIONS["all"]
  total = lambda z: np.sum(r * (y != -100) * reference_token_losses(z, y, **opts)[0])
  step, numeric = 1e-6, np.zeros_like(z)
  for i in np.ndindex(z.shape):
    dz = np.zeros_like(z)
    dz[i] = step
    numeric[i] = (total(z + dz) - total(z - dz)) / (2 * step)
  h, w = z, np.eye(6)  # z = h Wᵀ
  g = options_reference(h, w, y, np.ones(4), r, "sum", **opts)["g"]
  np.testing.assert_allclose(g, numeric, rtol=1e-7, atol=1e-9)


def option_problem(seed=0):
  """problem() with random weights and −100 targets among the masked and unmasked tokens."""
  h, w, y, m = problem(seed=seed)
  y = y.at[np.array(IGNORED)].set(-100)
  weights = jnp.asarray(np.random.default_rng(seed).random(y.shape) * 2, jnp.float32)
  return h, w, y, m, weights


def run_with(h, w, y, m, ct=None, **kw):
  """fused_head_loss under jit: loss, stats and the vjp of cotangent ct (1 when None)."""
  def f(h, w):
    loss, vjp, tok = jax.vjp(lambda h, w: fused_head_loss(h, w, y, m, **kw), h, w, has_aux=True)
    return loss, tok, vjp(jnp.ones_like(loss) if ct is None else ct)
  loss, tok, (dh, dw) = jax.jit(f)(h, w)
  return dict(loss=loss, dh=dh, dw=dw, **{k: getattr(tok, k) for k in
                                          ("loss_N", "g_sq_N", "correct_N", "lse_N", "argmax_N")})


PATH_KW = {"dense": dict(chunk_size=None), "chunked": dict(chunk_size=8),
           "vocab_blocks": dict(chunk_size=8, vocab_block=7)}  # V = 50: padded lanes


@pytest.mark.parametrize("path", PATH_KW)
@pytest.mark.parametrize("opt", OPTIONS)
def test_options_match_float64(opt, path):
  """Each option with weights, a random mask and −100 targets, mean reduction."""
  h, w, y, m, weights = option_problem()
  got = run_with(h, w, y, m, weights=weights, **OPTIONS[opt], **PATH_KW[path])
  want = options_reference(h, w, y, m, weights, **OPTIONS[opt])
  assert_close(got, want, 1e-5, [k for k in got if k != "argmax_N"])
  np.testing.assert_array_equal(got["argmax_N"], want["argmax_N"])


@pytest.mark.parametrize("path", ["dense", "vocab_blocks"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_match_float64(reduction, path):
  """sum, and none with a random per-token cotangent (its backward pass runs the head again)."""
  h, w, y, m, weights = option_problem(seed=1)
  ct = None
  if reduction == "none":
    ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  got = run_with(h, w, y, m, ct, weights=weights, reduction=reduction, **OPTIONS["all"],
                 **PATH_KW[path])
  want = options_reference(h, w, y, m, weights, reduction, **OPTIONS["all"])
  if ct is not None:
    g = want["g"] * np.asarray(ct, np.float64)[:, None]
    want |= dict(dh=g @ np.asarray(w, np.float64), dw=g.T @ np.asarray(h, np.float64))
    assert got["loss"].shape == y.shape and not np.any(np.asarray(got["loss"])[~(want[
        "weights"] > 0)])
  assert_close(got, want, 1e-5, ["loss", "dh", "dw", "loss_N", "g_sq_N", "lse_N"])


def test_logit_loss_options_and_cross_entropy():
  """logit_loss on given logits: loss, G (its vjp) and stats as float64; cross_entropy is its
  plain mean, with batch dimensions."""
  h, w, y, m, weights = option_problem(seed=2)
  z = jnp.matmul(h, w.T, precision="highest")
  want = options_reference(h, w, y, m, weights, **OPTIONS["all"])
  f = lambda z: logit_loss(z, y, m, weights=weights, **OPTIONS["all"])
  (loss, tok), g = jax.jit(jax.value_and_grad(f, has_aux=True))(z)
  got = dict(loss=loss, g=g, g_sq_N=tok.g_sq_N, lse_N=tok.lse_N)
  assert_close(got, want, 1e-5, list(got))
  plain = options_reference(h, w, y, m)
  np.testing.assert_allclose(cross_entropy(z.reshape(1, 37, 50), y.reshape(1, 37),
                                           m.reshape(1, 37)), plain["loss"], rtol=1e-5)


def test_bfloat16_inputs_with_options():
  """bf16 h and w with every option: as test_bfloat16_inputs, the loss and per-token stats are
  float32-accurate for the rounded inputs, dh and dW (bf16) within 1e-2 of their norm."""
  h, w, y, m = problem(n=64, v=300, d=32, dtype=jnp.bfloat16, seed=5)
  weights = jnp.asarray(np.random.default_rng(5).random(64), jnp.float32)
  want = options_reference(h.astype(jnp.float32), w.astype(jnp.float32), y, m, weights,
                           **OPTIONS["all"])
  for chunk_size, vocab_block in ((None, None), (16, None), (16, 128)):
    got = run_with(h, w, y, m, weights=weights, chunk_size=chunk_size, vocab_block=vocab_block,
                   **OPTIONS["all"])
    assert got["dh"].dtype == jnp.bfloat16 and got["dw"].dtype == jnp.bfloat16
    assert_close(got, want, 1e-5, ["loss", "loss_N", "g_sq_N", "lse_N", "correct_N"])
    for k in ("dh", "dw"):
      err = np.linalg.norm(np.asarray(got[k], np.float64) - want[k]) / np.linalg.norm(want[k])
      assert err < 1e-2, (chunk_size, vocab_block, k, err)


@pytest.mark.parametrize("kw,match", [
    (dict(z_loss=-1.0), r"z_loss must be a Python float >= 0, got -1.0"),
    (dict(z_loss=jnp.float32(1e-4)), r"z_loss must be a Python float >= 0, got Array"),
    (dict(softcap=0.0), r"softcap must be None or a Python float > 0, got 0.0"),
    (dict(label_smoothing=1.5), r"label_smoothing must be a Python float in \[0, 1\], got 1.5"),
    (dict(reduction="avg"), r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (dict(weights=np.ones(36)), r"weights shape \(36,\) does not match targets shape \(37,\)"),
])
def test_bad_loss_options(kw, match):
  h, w, y, m = problem()
  for chunk_size in (None, 8):
    with pytest.raises(ValueError, match=match):
      fused_head_loss(h, w, y, m, chunk_size=chunk_size, **kw)
  with pytest.raises(ValueError, match=match):
    logit_loss(h @ w.T, y, m, **kw)
