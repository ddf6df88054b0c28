"""Figures from sweep entries (summary.json) and runs' metrics.jsonl; matplotlib, Agg backend.

`lines` draws named (x, y) series; `final_vs` and `over_training` build those series from a
sweep's entries: one point per run, or one curve per run.
"""

import math
from collections.abc import Callable

import numpy as np
from etils import epath

from lmhead_jax.reporting import runs as metrics


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def lines(series: dict[str, tuple], path, *, xlabel: str, ylabel: str, title: str = "",
          logx: bool = False, logy: bool = False, markers: bool = True):
  """One line per named (x, y) series, saved as a small PNG at `path`."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
  colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(series), 1)))
  for i, ((label, (x, y)), color) in enumerate(zip(series.items(), colors)):
    ax.plot(x, y, marker="osv^Dx"[i % 6] if markers else None, ms=4, lw=1.4, label=label,
            color=color)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if series:
    ax.legend(fontsize=7, frameon=False)
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def final_vs(entries: list[dict], x: str, y: str, label: Callable[[dict], str]) -> dict:
  """Series of y against x over the runs, one per label (sorted by x; runs without y skipped)."""
  groups: dict[str, list] = {}
  for e in entries:
    if _finite(e.get(x)) and _finite(e.get(y)):
      groups.setdefault(label(e), []).append((e[x], e[y]))
  return {k: tuple(np.array(v, float).T) for k, v in
          ((k, sorted(pts)) for k, pts in sorted(groups.items()))}


def over_training(workdir, entries: list[dict], y: str, label: Callable[[dict], str],
                  x: str = "step") -> dict:
  """Series of y against x from each run's DIR/<run>/metrics.jsonl, labelled by `label`."""
  out = {}
  for e in entries:
    path = epath.Path(workdir) / e["run"] / "metrics.jsonl"
    if path.exists():
      xs, ys = metrics.curve(metrics.read_metrics(path), y, x)
      if xs.size:
        out[label(e)] = (xs, ys)
  return out
