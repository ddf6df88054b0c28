"""bottleneck.py against float64 numpy: G, the head vjp, every stat, the rank rule, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.core import bottleneck, heads
from lmhead_jax.core.config import HeadConfig
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.core.params import materialize

EPS = float(np.finfo(np.float32).eps)
FIELDS = ("loss", "full_norm", "backbone_norm", "visible_norm", "destroyed_ratio",
          "visible_cosine", "token_destroyed_ratio")
# float32 stats of float32 inputs, relative: 16ε (measured ≤ 2e-7 at these sizes).
RTOL = 16 * EPS


def reference(h, w, targets, mask=None, w_range=None):
  """Every stat in float64 with an explicit V×V projector Π = W_r W_r⁺ (W_r defaults to w)."""
  w = np.asarray(w, np.float64)
  v, d = w.shape
  h = np.asarray(h, np.float64).reshape(-1, d)
  t = np.asarray(targets).reshape(-1)
  m = np.ones(len(t)) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  n = max(m.sum(), 1.0)
  z = h @ w.T
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  g = (np.exp(logp) - np.eye(v)[t]) * m[:, None] / n
  w_r = w if w_range is None else np.asarray(w_range, np.float64)
  gp = g @ (w_r @ np.linalg.pinv(w_r))
  full, vis = np.linalg.norm(g), np.linalg.norm(gp)
  g_t = np.linalg.norm(g, axis=1)
  per_token = np.linalg.norm(g - gp, axis=1) / np.where(m > 0, g_t, 1.0)
  return dict(g=g, loss=-(logp[np.arange(len(t)), t] * m).sum() / n, full_norm=full,
              backbone_norm=np.linalg.norm(g @ w), visible_norm=vis,
              destroyed_ratio=np.linalg.norm(g - gp) / full, visible_cosine=vis / full,
              token_destroyed_ratio=(per_token * m).sum() / n)


def assert_stats(stats, ref, rtol=RTOL):
  for name in FIELDS:
    np.testing.assert_allclose(getattr(stats, name), ref[name], rtol=rtol, err_msg=name)


def batch(seed, n, v, d, rank=None):
  """h with unit-RMS rows, W = A B (rank r, float32 product) or N(0, 1/D), uniform targets."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  if rank is None:
    w64 = rng.normal(size=(v, d)) / np.sqrt(d)
    w = w64.astype(np.float32)
  else:
    a = (rng.normal(size=(v, rank)) / np.sqrt(rank)).astype(np.float32)
    b = (rng.normal(size=(rank, d)) / np.sqrt(d)).astype(np.float32)
    w = np.asarray(jnp.matmul(a, b, precision="highest"))
    w64 = a.astype(np.float64) @ b.astype(np.float64)  # exactly rank r
  return h, w, w64, rng.integers(0, v, n).astype(np.int32)


def kept(w):
  """How many directions range_map keeps (its nonzero columns)."""
  return int(np.sum(np.any(np.asarray(bottleneck.range_map(w)) != 0, axis=0)))


@pytest.mark.parametrize("v,d,rank", [(256, 32, None), (256, 32, 8), (24, 32, None),
                                      (24, 32, 8), (64, 8, 1)])
def test_linear_head_stats_match_float64(v, d, rank):
  h, w, w64, t = batch(0, 96, v, d, rank)
  stats = bottleneck.linear_head_stats(h, w, t)
  ref = reference(h, w, t, w_range=w64)
  if min(v, d) == v and rank is None:  # D ≥ V, full rank: Π = I, nothing is destroyed
    assert ref["destroyed_ratio"] < 1e-6
    # destroyed = √(1 − cos²) in float32: absolute error √(few ε).
    np.testing.assert_allclose(stats.destroyed_ratio**2, 0.0, atol=4 * EPS)
    np.testing.assert_allclose(stats.token_destroyed_ratio**2, 0.0, atol=4 * EPS)
    for name in ("loss", "full_norm", "backbone_norm", "visible_norm", "visible_cosine"):
      np.testing.assert_allclose(getattr(stats, name), ref[name], rtol=RTOL, err_msg=name)
  else:
    assert_stats(stats, ref)
  assert kept(w) == (rank or min(v, d))


def test_duplicated_columns():
  """Exactly rank-deficient in float32: columns copied and halved (both exact)."""
  h, w, _, t = batch(1, 64, 128, 16)
  w[:, 8:12] = w[:, :4]
  w[:, 12:] = 0.5 * w[:, 4:8]
  assert kept(w) == 8
  assert_stats(bottleneck.linear_head_stats(h, w, t), reference(h, w, t))


def test_masked_and_batched():
  rng = np.random.default_rng(2)
  h, w, _, t = batch(2, 2 * 5 * 3, 128, 16)
  h, t = h.reshape(2, 5, 3, 16), t.reshape(2, 5, 3)
  mask = rng.random((2, 5, 3)) > 0.4
  stats = bottleneck.linear_head_stats(h, w, t, mask)
  assert_stats(stats, reference(h, w, t, mask))
  # Independent check: masked tokens are exactly as if absent; 0/1 ints work like bools.
  alone = bottleneck.linear_head_stats(h[mask], w, t[mask])
  assert_stats(stats, {k: getattr(alone, k) for k in FIELDS})
  ints = bottleneck.linear_head_stats(h, w, t, mask.astype(np.int32))
  assert_stats(ints, {k: getattr(stats, k) for k in FIELDS}, rtol=1e-7)


