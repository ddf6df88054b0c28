"""Optimizers and learning-rate schedules (optax) from a typed OptimizerConfig."""

import dataclasses

import jax
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The `optimizer` config group; clipping (`clip_norm`, 0 = off) is the train step's."""

  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  end_lr_fraction: float = 0.0
  weight_decay: float = 0.0
  decay_embeddings: bool = False
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  momentum: float = 0.9  # sgd; 0: plain SGD
  nesterov: bool = False
  clip_norm: float = 0.0

  def __post_init__(self):
    for key, choices in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
      if getattr(self, key) not in choices:
        raise ValueError(f"optimizer.{key}={getattr(self, key)!r} is not one of {choices}")


def make_schedule(o: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then constant, cosine or linear decay."""
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


def make_optimizer(o: OptimizerConfig, total_steps: int, axes) -> tuple[
    optax.GradientTransformation, optax.Schedule]:
  """The update rule (clipping is applied by the train step, so it can report both norms)."""
  schedule = make_schedule(o, total_steps)
  mask = decay_mask(axes, o.decay_embeddings)
  if o.name == "adamw":
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask),
                     optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
  return tx, schedule
