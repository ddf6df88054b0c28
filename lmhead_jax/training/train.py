"""The jit-sharded train/eval steps that also measure the head's bottleneck.

One forward pass: h = trunk(params, x); z = head(params, h). `jax.vjp` through the head gives,
from the same computation, the loss, the logit gradient G, what the head passes back to the trunk
(G W) and the parameter gradient. The bottleneck metrics are read off G, G W and W. On the
steps that compute them, `realized_cosine` also measures what the optimizer's update realizes.
`head.backward` changes what the trunk receives, `head.ortho_weight` and
`train.alignment_weight` add regularizers (`lmhead_jax.core.backward`, `lmhead_jax.core.regularize`).
Every function takes the experiment config or its resolved `Setup` (`training/setup.py`).
"""

import jax
import jax.numpy as jnp
import optax

from lmhead_jax.core import backward, bottleneck, heads, model, regularize
from lmhead_jax.core.config import HeadConfig
from lmhead_jax.core.loss import _to_chunks, accuracy, cross_entropy, fused_head_loss
from lmhead_jax.training import sharding
from lmhead_jax.training.setup import Setup, TrainState, configs, resolve


__all__ = ["GUARDED", "Setup", "TrainState", "configs", "resolve", "init_state", "new_state",
           "state_shardings", "loss_and_grads", "realized_cosine", "make_train_step",
           "make_eval_step"]

# Metrics that must be finite for a step's update to be applied, in the order they are computed.
GUARDED = ("learning_rate", "loss", "grad_norm", "update_norm", "param_norm")
# Tokens per metric step whose per-token Jacobian (V×D) gives the mos head's bottleneck stats.
MOS_STAT_TOKENS = 64


def _head_backward(params, h, batch, hc: HeadConfig):
  """(loss, accuracy, per-token ‖n·g_t‖², G W, head-parameter grads, G or None) of the head on h.

  Dense: `jax.vjp` through any head function, then G = ∂ℒ/∂z. Chunked (`head.chunk_size`): the
  fused head + CE of `loss.fused_head_loss` on the effective matrix W, never forming N×V logits.
  """
  targets, mask = batch["targets"], batch["mask"]
  if hc.chunk_size is None:
    z, head_vjp = jax.vjp(lambda p, h: heads.logits(heads.params_of(p, hc), h, hc), params, h)
    loss, g = jax.value_and_grad(cross_entropy)(z, targets, mask)
    head_grads, d_h = head_vjp(g)
    g_sq = jnp.sum(jnp.square(g * jnp.maximum(jnp.sum(mask), 1.0)), -1)
    return loss, accuracy(z, targets, mask), g_sq, d_h, head_grads, g
  fused = lambda p, h: fused_head_loss(h, heads.matrix(heads.params_of(p, hc)), targets, mask,
                                       chunk_size=hc.chunk_size)
  loss, head_vjp, tokens = jax.vjp(fused, params, h, has_aux=True)
  head_grads, d_h = head_vjp(jnp.ones_like(loss))
  n = jnp.maximum(jnp.sum(mask), 1.0)
  return loss, jnp.sum(tokens.correct_N) / n, tokens.g_sq_N, d_h, head_grads, None


def _passed_back(params, g, d_h, s: Setup):
  """What the head passes back to the trunk under `head.backward` (G W when exact)."""
  hc = s.head
  if hc.backward == "whitened":
    return backward.whiten(d_h, heads.matrix(heads.params_of(params, hc)))
  if hc.backward == "truncated":
    return backward.truncate(d_h, heads.matrix(heads.params_of(params, hc)), hc.backward_rank)
  if hc.backward == "feedback_alignment":
    b_VxD = backward.feedback_matrix(s.seed, hc.vocab_size, hc.d_model)
    return jnp.einsum("...v,vd->...d", g, b_VxD).astype(d_h.dtype)
  return d_h


def _escape(params, h, g, d_trunk, mask, s: Setup):
  """The trunk's cotangent: what the head passes back (`_passed_back`) plus the regularizers'
  gradients; and the regularizers' parameter gradients and values."""
  hc = s.head
  w_of = lambda p: heads.matrix(heads.params_of(p, hc))
  weights = {"ortho_penalty": float(hc.ortho_weight), "alignment_loss": s.alignment_weight}
  weights = {k: w for k, w in weights.items() if w > 0}
  if not weights:
    return d_trunk, None, {}

  def penalty(p, h):
    terms = {}
    if "ortho_penalty" in weights:
      terms["ortho_penalty"] = regularize.ortho(w_of(p))
    if "alignment_loss" in weights:
      terms["alignment_loss"] = regularize.alignment(g, h, w_of(p), mask)
    return sum(weights[k] * v for k, v in terms.items()), terms

  (_, terms), (d_params, d_hidden) = jax.value_and_grad(penalty, (0, 1), has_aux=True)(params, h)
  return d_trunk + d_hidden.astype(d_trunk.dtype), d_params, terms