def test_g_is_the_logit_gradient():
  """G = (p − e_y)·m/N (numpy) = jax.grad of an independently written mean CE."""
  rng = np.random.default_rng(3)
  h, w, _, t = batch(3, 40, 64, 8)
  mask = rng.random(40) > 0.3
  _, g = bottleneck.logit_grad(jnp.asarray(h), jnp.asarray(w), jnp.asarray(t),
                               jnp.asarray(mask, jnp.float32))
  ce = lambda z: -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(40), t] * mask) / mask.sum()
  z = jnp.matmul(h, w.T, precision="highest")
  g_ref = reference(h, w, t, mask)["g"]
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max())
  np.testing.assert_allclose(g, jax.grad(ce)(z), rtol=1e-5, atol=1e-7)


def head_cases(seed=4, v=128, d=16, r=4):
  """(name, head_fn, W[V, D], W in float64) for linear, tied (in a model tree), factorized heads."""
  out = []
  for kind in ("linear", "tied", "factorized"):
    hc = HeadConfig(vocab_size=v, d_model=d, kind=kind, rank=r if kind == "factorized" else None)
    key = jax.random.key(seed)
    p = ({"w_VxD": jax.random.normal(key, (v, d)) / np.sqrt(d)} if kind == "tied"
         else materialize(key, heads.specs(hc)))
    tree = {"embed": p} if kind == "tied" else {"head": p}
    p = heads.params_of(tree, hc)
    w64 = (np.asarray(p["a_VxR"], np.float64) @ np.asarray(p["b_RxD"], np.float64)
           if kind == "factorized" else np.asarray(p["w_VxD"], np.float64))
    out.append((kind, functools.partial(heads.logits, p, cfg=hc), heads.matrix(p), w64))
  return out


@pytest.mark.parametrize("case", range(3))
def test_head_stats_agree_with_linear_and_grad(case):
  kind, head_fn, w, w64 = head_cases()[case]
  h, _, _, t = batch(5, 48, 128, 16)
  mask = np.random.default_rng(5).random(48) > 0.2
  stats = bottleneck.head_stats(head_fn, h, t, mask)
  lin = bottleneck.linear_head_stats(h, w, t, mask)
  assert_stats(stats, {k: getattr(lin, k) for k in FIELDS})
  assert_stats(stats, reference(h, w, t, mask, w_range=w64))
  # The head vjp is ∂ℒ/∂h: its norm is the backbone norm.
  dh = jax.grad(lambda x: cross_entropy(head_fn(x), jnp.asarray(t), mask))(jnp.asarray(h))
  np.testing.assert_allclose(stats.backbone_norm, np.linalg.norm(dh), rtol=RTOL)
  if kind == "factorized":
    assert kept(w) == 4


def test_head_stats_per_token_path():
  _, head_fn, w, _ = head_cases()[0]
  h, _, _, t = batch(6, 12, 128, 16)
  per_token = bottleneck.head_stats(head_fn, h.reshape(3, 4, 16), t.reshape(3, 4),
                                    linear_in_h=False)
  assert_stats(per_token, reference(h, w, t))


def test_jit_agrees():
  h, w, _, t = batch(7, 32, 128, 16, rank=6)
  mask = np.arange(32) % 5 != 0
  head_fn = lambda x: x @ jnp.asarray(w).T
  for fn, args in ((bottleneck.linear_head_stats, (h, w, t, mask)),
                   (functools.partial(bottleneck.head_stats, head_fn), (h, t, mask))):
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    assert_stats(jitted, {k: getattr(eager, k) for k in FIELDS})


@pytest.mark.parametrize("rank", [None, 5])
def test_destroyed_and_cosine_are_complementary(rank):
  h, w, _, t = batch(8, 64, 96, 12, rank)
  s = bottleneck.linear_head_stats(h, w, t)
  np.testing.assert_allclose(s.destroyed_ratio**2 + s.visible_cosine**2, 1.0, atol=4 * EPS)
  np.testing.assert_allclose(s.visible_norm / s.full_norm, s.visible_cosine, rtol=RTOL)


@pytest.mark.parametrize("v,d,rank", [(512, 32, None), (512, 32, 8), (256, 64, None)])
def test_isotropic_g(v, d, rank):
  """For Gaussian G, ‖GΠ‖²/‖G‖² ~ Beta(N r/2, N (V−r)/2), r = rank W: mean r/V, sd known."""
  n = 256
  _, w, _, _ = batch(9, 1, v, d, rank)
  r = rank or d
  g = jax.random.normal(jax.random.key(9), (n, v))
  b = jnp.matmul(g, w, precision="highest")
  vis = bottleneck.visible_sq(b, bottleneck.range_map(w))
  s = bottleneck.summarize(jnp.float32(0), jnp.sum(g * g, -1), b, vis, jnp.ones(n))
  f = r / v
  sd = np.sqrt(f * (1 - f) * 2 / (n * v + 2))
  assert abs(float(s.destroyed_ratio) ** 2 - (1 - f)) < 5 * sd, (s.destroyed_ratio, sd)


