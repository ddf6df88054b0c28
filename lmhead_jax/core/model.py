"""Pure-functional decoder trunk: init(key, c) -> params, hidden(params, tokens, c) -> h.

One trunk covers Llama-3, Qwen3, OLMo-2, GPT-2 and GPT-NeoX through the ModelConfig flags that
each family sets by default (`config.FAMILY_FLAGS`; the table is in docs/INTERNALS.md). Layers
are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with depth.
The head is not part of the trunk: `lmhead_jax.core.heads` turns h into logits. Every function
takes a typed ModelConfig (and HeadConfig).
"""

import math

import jax
import jax.numpy as jnp

from lmhead_jax.core import checks, heads
from lmhead_jax.core.attention import causal_attention
from lmhead_jax.core.config import HeadConfig, ModelConfig, default_head, typed
from lmhead_jax.core.params import ParamSpec, batch_sharded, logical_axes, materialize, stack


def _norm_specs(c: ModelConfig) -> dict:
  spec = {"scale": ParamSpec((c.d_model,), ("embed",), value=1.0)}
  if c.norm == "layer":
    spec["bias"] = ParamSpec((c.d_model,), ("embed",))
  return spec


def _qk_norm_specs(c: ModelConfig, n: int, axis: str) -> dict:
  """RMSNorm scale over all n heads' q (or k) ('full') or shared by every head ('head')."""
  shape, axes = ((n, c.hd), (axis, "head_dim")) if c.qk_norm == "full" else ((c.hd,),
                                                                               ("head_dim",))
  return {"scale": ParamSpec(shape, axes, value=1.0)}


def _layer_specs(c: ModelConfig) -> dict:
  d, h, k, hd, f = c.d_model, c.n_heads, c.kv_heads, c.hd, c.ff
  attn = {
      "wq": ParamSpec((d, h, hd), ("embed", "heads", "head_dim"), std=d**-0.5),
      "wk": ParamSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), std=d**-0.5),
      "wv": ParamSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), std=d**-0.5),
      "wo": ParamSpec((h, hd, d), ("heads", "head_dim", "embed"),
                      std=(h * hd * 2 * c.n_layers)**-0.5),
  }
  mlp = {
      "w_up": ParamSpec((d, f), ("embed", "mlp"), std=d**-0.5),
      "w_down": ParamSpec((f, d), ("mlp", "embed"), std=(f * 2 * c.n_layers)**-0.5),
  }
  if c.mlp_act == "swiglu":
    mlp["w_gate"] = ParamSpec((d, f), ("embed", "mlp"), std=d**-0.5)
  if c.bias:
    attn |= {"bq": ParamSpec((h, hd), ("heads", "head_dim")),
             "bk": ParamSpec((k, hd), ("kv_heads", "head_dim")),
             "bv": ParamSpec((k, hd), ("kv_heads", "head_dim")),
             "bo": ParamSpec((d,), ("embed",))}
    mlp |= {"b_up": ParamSpec((f,), ("mlp",)), "b_down": ParamSpec((d,), ("embed",))}
  if c.qk_norm != "none":
    attn |= {"q_norm": _qk_norm_specs(c, h, "heads"), "k_norm": _qk_norm_specs(c, k, "kv_heads")}
  return {"attn_norm": _norm_specs(c), "attn": attn, "mlp_norm": _norm_specs(c), "mlp": mlp}


def specs(c: ModelConfig, hc: HeadConfig | None = None) -> dict:
  """Spec tree of the whole model: embed, (learned positions), stacked layers, final norm, head
  (`config.default_head` when hc is None)."""
  c = typed(c, ModelConfig)
  hc = default_head(c) if hc is None else typed(hc, HeadConfig)
  tree = {
      "embed": {"w_VxD": ParamSpec((c.vocab_size, c.d_model), ("vocab", "embed"),
                                   std=c.d_model**-0.5)},
      "layers": stack(_layer_specs(c), c.n_layers),
      "final_norm": _norm_specs(c),
  }
  if c.pos == "learned":
    tree["pos_embed"] = {"w_PxD": ParamSpec((c.max_seq_len, c.d_model), (None, "embed"),
                                            std=c.d_model**-0.5)}
  head = heads.specs(hc)
  if head:
    tree["head"] = head
  return tree


def init(key: jax.Array, c: ModelConfig, hc: HeadConfig | None = None) -> dict:
  """float32 parameters of the trunk and, unless tied, of the head (under 'head')."""
  return materialize(key, specs(c, hc))


def param_axes(c: ModelConfig, hc: HeadConfig | None = None) -> dict:
  """Logical axis names of every parameter, same tree as `init`."""
  return logical_axes(specs(c, hc))


def rms_norm(x, scale, eps, axis=-1):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale + bias).astype(x.dtype)


