"""The jit-sharded train/eval steps that also measure the head's bottleneck.

One forward pass: h = trunk(params, x); the head's loss and its bottleneck stats come from the
public head loss (`bottleneck.head_loss`; `head_fn_loss` for the mos head and the dense-only
rules), whose gradient in h is what the trunk receives (`head.backward`). On the steps that ask,
`realized_cosine` measures what the optimizer's update realizes. `head.ortho_weight` and
`train.alignment_weight` add regularizers (`lmhead_jax.core.regularize`). Every function takes
a `Setup` (`training/setup.py`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lmhead_jax.core import backward, bottleneck, heads, model, regularize
from lmhead_jax.core.loss import accuracy, cross_entropy, token_chunks
from lmhead_jax.training import sharding
from lmhead_jax.training.setup import Setup, TrainState

# Metrics that must be finite for a step's update to be applied, in the order they are computed.
GUARDED = ("learning_rate", "loss", "grad_norm", "update_norm", "param_norm")
# Tokens per metric step whose per-token Jacobian (V×D) gives the mos head's bottleneck stats.
MOS_STAT_TOKENS = 64


def carries_range_map(setup: Setup) -> bool:
  """Whether the head's loss is `bottleneck.head_loss` (of W, with W's range map), not
  `head_fn_loss` (the mos head, feedback alignment, and the alignment regularizer's G)."""
  hc = setup.head
  return not (hc.kind == "mos" or hc.backward == "feedback_alignment"
              or setup.alignment_weight > 0)


def _head_loss(params, h, batch, setup: Setup, w_range_map=None):
  """((loss, (BottleneckStats, G or None)), (∂/∂params, ∂/∂h)) of the head on h, through the
  public head loss: its h-gradient is what the trunk receives (`head.backward`). G = ∂ℒ/∂z is
  needed by the alignment regularizer only (dense): it comes out as the gradient of zeros added
  to the logits. w_range_map: `bottleneck.range_map` of W, if the caller has it."""
  hc, targets, mask = setup.head, batch["targets"], batch["mask"]
  options = dict(setup.loss.options(), return_lse=True)
  head_logits = lambda hp, h: heads.logits(hp, h, hc)
  with_g = setup.alignment_weight > 0
  if hc.forward_rank is not None:  # rank-r logits; the cotangent of h passes straight through
    w_VxD = jax.lax.stop_gradient(heads.matrix(heads.params_of(params, hc)))
    h = backward.projected(h, w_VxD, hc.forward_rank)

  if not carries_range_map(setup):
    b_VxD = (backward.feedback_matrix(setup.seed, hc.live_vocab, hc.d_model)
             if hc.backward == "feedback_alignment" else None)

    def logits_plus(hp_z0, h_NxD):  # the logits, plus zeros whose gradient is G
      hp, z0_NxV = hp_z0
      if b_VxD is not None:  # h receives G B; the stats describe G B
        return backward.feedback(head_logits(hp, jax.lax.stop_gradient(h_NxD)), h_NxD,
                                 b_VxD) + z0_NxV
      return head_logits(hp, h_NxD) + z0_NxV

    def objective(p, z0_NxV, h):  # the mos head's stats are `_mos_stats`'s, on a few tokens
      loss, stats = bottleneck.head_fn_loss(logits_plus, (heads.params_of(p, hc), z0_NxV), h,
                                            targets, mask, linear_in_h=hc.kind != "mos",
                                            **options)
      return loss, stats

    # N×V zeros only when G is needed; else a scalar (its gradient, a sum over G, is unused).
    z0_NxV = jnp.zeros((targets.size, hc.live_vocab) if with_g else (), jnp.float32)
    (loss, stats), (d_params, g, d_h) = jax.value_and_grad(objective, (0, 1, 2), has_aux=True)(
        params, z0_NxV, h)
    return (loss, (stats, g if with_g else None)), (d_params, d_h)

  def objective(p, h):
    w = heads.matrix(heads.params_of(p, hc))
    if hc.backward == "whitened":
      h = backward.whitened(h, jax.lax.stop_gradient(w))
    loss, stats = bottleneck.head_loss(h, w, targets, mask, chunk_size=hc.chunk_size,
                                       backward_rank=hc.backward_rank, w_range_map=w_range_map,
                                       **options)
    return loss, (stats, None)

  return jax.value_and_grad(objective, (0, 1), has_aux=True)(params, h)


def _regularizers(params, h, g, mask, setup: Setup):
  """Σ weight·penalty of head.ortho_weight and train.alignment_weight: (the values, their
  gradients in (params, h)); None when both are off."""
  hc = setup.head
  weights = {"ortho_penalty": float(hc.ortho_weight), "alignment_loss": setup.alignment_weight}
  weights = {k: w for k, w in weights.items() if w > 0}
  if not weights:
    return {}, None

  def penalty(p, h):
    w_VxD = heads.matrix(heads.params_of(p, hc))
    terms = {}
    if "ortho_penalty" in weights:
      terms["ortho_penalty"] = regularize.ortho(w_VxD)
    if "alignment_loss" in weights:
      terms["alignment_loss"] = regularize.alignment(g, h, w_VxD, mask)
    return sum(weights[k] * v for k, v in terms.items()), terms

  (_, terms), grads = jax.value_and_grad(penalty, (0, 1), has_aux=True)(params, h)
  return terms, grads


def _mos_stats(params, h, batch, setup: Setup):
  """`bottleneck.head_stats` (per-token Jacobians) on MOS_STAT_TOKENS evenly strided tokens of
  the flattened batch; costs about MOS_STAT_TOKENS · D forward passes of the head."""
  hc = setup.head
  h_NxD = h.reshape(-1, h.shape[-1])
  n = h_NxD.shape[0]
  picked = min(n, MOS_STAT_TOKENS)
  idx = jnp.arange(picked) * (n // picked)
  hp = heads.params_of(params, hc)
  return bottleneck.head_stats(lambda x: heads.logits(hp, x, hc), h_NxD[idx],
                               batch["targets"].reshape(-1)[idx], batch["mask"].reshape(-1)[idx],
                               linear_in_h=False)


def _loss_parts(params, batch, setup: Setup, with_bottleneck: bool, w_range_map=None):
  """Loss, accuracy, (with_bottleneck) the bottleneck stats and the parameter gradient of one
  micro-batch."""
  mask = batch["mask"]
  h, trunk_vjp = jax.vjp(lambda p: model.hidden(p, batch["inputs"], setup.model), params)
  (loss, (stats, g)), (head_grads, d_h) = _head_loss(params, h, batch, setup, w_range_map)
  terms, reg_grads = _regularizers(params, h, g, mask, setup)
  if reg_grads is not None:
    head_grads = jax.tree.map(jnp.add, head_grads, reg_grads[0])
    d_h = d_h + reg_grads[1].astype(d_h.dtype)
  (trunk_grads,) = trunk_vjp(d_h)
  grads = jax.tree.map(jnp.add, trunk_grads, head_grads)
  out = {"loss": loss, "accuracy": stats.accuracy, "n": jnp.sum(mask), **terms}
  if with_bottleneck:
    out["stats"] = _mos_stats(params, h, batch, setup) if setup.head.kind == "mos" else stats
  return out, grads


def _combine(outs, n_total):
  """Merges stacked per-micro-batch outputs into the big batch's (G scales with 1/n)."""
  w = outs["n"] / jnp.maximum(n_total, 1.0)
  merged = {k: jnp.sum(w * outs[k]) for k in outs if k not in ("n", "stats")}
  if "stats" in outs:
    st = outs["stats"]
    sq = lambda x: jnp.sum(jnp.square(w * x))
    full, vis, back = sq(st.full_norm), sq(st.visible_norm), sq(st.backbone_norm)
    merged["stats"] = bottleneck.BottleneckStats(
        loss=merged["loss"], full_norm=jnp.sqrt(full), backbone_norm=jnp.sqrt(back),
        visible_norm=jnp.sqrt(vis), destroyed_ratio=bottleneck.destroyed(vis, full),
        visible_cosine=jnp.sqrt(bottleneck.visible_share(vis, full)),
        token_destroyed_ratio=jnp.sum(w * st.token_destroyed_ratio))
  return merged


def micro_batches(batch: dict, k: int) -> dict:
  """The batch as k stacked micro-batches; micro-batch i takes rows i, i+k, ..., so that each
  device keeps its own rows."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, k, *x.shape[1:]), 0, 1), batch)


def loss_and_grads(params, batch, setup: Setup, with_bottleneck: bool = True, range_map=None):
  """Loss and gradient over the whole batch, accumulated over `setup.grad_accum` micro-batches.
  With the stats of a linear head (`carries_range_map`), W's range map is computed once per
  step, refined from `range_map` (an earlier W's) when given (`bottleneck.refine_range_map`),
  and returned as out["range_map"], with W's numerical rank and the refinement's drift."""
  m = drift = None
  if with_bottleneck and carries_range_map(setup):
    w_VxD = jax.lax.stop_gradient(heads.matrix(heads.params_of(params, setup.head)))
    if range_map is None:
      m, drift = bottleneck.range_map(w_VxD), jnp.zeros((), jnp.float32)
    else:
      m, drift = bottleneck.refine_range_map(w_VxD, range_map)
  parts = lambda mb: _loss_parts(params, mb, setup, with_bottleneck, m)
  if setup.grad_accum == 1:
    out, grads = parts(batch)
  else:
    def body(acc, mb):
      out, grads = parts(mb)
      return jax.tree.map(lambda a, g: a + g * out["n"], acc, grads), out

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, outs = jax.lax.scan(body, zeros, micro_batches(batch, setup.grad_accum))
    n_total = jnp.sum(outs["n"])
    grads = jax.tree.map(lambda g: g / jnp.maximum(n_total, 1.0), grad_sum)
    out = _combine(outs, n_total) | {"n": n_total}
  if m is not None:
    out |= {"range_map": m, "range_map_drift": drift,
            "head_rank": jnp.sum(jnp.any(m != 0, axis=0))}
  return out, grads


def objective_logits(hp, h, hc) -> jax.Array:
  """The logits the objective scores: of h V_r V_rᵀ under head.forward_rank (the projection held
  fixed, so that a jvp sees its derivative V_r V_rᵀ), else of h. The train step's own gradient
  passes h's cotangent straight through instead (`backward.projected`)."""
  if hc.forward_rank is not None:
    h = backward.truncate(h, jax.lax.stop_gradient(heads.matrix(hp)), hc.forward_rank)
  return heads.logits(hp, h, hc)


def realized_cosine(params, updates, batch, setup: Setup) -> jax.Array:
  """cos(−G, J_θ Δθ): −G against the first-order change of the logits that the update Δθ makes,
  from a jvp of the trunk and then of the head along Δθ, on the same batch (a micro-batch at a
  time with `train.grad_accum`, the head a token chunk at a time with `head.chunk_size`). Costs
  about one forward pass with tangents, through XLA's attention: the flash and cuDNN kernels have
  no forward-mode derivative."""
  hc, trunk = setup.head, dataclasses.replace(setup.model, attention="xla")
  hp, dhp = heads.params_of(params, hc), heads.params_of(updates, hc)

  def chunk_sums(x):
    h_CxD, dh_CxD, y_C, m_C = x
    z, dz = jax.jvp(lambda p, h: objective_logits(p, h, hc), (hp, h_CxD), (dhp, dh_CxD))
    g = jax.grad(cross_entropy)(z, y_C, m_C) * jnp.maximum(jnp.sum(m_C), 1.0)  # rows p − e_y
    dz = dz * m_C[:, None]
    return jnp.stack([jnp.sum(g * dz), jnp.sum(g * g), jnp.sum(dz * dz)])

  def micro_batch_sums(mb):
    h, dh = jax.jvp(lambda p: model.hidden(p, mb["inputs"], trunk), (params,), (updates,))
    n = mb["targets"].size
    size = min(hc.chunk_size or n, n)
    chunks = [token_chunks(x.reshape(n, *x.shape[2:]), size)
              for x in (h, dh, mb["targets"], mb["mask"])]
    return jnp.sum(jax.lax.map(chunk_sums, chunks), axis=0)

  sums = jax.lax.map(micro_batch_sums, micro_batches(batch, setup.grad_accum))
  gdz, gg, dzdz = jnp.sum(sums, axis=0)
  return -gdz / jnp.sqrt(jnp.maximum(gg * dzdz, jnp.finfo(jnp.float32).tiny))


def _check_mesh(setup: Setup) -> None:
  if setup.mesh is None:
    raise ValueError("the Setup has no mesh: place it on one (setup.on(mesh))")


def init_state(key, setup: Setup) -> tuple[TrainState, TrainState]:
  """A TrainState born sharded on the Setup's mesh, and the tree of its shardings."""
  _check_mesh(setup)
  return jax.jit(setup.new_state, out_shardings=setup.state_shardings)(key), setup.state_shardings


def make_train_step(setup: Setup, *, with_bottleneck: bool = True,
                    with_realized: bool | None = None, carry_range_map: bool = False):
  """step(state, batch) -> (state, metrics), jitted with explicit shardings; state donated.
  `with_realized` (default: `with_bottleneck`) adds bottleneck/realized_cosine, a forward pass
  with tangents. carry_range_map (bottleneck stats of a head that `carries_range_map`):
  step(state, batch, range_map) -> (state, metrics, range_map), W's range map refined from an
  earlier step's (None: computed afresh; `RangeMapCarry` decides)."""
  _check_mesh(setup)
  with_realized = with_bottleneck if with_realized is None else with_realized
  if carry_range_map and not (with_bottleneck and carries_range_map(setup)):
    raise ValueError("carry_range_map needs the bottleneck stats of a linear head (not mos, "
                     "feedback_alignment or train.alignment_weight > 0)")

  def step(state: TrainState, batch, range_map=None):
    out, grads = loss_and_grads(state.params, batch, setup, with_bottleneck, range_map)
    grad_norm = optax.tree.norm(grads)
    if setup.clip_norm > 0:
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, setup.clip_norm / (grad_norm + 1e-12)), grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": out["loss"], "accuracy": out["accuracy"], "grad_norm": grad_norm,
        "clipped_grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates), "learning_rate": setup.schedule(state.step),
    }
    finite = jnp.all(jnp.array([jnp.isfinite(metrics[k]) for k in GUARDED]))
    # A non-finite step leaves the state untouched; the loop sees the metric and stops.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=state.rng)
    metrics.update({k: out[k] for k in ("ortho_penalty", "alignment_loss") if k in out})
    metrics.update({f"bottleneck/{k}": out[k] for k in ("head_rank", "range_map_drift")
                    if k in out})
    if with_bottleneck:
      metrics.update(out["stats"].metrics())
    if with_realized:
      metrics["bottleneck/realized_cosine"] = realized_cosine(state.params, updates, batch, setup)
    metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
    return (new_state, metrics) + ((out["range_map"],) if carry_range_map else ())

  replicated = sharding.replicated(setup.mesh)
  carried = (replicated,) if carry_range_map else ()
  return jax.jit(sharding.traced_on(setup.mesh, step),
                 in_shardings=(setup.state_shardings, setup.batch_shardings) + carried,
                 out_shardings=(setup.state_shardings, replicated) + carried, donate_argnums=0)


class RangeMapCarry:
  """W's range map from metric step to metric step: refined (`bottleneck.refine_range_map`)
  while W has the largest rank it can have (so no direction can appear that the map misses)
  and the last refinement drifted at most MAX_DRIFT; else computed afresh."""

  MAX_DRIFT = 1.0

  def __init__(self, setup: Setup):
    self.rank_cap = setup.head.rank if setup.head.kind == "factorized" else None
    self.range_map, self.refinable = None, False

  def start(self):
    """The map to refine at the next metric step; None: compute it afresh."""
    return self.range_map if self.refinable else None

  def update(self, range_map) -> None:
    """The map a metric step returned (on the device: nothing waits for it)."""
    self.range_map = range_map

  def observe(self, metrics: dict) -> None:
    """A fetched metric step's host metrics: W's rank and the drift decide the next start."""
    if "bottleneck/head_rank" in metrics and self.range_map is not None:
      full = min(self.range_map.shape[1], self.rank_cap or self.range_map.shape[1])
      self.refinable = (int(metrics["bottleneck/head_rank"]) == full
                        and metrics["bottleneck/range_map_drift"] <= self.MAX_DRIFT)


def make_eval_step(setup: Setup):
  """eval_step(params, batch) -> {'loss', 'accuracy', 'n'}, with the train step's shardings:
  the plain mean CE (no loss options) of the full head (`objective_logits`)."""
  _check_mesh(setup)

  def evaluate(params, batch):
    h = model.hidden(params, batch["inputs"], setup.model)
    z = objective_logits(heads.params_of(params, setup.head), h, setup.head)
    return {"loss": cross_entropy(z, batch["targets"], batch["mask"]),
            "accuracy": accuracy(z, batch["targets"], batch["mask"]),
            "n": jnp.sum(batch["mask"]).astype(jnp.float32)}

  return jax.jit(sharding.traced_on(setup.mesh, evaluate),
                 in_shardings=(setup.state_shardings.params, setup.batch_shardings),
                 out_shardings=sharding.replicated(setup.mesh))
