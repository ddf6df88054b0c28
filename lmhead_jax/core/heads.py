"""LM heads as pure functions: specs, logits(head_params, h, cfg) and matrix(head_params).

| kind       | params                    | logits            | W (V×D) |
|------------|---------------------------|-------------------|---------|
| linear     | w_VxD                     | h Wᵀ              | W       |
| tied       | (the input embedding)     | h Eᵀ              | E       |
| factorized | a_VxR, b_RxD              | A (B h)           | A B     |
| mos        | w_VxD, p_SxDxD, pi_SxD    | log p (`mos`)     | none    |

Initialization keeps the initial logits' scale independent of D and r: with h at unit RMS
(final norm), W ~ N(0, 1/D) gives Var(z) = 1; for the factorized head B ~ N(0, 1/D) keeps B h at
unit RMS and A ~ N(0, 1/r) gives Var(z) = 1 again, whatever r. The tied head gets the same from
the trunk's N(0, 1/D) embedding. Logits are float32: the matmuls run in h's dtype with float32
accumulation (the factorized head rounds B h to h's dtype in between).
"""

import jax
import jax.numpy as jnp

from lmhead_jax.core import mos
from lmhead_jax.core.config import HeadConfig
from lmhead_jax.core.params import ParamSpec


def specs(cfg: HeadConfig) -> dict:
  """Head parameter specs; empty for the tied head, whose matrix is the input embedding."""
  v, d = cfg.vocab_size, cfg.d_model
  if cfg.kind == "linear":
    return {"w_VxD": ParamSpec((v, d), ("vocab", "embed"), std=d**-0.5)}
  if cfg.kind == "factorized":
    r = int(cfg.rank)
    return {"a_VxR": ParamSpec((v, r), ("vocab", "rank"), std=r**-0.5),
            "b_RxD": ParamSpec((r, d), ("rank", "embed"), std=d**-0.5)}
  if cfg.kind == "mos":
    return mos.specs(v, d, int(cfg.mixtures))
  return {}


def params_of(model_params: dict, cfg: HeadConfig) -> dict:
  """The head's parameters inside a full model tree (the embedding, for a tied head). With
  cfg.data_vocab < V, their V-indexed arrays keep the first data_vocab rows: the padding rows
  are never in the logits, the softmax or G, and their gradient is 0."""
  head = ({"w_VxD": model_params["embed"]["w_VxD"]} if cfg.kind == "tied"
          else model_params["head"])
  if cfg.live_vocab == cfg.vocab_size:
    return head
  return {k: x[:cfg.live_vocab] if k.split("_", 1)[-1].startswith("V") else x
          for k, x in head.items()}


def _project(x, w, contract: str):
  return jnp.einsum(contract, x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def logits(head_params: dict, h: jax.Array, cfg: HeadConfig) -> jax.Array:
  """z[..., V] in float32."""
  if h.shape[-1] != cfg.d_model:
    raise ValueError(f"h has D={h.shape[-1]} but the head expects d_model={cfg.d_model}")
  if cfg.kind == "factorized":
    u = _project(h, head_params["b_RxD"], "...d,rd->...r").astype(h.dtype)
    return _project(u, head_params["a_VxR"], "...r,vr->...v")
  if cfg.kind == "mos":
    return mos.logits(head_params, h)
  return _project(h, head_params["w_VxD"], "...d,vd->...v")


def matrix(head_params: dict) -> jax.Array:
  """The effective head matrix W[V, D] (float32); the mos head has none."""
  if "p_SxDxD" in head_params:
    raise ValueError("the mos head is not linear in h: it has no matrix W")
  if "a_VxR" in head_params:
    return jnp.matmul(head_params["a_VxR"], head_params["b_RxD"],
                      precision=jax.lax.Precision.HIGHEST)
  return head_params["w_VxD"].astype(jnp.float32)
