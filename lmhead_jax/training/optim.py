"""Optimizers and learning-rate schedules from the `optimizer` config group (optax)."""

import jax
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay."""
  if o.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={o.schedule!r} is not one of {SCHEDULES}")
  peak, warmup = float(o.learning_rate), int(o.warmup_steps)
  span = max(int(total_steps) - warmup, 1)
  decay = {
      "constant": lambda: optax.constant_schedule(peak),
      "cosine": lambda: optax.cosine_decay_schedule(peak, span, alpha=o.end_lr_fraction),
      "linear": lambda: optax.linear_schedule(peak, peak * o.end_lr_fraction, span),
  }[o.schedule]()
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(axes, decay_embeddings: bool):
  """Decay only matrices (≥ 2 logical axes besides 'layers'); embeddings only when asked."""
  def keep(path, a):
    is_embedding = path[0].key in ("embed", "pos_embed")
    return len([x for x in a if x != "layers"]) >= 2 and (decay_embeddings or not is_embedding)
  return jax.tree_util.tree_map_with_path(keep, axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(o, total_steps: int, axes) -> tuple[optax.GradientTransformation,
                                                       optax.Schedule]:
  """The update rule (clipping is applied by the train step, so it can report both norms)."""
  if o.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={o.name!r} is not one of {OPTIMIZERS}")
  schedule = make_schedule(o, total_steps)
  mask = decay_mask(axes, o.decay_embeddings)
  if o.name == "adamw":
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                     optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  return tx, schedule
