"""Figures from sweep entries (summary.json) and runs' metrics.jsonl; matplotlib, Agg backend.

`lines` draws named (x, y) series with dashed baselines; `over_training` builds those series
from a sweep's entries: one curve per run. `save` writes PNG, SVG or PDF (`figures.format`).
"""

from collections.abc import Callable

import numpy as np
from etils import epath

from lmhead_jax.reporting import metrics


# Paul Tol's "muted" colours without the light cyan and sand (each ≥ 2.8:1 on white), then black:
# told apart with the common colour-vision deficiencies; the markers tell them apart in grey.
PALETTE = ("#332288", "#CC6677", "#117733", "#882255", "#44AA99", "#999933", "#AA4499", "#000000")
GRAY = "#666666"  # reference lines without a series of their own
FORMATS = ("png", "svg", "pdf")


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_format(cfg) -> str:
  """The figures' file format: `figures.format` of the config (png, svg or pdf), png when absent."""
  fmt = (cfg.get("figures") or {}).get("format", "png")
  if fmt not in FORMATS:
    raise ValueError(f"figures.format={fmt!r}: expected one of {', '.join(FORMATS)}")
  return fmt


def save(fig, path) -> epath.Path:
  """Writes `fig` to `path` (local or gs://) in the format its suffix names, then closes it."""
  path = epath.Path(path)
  fmt = path.suffix.lstrip(".")
  if fmt not in FORMATS:
    raise ValueError(f"figure {path}: unknown format {fmt!r}, expected one of {', '.join(FORMATS)}")
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    fig.savefig(f, format=fmt)
  pyplot().close(fig)
  return path


def lines(series: dict[str, tuple], path, *, xlabel: str, ylabel: str, title: str = "",
          logx: bool = False, logy: bool = False, markers: bool = True, connect: bool = True,
          reference: dict[str, tuple] | None = None, reference_label: str = "",
          errors: dict[str, np.ndarray] | None = None):
  """One line per named (x, y) series, saved at `path` (.png, .svg or .pdf).

  `connect=False` draws markers only: for one point per run, where a line would suggest values
  between the measured x. `reference` holds baselines, drawn dashed and not as data: one named
  like a series takes that series' colour, others are grey. The legend (inside the axes, where
  it covers the fewest points) names them all once, as `reference_label`. `errors` holds, per
  series, the half-widths of its error bars (e.g. 95% CIs; nan: none).
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100, layout="constrained")
  colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(series)}
  for i, (label, (x, y)) in enumerate(series.items()):
    ax.plot(x, y, marker="osv^Dx<>"[i % 8] if markers or not connect else None,
            ms=4 if connect else 6, lw=1.4, ls="-" if connect else "none", label=label,
            color=colors[label], gid=f"series:{label}")
    if label in (errors or {}):
      bars = ax.errorbar(x, y, yerr=np.asarray(errors[label], float), fmt="none", capsize=3,
                         lw=1, ecolor=colors[label])
      bars.lines[2][0].set_gid(f"series:{label}:errors")
  for label, (x, y) in (reference or {}).items():
    ax.plot(x, y, ls="--", lw=1.1, color=colors.get(label, GRAY), gid=f"reference:{label}")
  if reference:
    ax.plot([], [], ls="--", lw=1.1, color=GRAY, label=reference_label)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if series:
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
  return save(fig, path)


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
