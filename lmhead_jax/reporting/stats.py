"""Statistics over seeds: mean ± 95% CI (Student t) and paired differences (same seed).

`summary` keeps every seed's value (None: not reached or diverged) and counts the finite ones;
`paired` takes per-seed values of two settings and summarizes their differences on the seeds
that both have (counting the others as missing), with the paired t-test's p-value; `text`
writes either as "mean ± CI".
"""

import math

import scipy.stats

from lmhead_jax.analysis.measure import ci95


def _finite(v) -> bool:
  return v is not None and math.isfinite(v)


def summary(values) -> dict:
  """mean, sd, ci95 (half-width) and n over the finite values; `values` keeps every one."""
  kept = [float(v) if _finite(v) else None for v in values]
  finite = [v for v in kept if v is not None]
  return {"values": kept, **(ci95(finite) if finite else dict(mean=None, sd=None, ci95=None, n=0))}


def paired(a: dict, b: dict) -> dict:
  """`summary` of a[seed] − b[seed] over the seeds of either (None where one is missing or not
  finite, so `text` says how many pair), `seeds`: those that pair, and p, the two-sided paired
  t-test's p-value (None below 2 pairs or when every difference is equal)."""
  both = lambda s: _finite(a.get(s)) and _finite(b.get(s))
  every = list(a) + [s for s in b if s not in a]
  seeds = [s for s in every if both(s)]
  out = summary(float(a[s]) - float(b[s]) if both(s) else None for s in every)
  out |= {"seeds": seeds, "p": None}
  diffs = [d for d in out["values"] if d is not None]
  if len(diffs) > 1 and len(set(diffs)) > 1:
    out["p"] = float(scipy.stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
  return out


def text(s: dict, digits: int = 4) -> str:
  """"mean ± CI", with how many seeds count when some have no value."""
  if s["mean"] is None:
    return "not reached"
  out = f"{s['mean']:.{digits}g}" + (f" ± {s['ci95']:.2g}" if s["ci95"] is not None else "")
  return out + (f" ({s['n']}/{len(s['values'])} seeds)" if s["n"] < len(s["values"]) else "")
