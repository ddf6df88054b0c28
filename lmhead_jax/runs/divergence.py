"""A guard against training runs that go wrong without a NaN, from each step's loss and grad_norm.

Two conditions count, each for `train.divergence_patience` consecutive checked steps:
- rising: the loss is above `train.divergence_factor` × its running minimum and at least
  MARGIN (1 nat) above it (a non-finite loss counts too): near a loss of 0, a factor alone
  flags harmless spikes (a SpamLang run that learns went from 0.0097 to 0.33 and back); factor 0
  turns this one off;
- pinned: the loss is within 1e-4 (relative) of ln V, the loss of uniform predictions, with
  grad_norm < 1e-8: the model predicts uniformly and receives no gradient.

Fired once, the guard stays silent until a step meets neither condition (a recovery), which
re-arms it: one message per episode, not one per step. `train.divergence_action` says what the
runner does with the message: 'warn' (log it), 'stop' (end the run) or 'off' (no guard).
"""

import math

ACTIONS = ("warn", "stop", "off")
MARGIN = 1.0  # nats above the running minimum that a rising loss must also exceed
PINNED_RTOL = 1e-4  # relative distance of the loss from ln V
PINNED_GRAD_NORM = 1e-8


class Guard:
  """Feed it every checked step's host metrics with `update`; it returns a message when one
  condition has held for `patience` consecutive steps."""

  def __init__(self, factor: float, patience: int, vocab_size: int):
    self.factor, self.patience, self.vocab_size = float(factor), int(patience), int(vocab_size)
    self.log_v = math.log(vocab_size)
    self.best, self.best_step = math.inf, None  # the running minimum of the finite losses
    self.streak = 0  # consecutive steps meeting a condition
    self.fired = False  # fired during this streak

  @classmethod
  def from_config(cls, cfg) -> "Guard | None":
    """The guard of the `train.divergence_*` keys; None when train.divergence_action='off'."""
    if cfg.train.divergence_action == "off":
      return None
    return cls(cfg.train.divergence_factor, cfg.train.divergence_patience,
               cfg.model.vocab_size)

  def update(self, step: int, loss: float, grad_norm: float) -> str | None:
    """The message when a condition has held for `patience` consecutive steps (once per streak),
    else None."""
    loss, grad_norm = float(loss), float(grad_norm)
    rising = self.factor > 0 and not loss <= max(self.factor * self.best, self.best + MARGIN)
    pinned = (abs(loss - self.log_v) <= PINNED_RTOL * self.log_v
              and grad_norm < PINNED_GRAD_NORM)
    if math.isfinite(loss) and loss < self.best:
      self.best, self.best_step = loss, step
    if not (rising or pinned):
      self.streak, self.fired = 0, False
      return None
    self.streak += 1
    if self.fired or self.streak < self.patience:
      return None
    self.fired = True
    held = f"for {self.patience} consecutive checked steps"
    best = f"running minimum {self.best:.6g} (step {self.best_step})"
    if pinned:
      return (f"step {step}: loss {loss:.6g} has sat at ln(model.vocab_size={self.vocab_size}) = "
              f"{self.log_v:.6g} (uniform predictions) with grad_norm {grad_norm:.3g} < "
              f"{PINNED_GRAD_NORM:g} {held}, {best}: the model no longer learns. Lower "
              "optimizer.learning_rate, or change train.divergence_patience, or set "
              "train.divergence_action='off'")
    return (f"step {step}: loss {loss:.6g} has been above train.divergence_factor="
            f"{self.factor:g} × its {best} {held}: the run is diverging. Lower "
            "optimizer.learning_rate, or change train.divergence_factor / "
            "train.divergence_patience, or set train.divergence_action='off'")