@pytest.mark.parametrize("v,d,r", [(4096, 64, 16), (512, 256, 128), (65536, 2, 1),
                                   (128, 96, 48)])
def test_round_off_directions_are_dropped(v, d, r):
  """W = A·B in float32 has spurious σ ~ σ_max·ε; only the r true directions are kept."""
  _, w, w64, _ = batch(10, 1, v, d, r)
  s64 = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  assert s64[r] > 0.05 * s64[0] * EPS  # the float32 product really is numerically full rank
  assert kept(w) == r
  g = np.random.default_rng(10).normal(size=(4, v))
  vis = bottleneck.visible_sq(jnp.asarray(g @ w, jnp.float32), bottleneck.range_map(w))
  u = np.linalg.svd(w64, full_matrices=False)[0][:, :r]
  # Errors scale with the typical ‖gΠ‖² = ‖g‖² r/V = r, not with an unluckily small draw.
  np.testing.assert_allclose(vis, np.sum((g @ u) ** 2, -1), rtol=RTOL, atol=RTOL * r)


def test_ill_conditioned_full_rank_is_kept():
  """κ(W) = 1e3 at V = 16384: numpy's max(V, D)·ε rule (2e-3·σ_max) would drop 3 directions."""
  v, d, kappa = 16384, 32, 1e3
  rng = np.random.default_rng(11)
  u = np.linalg.qr(rng.normal(size=(v, d)))[0]
  vt = np.linalg.qr(rng.normal(size=(d, d)))[0]
  w = ((u * np.logspace(0, -np.log10(kappa), d)) @ vt).astype(np.float32)
  assert kept(w) == d
  g = rng.normal(size=(8, v))
  vis = bottleneck.visible_sq(jnp.asarray(g @ w.astype(np.float64), jnp.float32),
                              bottleneck.range_map(w))
  ref = np.sum((g @ np.linalg.svd(w.astype(np.float64), full_matrices=False)[0]) ** 2, -1)
  # ‖gΠ‖ is read off b = gW through S⁻¹: b's float32 round-off grows by up to κ (measured: 65ε).
  np.testing.assert_allclose(vis, ref, rtol=kappa * EPS)


def test_no_vxv_intermediate():
  """The traced computation never holds a V×V array (V = 512 ≫ N = 64, D = 16)."""
  h, w, _, t = batch(12, 64, 512, 16)
  jaxpr = jax.make_jaxpr(bottleneck.linear_head_stats)(h, w, t)
  shapes = [var.aval.shape for eqn in jaxpr.eqns for var in eqn.outvars]
  assert (64, 512) in shapes  # the N×V logits are there
  assert not [s for s in shapes if s.count(512) > 1]


def test_bad_input():
  h, w, _, t = batch(13, 6, 32, 8)
  with pytest.raises(ValueError, match=r"targets shape \(5,\) does not match h shape \(6, 8\)"):
    bottleneck.linear_head_stats(h, w, t[:5])
  with pytest.raises(ValueError, match=r"D=7 but h has shape \(6, 8\)"):
    bottleneck.linear_head_stats(h, w[:, :7], t)
  with pytest.raises(ValueError, match="integer dtype, got float32"):
    bottleneck.linear_head_stats(h, w, t.astype(np.float32))
  for bad in (32, -1):
    with pytest.raises(ValueError, match=rf"id {bad} outside \[0, 32\)"):
      bottleneck.linear_head_stats(h, w, np.where(np.arange(6) == 2, bad, t))
    with pytest.raises(ValueError, match=rf"id {bad} outside \[0, 32\)"):
      bottleneck.head_stats(lambda x: x @ jnp.asarray(w).T, h, np.where(t == t[0], bad, t))
  with pytest.raises(ValueError, match=r"mask shape \(6, 1\) does not match targets shape"):
    bottleneck.linear_head_stats(h, w, t, np.ones((6, 1)))
  with pytest.raises(ValueError, match=r"\[V, D\] matrix, got shape \(32,\)"):
    bottleneck.linear_head_stats(h, w[:, 0], t)


def test_out_of_range_under_jit_is_nan_as_documented():
  h, w, _, t = batch(14, 6, 32, 8)
  stats = jax.jit(bottleneck.linear_head_stats)(h, w, np.where(np.arange(6) == 0, 32, t))
  assert np.isnan(stats.loss) and np.isfinite(stats.full_norm)


def test_metrics_dict():
  h, w, _, t = batch(15, 6, 32, 8)
  s = bottleneck.linear_head_stats(h, w, t)
  m = s.metrics()
  assert set(m) == {"bottleneck/" + k for k in FIELDS if k != "loss"}
  assert m["bottleneck/destroyed_ratio"] == s.destroyed_ratio