def norm(p, x, c: ModelConfig):
  if c.norm == "layer":
    return layer_norm(x, p["scale"], p["bias"], c.norm_eps)
  return rms_norm(x, p["scale"], c.norm_eps)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_len):
  """Llama-3.1 RoPE scaling: long wavelengths slowed by `factor`, short kept, blended between."""
  wavelen = 2 * math.pi / inv_freq
  low_wavelen, high_wavelen = original_len / low_freq_factor, original_len / high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  return jnp.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def rope_tables(length: int, dim: int, theta: float, scaling=None):
  """cos and sin tables [L, A] in the half-split (GPT-NeoX / HF) convention.

  As transformers: frequencies theta^(-2i / dim) for the even 2i < dim, each on two channels, so
  an odd dim (GPT-NeoX head_dim 12 * rotary_pct 0.25 = 3) rotates A = dim + 1 channels.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if scaling is not None:
    inv_freq = llama3_inv_freq(inv_freq, *scaling)
  ang = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BxLxHxE, cos_LxA, sin_LxA):
  """Rotates the first A dims of every head; the rest (partial rotary) pass through."""
  r = cos_LxA.shape[-1]
  x_rot = x_BxLxHxE[..., :r]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_LxA[None, :, None, :], sin_LxA[None, :, None, :]
  y = (x_rot * cos + rotated * sin).astype(x_BxLxHxE.dtype)
  if r == x_BxLxHxE.shape[-1]:
    return y
  return jnp.concatenate([y, x_BxLxHxE[..., r:]], axis=-1)


def _dense(p, name: str, x, contract: str):
  """einsum(x, p[name]) plus its bias p['b' + name[1:]] (wq -> bq, w_up -> b_up) if present."""
  y = jnp.einsum(contract, x, p[name].astype(x.dtype))
  bias = p.get("b" + name[1:])
  return y if bias is None else y + bias.astype(x.dtype)


def attention(p, x_BxLxD, rope, c: ModelConfig):
  """Causal (grouped-query) attention by `c.attention` (`core.attention`); `rope` is (cos, sin)
  or None for learned positions."""
  q = _dense(p, "wq", x_BxLxD, "bld,dhk->blhk")
  k = _dense(p, "wk", x_BxLxD, "bld,dhk->blhk")
  v = _dense(p, "wv", x_BxLxD, "bld,dhk->blhk")
  if c.qk_norm != "none":
    axis = (-2, -1) if c.qk_norm == "full" else -1
    q = rms_norm(q, p["q_norm"]["scale"], c.norm_eps, axis)
    k = rms_norm(k, p["k_norm"]["scale"], c.norm_eps, axis)
  if rope is not None:
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
  o = causal_attention(q, k, v, c.attention, scale=1.0 / math.sqrt(c.hd))
  return _dense(p, "wo", o, "blhk,hkd->bld")


def mlp(p, x_BxLxD, c: ModelConfig):
  up = _dense(p, "w_up", x_BxLxD, "bld,df->blf")
  if c.mlp_act == "swiglu":
    up = jax.nn.silu(jnp.einsum("bld,df->blf", x_BxLxD, p["w_gate"].astype(x_BxLxD.dtype))) * up
  else:
    up = jax.nn.gelu(up, approximate=c.mlp_act == "gelu_tanh")
  return _dense(p, "w_down", up, "blf,fd->bld")


def block(layer, x_BxLxD, rope, c: ModelConfig):
  """One decoder layer, wired pre-norm, post-norm (OLMo-2) or parallel (GPT-NeoX)."""
  def attn(y):
    return attention(layer["attn"], y, rope, c)

  def ff(y):
    return mlp(layer["mlp"], y, c)

  def norm1(y):
    return norm(layer["attn_norm"], y, c)

  def norm2(y):
    return norm(layer["mlp_norm"], y, c)

  x = x_BxLxD
  if c.parallel_residual:
    return x + attn(norm1(x)) + ff(norm2(x))
  if c.norm_position == "post":
    x = x + norm1(attn(x))
    return x + norm2(ff(x))
  x = x + attn(norm1(x))
  return x + ff(norm2(x))


def hidden(params: dict, tokens_BxL: jax.Array, c: ModelConfig) -> jax.Array:
  """Final-norm hidden states h[B, L, D] (compute dtype) that the LM head consumes."""
  c = typed(c, ModelConfig)
  tokens_BxL = checks.token_ids(tokens_BxL, c.vocab_size, "tokens")
  if tokens_BxL.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens_BxL.shape}")
  return hidden_from_embeddings(params, jnp.take(params["embed"]["w_VxD"], tokens_BxL, axis=0), c)


def hidden_from_embeddings(params: dict, x_BxLxD: jax.Array, c: ModelConfig) -> jax.Array:
  """`hidden` from token embeddings instead of ids (learned positions are added here)."""
  c = typed(c, ModelConfig)
  if x_BxLxD.ndim != 3 or x_BxLxD.shape[-1] != c.d_model:
    raise ValueError(f"embeddings must be [batch, length, {c.d_model}], got {x_BxLxD.shape}")
  length = x_BxLxD.shape[1]
  if length > c.max_seq_len:
    raise ValueError(f"sequence length {length} exceeds model.max_seq_len={c.max_seq_len}")
  rope = None
  if c.pos == "learned":
    x_BxLxD = x_BxLxD + params["pos_embed"]["w_PxD"][:length]
  else:
    rope = rope_tables(length, c.rotary_dim, c.rope_theta, c.rope_scaling)
  x = batch_sharded(x_BxLxD.astype(c.compute_dtype))

  def step(x, layer):
    return batch_sharded(block(layer, x, rope, c)), None

  if c.remat:
    step = jax.checkpoint(step, prevent_cse=False)
  x, _ = jax.lax.scan(step, x, params["layers"])
  return batch_sharded(norm(params["final_norm"], x, c))
