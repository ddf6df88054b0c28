"""The divergence guard on hand-built loss sequences: rising above factor × the running minimum,
pinned at ln V without gradient, patience, one message per streak, NaN."""

import math

from lmhead_jax.runs import divergence, experiment
from lmhead_jax.runs.divergence import Guard

V = 1000
LOG_V = math.log(V)


def feed(guard, losses, grad_norm=1.0):
  """{step: message} for the steps (from 1) where the guard fired."""
  out = {}
  for step, loss in enumerate(losses, start=1):
    if message := guard.update(step, loss, grad_norm):
      out[step] = message
  return out


def test_rising_loss_fires_after_patience_steps():
  # Running minimum 2.0 at step 4; 3 × 2.0 = 6.0; steps 5-7 are above it.
  fired = feed(Guard(3.0, 3, V), [5.0, 4.0, 3.0, 2.0, 7.0, 6.5, 1170.0])
  assert fired == {7: (
      "step 7: loss 1170 has been above train.divergence_factor=3 × its running minimum 2 "
      "(step 4) for 3 consecutive checked steps: the run is diverging. Lower "
      "optimizer.learning_rate, or change train.divergence_factor / train.divergence_patience, "
      "or set train.divergence_action='off'")}


def test_the_threshold_is_factor_times_the_running_minimum():
  assert feed(Guard(3.0, 2, V), [2.0, 6.0, 6.0, 6.0]) == {}  # 6.0 is not above 3 × 2.0
  assert list(feed(Guard(3.0, 2, V), [2.0, 6.01, 6.01])) == [3]
  assert list(feed(Guard(2.0, 2, V), [2.0, 4.01, 4.01])) == [3]


def test_a_recovery_resets_the_count():
  guard = Guard(3.0, 3, V)
  assert feed(guard, [2.0, 7.0, 7.0, 5.0, 7.0, 7.0]) == {}  # 5.0 <= 6.0 breaks the streak
  assert guard.update(7, 7.0, 1.0) is not None  # the third consecutive step


def test_fires_once_per_streak_and_again_after_a_recovery():
  losses = [2.0] + [7.0] * 10 + [2.5] + [7.0] * 3
  assert list(feed(Guard(3.0, 2, V), losses)) == [3, 14]


def test_factor_zero_checks_only_the_pinned_loss():
  assert feed(Guard(0.0, 2, V), [2.0, 100.0, 1e6, 1e9]) == {}
  assert list(feed(Guard(0.0, 2, V), [2.0, LOG_V, LOG_V], grad_norm=0.0)) == [3]


def test_pinned_at_log_v_without_gradient_fires():
  guard = Guard(3.0, 3, V)
  fired = [guard.update(s, LOG_V * (1 + 5e-5), 1e-9) for s in (1, 2, 3)]
  assert fired[:2] == [None, None]
  assert fired[2] == (  # ln 1000 = 6.907755
      "step 3: loss 6.9081 has sat at ln(model.vocab_size=1000) = 6.90776 (uniform predictions) "
      "with grad_norm 1e-09 < 1e-08 for 3 consecutive checked steps, running minimum 6.9081 "
      "(step 1): the model no longer learns. Lower optimizer.learning_rate, or change "
      "train.divergence_patience, or set train.divergence_action='off'")


def test_pinned_needs_both_the_loss_at_log_v_and_no_gradient():
  assert feed(Guard(3.0, 2, V), [LOG_V] * 5, grad_norm=1e-7) == {}  # a gradient: learning
  assert feed(Guard(3.0, 2, V), [LOG_V * (1 + 2e-4)] * 5, grad_norm=0.0) == {}  # not at ln V
  assert feed(Guard(3.0, 2, V), [LOG_V] * 5, grad_norm=math.nan) == {}
  assert list(feed(Guard(3.0, 2, V), [LOG_V * (1 - 9e-5)] * 3, grad_norm=0.0)) == [2]


def test_nan_loss_counts_as_diverging_and_leaves_the_minimum():
  guard = Guard(3.0, 3, V)
  fired = feed(guard, [2.0, math.nan, math.inf, math.nan])
  assert list(fired) == [4]
  assert fired[4].startswith("step 4: loss nan has been above train.divergence_factor=3 × its "
                             "running minimum 2 (step 1)")
  assert guard.update(5, 5.9, 1.0) is None and guard.streak == 0  # recovered: 5.9 <= 3 × 2.0


def test_the_reported_runs_are_caught_with_the_defaults():
  """AdamW lr=10: loss up to 1170 by step 60; SGD lr=1000: exactly ln V with no gradient."""
  cfg = experiment.base_config()
  cfg.model.vocab_size = V
  rising = [7.0 - 0.1 * s for s in range(10)] + [6.1 * 1.1 ** s for s in range(1, 51)]
  first_above = next(i for i, x in enumerate(rising, start=1) if x > 3 * 6.1)
  assert list(feed(Guard.from_config(cfg), rising)) == [first_above + 19]
  assert list(feed(Guard.from_config(cfg), [LOG_V] * 30, grad_norm=0.0)) == [20]


def test_from_config():
  cfg = experiment.base_config()
  guard = Guard.from_config(cfg)
  assert (guard.factor, guard.patience, guard.vocab_size) == (3.0, 20, 1024)
  assert cfg.train.divergence_action == "warn" and divergence.ACTIONS == ("warn", "stop", "off")
  cfg.train.update(divergence_factor=5.0, divergence_patience=4, divergence_action="stop")
  assert (Guard.from_config(cfg).factor, Guard.from_config(cfg).patience) == (5.0, 4)
  cfg.train.divergence_action = "off"
  assert Guard.from_config(cfg) is None


def test_a_spike_near_zero_loss_is_not_diverging():
  """Measured on the README's demo (SGD-momentum, V/D=64): 0.0097 -> 0.33 for 20 steps, then
  0.002; three times a tiny minimum is no divergence, one nat above it is."""
  assert feed(Guard(3.0, 2, V), [0.0097] + [0.33] * 20 + [0.002]) == {}
  assert list(feed(Guard(3.0, 2, V), [0.0097, 1.02, 1.02])) == [3]
