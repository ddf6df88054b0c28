"""Pure-functional decoder trunk: init(key, cfg) -> params, hidden(params, tokens, cfg) -> h.

Llama-3 style: RMSNorm, RoPE, causal grouped-query attention, SwiGLU MLP, final norm. Layers
are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with depth.
The head is not part of the trunk: `lmhead_jax.heads` turns h into logits.
"""

import math

import jax
import jax.numpy as jnp

from lmhead_jax import checks, heads
from lmhead_jax.config import HeadConfig, ModelConfig
from lmhead_jax.params import ParamSpec, logical_axes, materialize, stack


def _layer_specs(c: ModelConfig) -> dict:
  d, h, k, hd, f = c.d_model, c.n_heads, c.kv_heads, c.hd, c.ff
  return {
      "attn_norm": {"scale": ParamSpec((d,), ("embed",), value=1.0)},
      "attn": {
          "wq": ParamSpec((d, h, hd), ("embed", "heads", "head_dim"), std=d**-0.5),
          "wk": ParamSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), std=d**-0.5),
          "wv": ParamSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), std=d**-0.5),
          "wo": ParamSpec((h, hd, d), ("heads", "head_dim", "embed"),
                          std=(h * hd * 2 * c.n_layers)**-0.5),
      },
      "mlp_norm": {"scale": ParamSpec((d,), ("embed",), value=1.0)},
      "mlp": {
          "w_gate": ParamSpec((d, f), ("embed", "mlp"), std=d**-0.5),
          "w_up": ParamSpec((d, f), ("embed", "mlp"), std=d**-0.5),
          "w_down": ParamSpec((f, d), ("mlp", "embed"), std=(f * 2 * c.n_layers)**-0.5),
      },
  }


def specs(cfg, head_cfg=None) -> dict:
  """Spec tree of the whole model: embed, stacked layers, final norm and (untied) head."""
  c = ModelConfig.of(cfg)
  hc = HeadConfig.of(head_cfg or {"kind": "linear"}, c)
  tree = {
      "embed": {"w_VxD": ParamSpec((c.vocab_size, c.d_model), ("vocab", "embed"),
                                   std=c.d_model**-0.5)},
      "layers": stack(_layer_specs(c), c.n_layers),
      "final_norm": {"scale": ParamSpec((c.d_model,), ("embed",), value=1.0)},
  }
  head = heads.specs(hc)
  if head:
    tree["head"] = head
  return tree


def init(key: jax.Array, cfg, head_cfg=None) -> dict:
  """float32 parameters of the trunk and, unless tied, of the head (under 'head')."""
  return materialize(key, specs(cfg, head_cfg))


def param_axes(cfg, head_cfg=None) -> dict:
  """Logical axis names of every parameter, same tree as `init`."""
  return logical_axes(specs(cfg, head_cfg))


def rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def rope_tables(length: int, hd: int, theta: float):
  """cos and sin tables [L, hd] in the half-split (GPT-NeoX / HF) convention."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  ang = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BxLxHxK, cos_LxK, sin_LxK):
  x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_LxK[None, :, None, :], sin_LxK[None, :, None, :]
  return (x_BxLxHxK * cos + rotated * sin).astype(x_BxLxHxK.dtype)


def attention(p, x_BxLxD, cos, sin, c: ModelConfig):
  dt = x_BxLxD.dtype
  q = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wq"].astype(dt))
  k = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wk"].astype(dt))
  v = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wv"].astype(dt))
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(c.hd))
  return jnp.einsum("blhk,hkd->bld", o, p["wo"].astype(dt))


def mlp(p, x_BxLxD):
  dt = x_BxLxD.dtype
  gate = jnp.einsum("bld,df->blf", x_BxLxD, p["w_gate"].astype(dt))
  up = jnp.einsum("bld,df->blf", x_BxLxD, p["w_up"].astype(dt))
  return jnp.einsum("blf,fd->bld", jax.nn.silu(gate) * up, p["w_down"].astype(dt))


def block(layer, x_BxLxD, cos, sin, c: ModelConfig):
  x = x_BxLxD + attention(layer["attn"], rms_norm(x_BxLxD, layer["attn_norm"]["scale"],
                                                  c.norm_eps), cos, sin, c)
  return x + mlp(layer["mlp"], rms_norm(x, layer["mlp_norm"]["scale"], c.norm_eps))


def hidden(params: dict, tokens_BxL: jax.Array, cfg) -> jax.Array:
  """Final-norm hidden states h[B, L, D] (compute dtype) that the LM head consumes."""
  c = ModelConfig.of(cfg)
  tokens_BxL = checks.token_ids(tokens_BxL, c.vocab_size, "tokens")
  if tokens_BxL.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}")
  length = tokens_BxL.shape[1]
  if length > c.max_seq_len:
    raise ValueError(f"sequence length {length} exceeds model.max_seq_len={c.max_seq_len}")
  dt = c.compute_dtype
  x = jnp.take(params["embed"]["w_VxD"], tokens_BxL, axis=0).astype(dt)
  cos, sin = rope_tables(length, c.hd, c.rope_theta)

  def step(x, layer):
    return block(layer, x, cos, sin, c), None

  if c.remat:
    step = jax.checkpoint(step, prevent_cse=False)
  x, _ = jax.lax.scan(step, x, params["layers"])
  return rms_norm(x, params["final_norm"]["scale"], c.norm_eps)
