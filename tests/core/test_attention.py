"""core.attention: each implementation against float64 numpy attention and its analytic VJP;
tokamax's TPU flash kernel runs on CPU in Pallas interpret mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmhead_jax.core import attention, model
from lmhead_jax.core.config import ModelConfig

B, L, H, K, E = 2, 200, 4, 2, 32  # GQA; L is not a multiple of the kernel's 128-row blocks
SCALE = E**-0.5


@pytest.fixture
def tpu_interpret(monkeypatch):
  """Traces for TPU on this CPU host, with tokamax's kernel in the Pallas HLO interpreter (its
  attention op has no interpret switch; `pltpu.force_tpu_interpret_mode` fails on its vmapped
  grid in jax 0.12)."""
  pytest.importorskip("tokamax")
  from tokamax._src.ops.experimental.tpu.splash_attention import (
      splash_attention_kernel as splash)
  default = splash.SplashConfig.get_default()
  monkeypatch.setattr(splash.SplashConfig, "get_default",
                      staticmethod(lambda: dataclasses.replace(default, interpret=True)))
  monkeypatch.setattr(attention, "platform", lambda: "tpu")


def attention_np(q, k, v, do):
  """float64 causal GQA attention, and its VJP for the output cotangent `do`."""
  g = q.shape[2] // k.shape[2]
  kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head h reads kv head h // g
  s = SCALE * np.einsum("blhe,bmhe->bhlm", q, kk)
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhlm,bmhe->blhe", p, vv)
  dp = np.einsum("blhe,bmhe->bhlm", do, vv)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = SCALE * np.einsum("bhlm,bmhe->blhe", ds, kk)
  group = lambda x: x.reshape(B, L, K, g, E).sum(3)
  dk = group(SCALE * np.einsum("bhlm,blhe->bmhe", ds, q))
  dv = group(np.einsum("bhlm,blhe->bmhe", p, do))
  return o, (dq, dk, dv)


def inputs():
  rng = np.random.default_rng(0)
  shapes = ((B, L, H, E), (B, L, K, E), (B, L, K, E), (B, L, H, E))
  return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def check_against_numpy(kind):
  q, k, v, do = inputs()

  @jax.jit
  def forward_and_vjp(q, k, v, do):
    o, vjp = jax.vjp(lambda *x: attention.causal_attention(*x, kind, SCALE), q, k, v)
    return o, vjp(do)

  got = forward_and_vjp(q, k, v, do)
  want = attention_np(*(x.astype(np.float64) for x in (q, k, v, do)))
  for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape, name
    err = np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()
    assert err < 1e-5, (name, err)


def test_xla_matches_numpy():
  check_against_numpy("xla")


def test_flash_kernel_matches_numpy(tpu_interpret):
  check_against_numpy("flash")


def test_flash_in_the_model_matches_xla(tpu_interpret):
  c = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  family="qwen3", max_seq_len=128)  # qk-norm and RoPE before the kernel
  params = model.init(jax.random.key(0), c)
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, c.vocab_size)
  h = {a: model.hidden(params, tokens, dataclasses.replace(c, attention=a))
       for a in ("xla", "flash")}
  np.testing.assert_allclose(h["flash"], h["xla"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on, dtype, want", [
    ("cpu", jnp.float32, "xla"), ("cpu", jnp.bfloat16, "xla"), ("tpu", jnp.float32, "flash"),
    ("tpu", jnp.bfloat16, "flash"), ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla")])
def test_auto_picks_per_platform(on, dtype, want):
  assert attention.resolve("auto", on, dtype) == want


@pytest.mark.parametrize("kind, on, dtype", [
    ("cudnn", "cpu", jnp.bfloat16), ("cudnn", "gpu", jnp.float32), ("cudnn", "tpu", jnp.bfloat16),
    ("flash", "cpu", jnp.float32), ("flash", "gpu", jnp.bfloat16)])
def test_a_kind_the_platform_cannot_run_is_refused(kind, on, dtype):
  with pytest.raises(ValueError, match=f"model.attention='{kind}'"):
    attention.resolve(kind, on, dtype)


def test_cudnn_on_this_cpu_is_refused_in_the_model():
  c = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, dtype="bfloat16",
                  attention="cudnn")
  params = model.init(jax.random.key(0), c)
  with pytest.raises(ValueError, match="model.attention='cudnn' runs on GPU"):
    model.hidden(params, jnp.zeros((1, 8), jnp.int32), c)


def test_config_refuses_an_unknown_attention():
  with pytest.raises(ValueError, match="model.attention='splash' is not one of"):
    ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, attention="splash")
