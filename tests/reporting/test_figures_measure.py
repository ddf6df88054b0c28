"""The measurement experiments' figures."""

import math

import numpy as np
from helpers import svg_lines

from lmhead_jax.reporting import plots


def _spectrum_results():
  points = [{"tokens": n, "numerical_rank_fine": min(n, 512), "numerical_rank": min(n, 500),
             "effective_rank": n / 10, "k_999": n / 4, "k_70": n / 50,
             "residual_2d": r} for n, r in ((100, None), (1000, 0.6), (10000, 0.4))]
  return [{"name": "m", "vocab_size": 512, "d_model": 16, "points": points},
          {"name": "n", "vocab_size": 1024, "d_model": 32, "points": points}]


def test_spectrum_plots_residual_2d_and_its_legend_covers_no_panel():
  from lmhead_jax.reporting import figures_measure
  fig = figures_measure._spectrum_figure(_spectrum_results())
  fig.canvas.draw()
  [legend] = fig.legends
  box = legend.get_window_extent()
  assert fig.axes and not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
  for ax in fig.axes[2:]:  # the bottom row
    [line] = [l for l in ax.get_lines() if l.get_label().startswith("residual_2d")]
    np.testing.assert_array_equal(line.get_ydata(), [np.nan, 0.6, 0.4])
  labels = [t.get_text() for t in legend.get_texts()]
  assert "V" in labels and "2D" in labels and any(t.startswith("residual_2d") for t in labels)
  plots.pyplot().close(fig)


def test_measure_figure_draws_baselines_dashed(tmp_path):
  from lmhead_jax.reporting import figures_measure
  ci = lambda m: {"mean": m, "ci95": 0.01}
  results = [{"name": n, "d_model": d, "vocab_size": v, "baseline": math.sqrt(1 - d / v),
              "destroyed_ratio": ci(0.9), "token_destroyed_ratio": ci(0.8)}
             for n, d, v in (("a", 64, 512), ("b", 16, 4096), ("c", 256, 512))]
  figures_measure.destroyed(results, tmp_path / "m.svg")
  got = svg_lines(tmp_path / "m.svg")
  refs = [got[k] for k in ("reference", "reference#1", "reference#2")]
  assert all("stroke-dasharray" in style for style, _ in refs) and "reference#3" not in got
  heights = [xy[0, 1] for _, xy in refs]  # pixel y grows downwards
  assert np.argsort(heights).tolist() == np.argsort([-r["baseline"] for r in results]).tolist()