def _mos_stats(params, h, batch, hc: HeadConfig):
  """`bottleneck.head_stats` (per-token Jacobians) on MOS_STAT_TOKENS evenly strided tokens of
  the flattened batch; costs about MOS_STAT_TOKENS · D forward passes of the head."""
  h_NxD = h.reshape(-1, h.shape[-1])
  n = h_NxD.shape[0]
  s = min(n, MOS_STAT_TOKENS)
  idx = jnp.arange(s) * (n // s)
  hp = heads.params_of(params, hc)
  return bottleneck.head_stats(lambda x: heads.logits(hp, x, hc), h_NxD[idx],
                               batch["targets"].reshape(-1)[idx], batch["mask"].reshape(-1)[idx],
                               linear_in_h=False)


def _loss_parts(params, batch, s: Setup, range_map_DxK=None, with_bottleneck: bool = False):
  """Loss, parameter gradient, accuracy and (with_bottleneck) the bottleneck stats of one
  micro-batch; a linear head's stats use the range map of its W, computed once per step."""
  mask, hc = batch["mask"], s.head
  h, trunk_vjp = jax.vjp(lambda p: model.hidden(p, batch["inputs"], s.model), params)
  loss, acc, g_sq, d_h, head_grads, g = _head_backward(params, h, batch, hc)
  d_passed = _passed_back(params, g, d_h, s)
  d_trunk, reg_grads, terms = _escape(params, h, g, d_passed, mask, s)
  if hc.backward == "truncated":  # its metrics describe what the trunk receives: G W_r
    d_h = d_passed
  (trunk_grads,) = trunk_vjp(d_trunk)
  grads = jax.tree.map(jnp.add, trunk_grads, head_grads)
  if reg_grads is not None:
    grads = jax.tree.map(jnp.add, grads, reg_grads)
  out = {"loss": loss, "accuracy": acc, "n": jnp.sum(mask), **terms}
  if with_bottleneck and hc.kind == "mos":
    out["stats"] = _mos_stats(params, h, batch, hc)
  elif with_bottleneck:
    b = d_h.reshape(-1, d_h.shape[-1]).astype(jnp.float32) * jnp.maximum(jnp.sum(mask), 1.0)
    out["stats"] = bottleneck.summarize(loss, g_sq.reshape(-1), b,
                                        bottleneck.visible_sq(b, range_map_DxK),
                                        mask.reshape(-1).astype(jnp.float32))
  return out, grads


def _combine(outs, n_total):
  """Merges stacked per-micro-batch outputs into the big batch's (G scales with 1/n)."""
  w = outs["n"] / jnp.maximum(n_total, 1.0)
  merged = {k: jnp.sum(w * outs[k]) for k in outs if k not in ("n", "stats")}
  if "stats" in outs:
    s = outs["stats"]
    sq = lambda x: jnp.sum(jnp.square(w * x))
    full, vis, back = sq(s.full_norm), sq(s.visible_norm), sq(s.backbone_norm)
    merged["stats"] = bottleneck.BottleneckStats(
        loss=merged["loss"], full_norm=jnp.sqrt(full), backbone_norm=jnp.sqrt(back),
        visible_norm=jnp.sqrt(vis), destroyed_ratio=bottleneck.destroyed(vis, full),
        visible_cosine=jnp.sqrt(bottleneck.visible_share(vis, full)),
        token_destroyed_ratio=jnp.sum(w * s.token_destroyed_ratio))
  return merged


def micro_batches(batch: dict, k: int) -> dict:
  """The batch as k stacked micro-batches; micro-batch i takes rows i, i+k, ..., so that each
  device keeps its own rows."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), batch)


def loss_and_grads(params, batch, cfg, with_bottleneck: bool = True):
  """Mean-CE loss and gradient over the whole batch, accumulated over `train.grad_accum`.
  `cfg`: an experiment config or its resolved Setup."""
  s = resolve(cfg)
  range_map_DxK = None
  if with_bottleneck and s.head.kind != "mos":  # once per step, not per micro-batch
    range_map_DxK = bottleneck.range_map(heads.matrix(heads.params_of(params, s.head)))
  parts = lambda mb: _loss_parts(params, mb, s, range_map_DxK, with_bottleneck)
  if s.grad_accum == 1:
    return parts(batch)

  def body(acc, mb):
    out, grads = parts(mb)
    return jax.tree.map(lambda a, g: a + g * out["n"], acc, grads), out

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, outs = jax.lax.scan(body, zeros, micro_batches(batch, s.grad_accum))
  n_total = jnp.sum(outs["n"])
  grads = jax.tree.map(lambda g: g / jnp.maximum(n_total, 1.0), grad_sum)
  merged = _combine(outs, n_total)
  merged["n"] = n_total
  return merged, grads


def realized_cosine(params, updates, batch, cfg) -> jax.Array:
  """cos(−G, J_θ Δθ): −G against the first-order change of the logits that the update Δθ makes,
  from a jvp of the trunk and then of the head along Δθ, on the same batch (a micro-batch at a
  time with `train.grad_accum`, the head a token chunk at a time with `head.chunk_size`). Costs
  about one forward pass with tangents."""
  s = resolve(cfg)
  hc = s.head
  hp, dhp = heads.params_of(params, hc), heads.params_of(updates, hc)

  def chunk_sums(x):
    h_CxD, dh_CxD, y_C, m_C = x
    z, dz = jax.jvp(lambda p, h: heads.logits(p, h, hc), (hp, h_CxD), (dhp, dh_CxD))
    g = jax.grad(cross_entropy)(z, y_C, m_C) * jnp.maximum(jnp.sum(m_C), 1.0)  # rows p − e_y
    dz = dz * m_C[:, None]
    return jnp.stack([jnp.sum(g * dz), jnp.sum(g * g), jnp.sum(dz * dz)])

  def micro_batch_sums(mb):
    h, dh = jax.jvp(lambda p: model.hidden(p, mb["inputs"], s.model), (params,), (updates,))
    n = mb["targets"].size
    size = min(hc.chunk_size or n, n)
    chunks = [_to_chunks(x.reshape(n, *x.shape[2:]), -(-n // size), size)
              for x in (h, dh, mb["targets"], mb["mask"])]
    return jnp.sum(jax.lax.map(chunk_sums, chunks), axis=0)

  sums = jax.lax.map(micro_batch_sums, micro_batches(batch, s.grad_accum))
  gdz, gg, dzdz = jnp.sum(sums, axis=0)
  return -gdz / jnp.sqrt(jnp.maximum(gg * dzdz, jnp.finfo(jnp.float32).tiny))


def _on_mesh(cfg, mesh) -> Setup:
  s = resolve(cfg, mesh)
  if s.mesh is None:
    raise ValueError("no mesh: pass one, or a Setup resolved on one (setup.resolve(cfg, mesh))")
  return s


def new_state(key, cfg) -> TrainState:
  """A fresh, unsharded TrainState (wrap in jit with out_shardings, or eval_shape it)."""
  return resolve(cfg).new_state(key)


def init_state(key, cfg, mesh=None) -> tuple[TrainState, TrainState]:
  """A TrainState born sharded on `mesh` (or the Setup's), and the tree of its shardings."""
  s = _on_mesh(cfg, mesh)
  return jax.jit(s.new_state, out_shardings=s.state_shardings)(key), s.state_shardings


def state_shardings(cfg, mesh=None) -> TrainState:
  """Shardings of every TrainState leaf; optimizer moments follow their parameter."""
  return _on_mesh(cfg, mesh).state_shardings


def make_train_step(cfg, mesh=None, *, with_bottleneck: bool = True,
                    with_realized: bool | None = None):
  """step(state, batch) -> (state, metrics), jitted with explicit shardings; state donated.
  `cfg`: an experiment config on `mesh`, or a Setup resolved on one. `with_realized` (default:
  `with_bottleneck`) adds bottleneck/realized_cosine, a forward pass with tangents."""
  s = _on_mesh(cfg, mesh)
  with_realized = with_bottleneck if with_realized is None else with_realized

  def step(state: TrainState, batch):
    out, grads = loss_and_grads(state.params, batch, s, with_bottleneck)
    grad_norm = optax.tree.norm(grads)
    if s.clip_norm > 0:
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, s.clip_norm / (grad_norm + 1e-12)), grads)
    updates, opt_state = s.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": out["loss"], "accuracy": out["accuracy"], "grad_norm": grad_norm,
        "clipped_grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates), "learning_rate": s.schedule(state.step),
    }
    finite = jnp.all(jnp.array([jnp.isfinite(metrics[k]) for k in GUARDED]))
    # A non-finite step leaves the state untouched; the loop sees the metric and stops.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    metrics.update({k: out[k] for k in ("ortho_penalty", "alignment_loss") if k in out})
    if with_bottleneck:
      metrics.update(out["stats"].metrics())
    if with_realized:
      metrics["bottleneck/realized_cosine"] = realized_cosine(state.params, updates, batch, s)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return jax.jit(sharding.traced_on(s.mesh, step),
                 in_shardings=(s.state_shardings, s.batch_shardings),
                 out_shardings=(s.state_shardings, sharding.replicated(s.mesh)), donate_argnums=0)


def make_eval_step(cfg, mesh=None):
  """eval_step(params, batch) -> {'loss', 'accuracy', 'n'}, with the train step's shardings."""
  s = _on_mesh(cfg, mesh)

  def evaluate(params, batch):
    h = model.hidden(params, batch["inputs"], s.model)
    z = heads.logits(heads.params_of(params, s.head), h, s.head)
    return {"loss": cross_entropy(z, batch["targets"], batch["mask"]),
            "accuracy": accuracy(z, batch["targets"], batch["mask"]),
            "n": jnp.sum(batch["mask"]).astype(jnp.float32)}

  return jax.jit(sharding.traced_on(s.mesh, evaluate),
                 in_shardings=(s.state_shardings.params, s.batch_shardings),
                 out_shardings=sharding.replicated(s.mesh))
