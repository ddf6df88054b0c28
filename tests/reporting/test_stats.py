"""reporting.stats against scipy: the Student-t interval and the paired t-test."""

import math

import numpy as np
import scipy.stats

from lmhead_jax.reporting import stats


def test_summary_is_scipys_t_interval_over_finite_values():
  x = [2.0, 3.5, None, 2.75, math.nan, 4.0]
  s = stats.summary(x)
  finite = [2.0, 3.5, 2.75, 4.0]
  lo, hi = scipy.stats.t.interval(0.95, 3, loc=np.mean(finite), scale=scipy.stats.sem(finite))
  assert s["n"] == 4 and s["values"] == [2.0, 3.5, None, 2.75, None, 4.0]
  np.testing.assert_allclose(s["mean"], (lo + hi) / 2, rtol=1e-12)
  np.testing.assert_allclose(s["ci95"], (hi - lo) / 2, rtol=1e-12)
  assert stats.text(s) == f"{s['mean']:.4g} ± {s['ci95']:.2g} (4/6 seeds)"
  one = stats.summary([1.5])
  assert one["ci95"] is None and stats.text(one) == "1.5"
  assert stats.text(stats.summary([None])) == "not reached"


def test_paired_matches_scipys_ttest_rel_on_common_seeds():
  a = {0: 3.1, 1: 2.9, 2: 3.4, 3: 3.0, 4: None}
  b = {0: 2.8, 1: 2.85, 2: 3.0, 3: 2.6, 5: 1.0}
  p = stats.paired(a, b)
  x, y = [3.1, 2.9, 3.4, 3.0], [2.8, 2.85, 3.0, 2.6]
  t = scipy.stats.ttest_rel(x, y)
  ci = t.confidence_interval(0.95)
  assert p["seeds"] == [0, 1, 2, 3] and p["n"] == 4
  assert p["values"][4:] == [None, None] and stats.text(p).endswith(" (4/6 seeds)")
  np.testing.assert_allclose(p["mean"], (ci.low + ci.high) / 2, rtol=1e-12)
  np.testing.assert_allclose(p["ci95"], (ci.high - ci.low) / 2, rtol=1e-12)
  np.testing.assert_allclose(p["p"], t.pvalue, rtol=1e-12)
  # paired is tighter than unpaired when the seeds share their noise
  assert p["ci95"] < stats.summary(x)["ci95"] + stats.summary(y)["ci95"]
  assert stats.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})["p"] is None  # equal differences
