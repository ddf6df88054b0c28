"""heads.py: effective matrices, float32 logits against float64, the init scale claim, bad config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.core import heads, model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.core.params import materialize

EPS = float(np.finfo(np.float32).eps)


def f64(x):
  return np.asarray(x, np.float64)


def cfg(kind, v=96, d=24, r=6):
  return HeadConfig(vocab_size=v, d_model=d, kind=kind, rank=r if kind == "factorized" else None)


def init_head(key, c):
  """The head's parameters as model.init draws them."""
  return materialize(key, heads.specs(c))


def unit_rms(key, n, d):
  h = jax.random.normal(key, (n, d))
  return h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True))


def test_specs_and_params_of():
  assert heads.specs(cfg("tied")) == {} and init_head(jax.random.key(0), cfg("tied")) == {}
  p = init_head(jax.random.key(0), cfg("factorized"))
  assert p["a_VxR"].shape == (96, 6) and p["b_RxD"].shape == (6, 24)
  assert heads.specs(cfg("linear"))["w_VxD"].axes == ("vocab", "embed")
  tree = {"embed": {"w_VxD": jnp.ones((96, 24))}, "head": p}
  assert heads.params_of(tree, cfg("tied"))["w_VxD"] is tree["embed"]["w_VxD"]
  assert heads.params_of(tree, cfg("factorized")) is p


def test_matrix_is_the_product():
  """Each entry of float32 A·B is within the dot-product error bound r·ε·(|A||B|) of A·B."""
  p = init_head(jax.random.key(1), cfg("factorized"))
  a, b = f64(p["a_VxR"]), f64(p["b_RxD"])
  w = heads.matrix(p)
  assert w.dtype == jnp.float32 and w.shape == (96, 24)
  assert np.all(np.abs(f64(w) - a @ b) <= 6 * EPS * (np.abs(a) @ np.abs(b)))
  lin = init_head(jax.random.key(1), cfg("linear"))
  np.testing.assert_array_equal(heads.matrix(lin), lin["w_VxD"])


@pytest.mark.parametrize("kind", ["linear", "tied", "factorized"])
def test_logits_match_float64(kind):
  c = cfg(kind)
  p = ({"w_VxD": jax.random.normal(jax.random.key(2), (96, 24))} if kind == "tied"
       else init_head(jax.random.key(2), c))
  h = unit_rms(jax.random.key(3), 10, 24).reshape(2, 5, 24)
  z = heads.logits(p, h, c)
  assert z.dtype == jnp.float32 and z.shape == (2, 5, 96)
  hh = np.abs(f64(h))
  if kind == "factorized":
    a, b = f64(p["a_VxR"]), f64(p["b_RxD"])
    ref, bound = f64(h) @ (a @ b).T, (6 + 24 + 1) * EPS * ((hh @ np.abs(b).T) @ np.abs(a).T)
  else:
    w = f64(p["w_VxD"])
    ref, bound = f64(h) @ w.T, 24 * EPS * (hh @ np.abs(w).T)
  assert np.all(np.abs(f64(z) - ref) <= bound)
  np.testing.assert_allclose(z, f64(h) @ f64(heads.matrix(p)).T, rtol=1e-5, atol=1e-5)


def test_bfloat16_h_gives_float32_logits_of_the_rounded_inputs():
  c = cfg("linear")
  p = init_head(jax.random.key(4), c)
  h = unit_rms(jax.random.key(5), 8, 24).astype(jnp.bfloat16)
  z = heads.logits(p, h, c)
  assert z.dtype == jnp.float32
  w16 = f64(p["w_VxD"].astype(jnp.bfloat16))
  # bf16 × bf16 products are exact in float32; only the float32 accumulation rounds.
  assert np.all(np.abs(f64(z) - f64(h) @ w16.T) <= 24 * EPS * (np.abs(f64(h)) @ np.abs(w16).T))


def init_scale(kind, d, r=None, v=512, n=128):
  """Mean over seeds of mean(z²) for unit-RMS h, and its analytic standard error."""
  seeds = 8 if r is None else 32  # B's draw makes factorized heads noisier
  h = unit_rms(jax.random.key(6), n, d)
  if kind == "tied":
    mc = ModelConfig(vocab_size=v, d_model=d, n_layers=1, n_heads=1, tie_embeddings=True)
    c = HeadConfig.of({}, mc)
    draw = lambda k: heads.params_of(model.init(k, mc, c), c)
  else:
    c = HeadConfig(vocab_size=v, d_model=d, kind=kind, rank=r)
    draw = lambda k: init_head(k, c)
  ms = [float(jnp.mean(jnp.square(heads.logits(draw(k), h, c))))
        for k in jax.random.split(jax.random.key(7), seeds)]
  # S = HᵀH. Linear: Var mean(z²) = 2 tr(S²)/(D² N² V). Factorized: B's draw adds
  # Var q = 2 tr(S²)/(D² N² r) to q = mean_t ‖B h_t‖²/r, and A's draw at most 2 E[q²]/V.
  s = f64(h).T @ f64(h)
  t = 2 * np.trace(s @ s) / (d * d * n * n)
  var = t / v if r is None else t / r + 2 * (1 + t / r) / v
  return np.mean(ms), np.sqrt(var / seeds)


@pytest.mark.parametrize("kind,d,r", [("linear", 16, None), ("linear", 256, None),
                                      ("tied", 16, None), ("tied", 128, None),
                                      ("factorized", 16, 1), ("factorized", 64, 4),
                                      ("factorized", 256, 32), ("factorized", 64, 64)])
def test_initial_logit_scale_is_one(kind, d, r):
  """The docstring's claim: E z² = 1 for unit-RMS h, whatever D and r (5 standard errors)."""
  m, se = init_scale(kind, d, r)
  assert abs(m - 1.0) < 5 * se, (m, se)
  assert se < 0.1  # so that the test separates 1 from r/D or D


def test_logits_bad_width():
  with pytest.raises(ValueError, match="h has D=8 but the head expects d_model=24"):
    heads.logits(init_head(jax.random.key(0), cfg("linear")), jnp.ones((3, 8)), cfg("linear"))


@pytest.mark.parametrize("rank", [0, -2, 25, None])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match=rf"head.rank={rank} must satisfy 0 < rank <= d_model=24"):
    HeadConfig(vocab_size=96, d_model=24, kind="factorized", rank=rank)
