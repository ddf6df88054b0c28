"""Training-curve figures: baselines, palette, formats, legends."""

import math
import re

import numpy as np
import pytest
from helpers import SVG, svg_lines, write_jsonl

from lmhead_jax.reporting import plots


def test_figures_from_synthetic_runs(tmp_path):
  import matplotlib.image
  entries = [{"run": f"model.d_model={d}", "V/D": 4096 / d, "acc": a}
             for d, a in ((64, 1.0), (4, 0.0))]
  for d in (64, 4):
    write_jsonl(tmp_path / f"model.d_model={d}" / "metrics.jsonl",
                [{"step": s, "bottleneck/destroyed_ratio": 1 - s / (1000 * d)} for s in
                 range(50, 1501, 50)])
  curves = plots.over_training(tmp_path, entries, "bottleneck/destroyed_ratio",
                               lambda e: f"V/D={e['V/D']:g}")
  assert list(curves) == ["V/D=64", "V/D=1024"]
  np.testing.assert_array_equal(curves["V/D=1024"][0], np.arange(50, 1501, 50))
  np.testing.assert_allclose(curves["V/D=1024"][1], 1 - np.arange(50, 1501, 50) / 4000)
  final = {"adamw": (np.array([64.0, 1024.0]), np.array([1.0, 0.0]))}
  for name, series in (("curves.png", curves), ("final.png", final)):
    path = plots.lines(series, tmp_path / "fig" / name, xlabel="x", ylabel="y", logx=True)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(png) < 200_000
    assert matplotlib.image.imread(path).shape[:2] == (360, 650)


def _svg_texts(path) -> list[str]:
  import xml.etree.ElementTree as ET
  return ["".join(t.itertext()).strip() for t in ET.parse(path).iter(f"{SVG}text")]


def _contrast_on_white(color: str) -> float:
  """WCAG 2 contrast ratio of an sRGB colour against white."""
  c = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
  c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
  return 1.05 / (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2] + 0.05)


def test_palette_reads_on_white():
  assert _contrast_on_white("#FFFF00") < 1.1 and _contrast_on_white("#000000") == pytest.approx(21)
  assert all(_contrast_on_white(c) >= 2.8 for c in plots.PALETTE), [
      (c, round(_contrast_on_white(c), 2)) for c in plots.PALETTE]
  assert _contrast_on_white(plots.GRAY) >= 4.5
  assert len(set(plots.PALETTE)) == len(plots.PALETTE) >= 8


def test_lines_draws_baselines_dashed_at_their_height(tmp_path):
  import matplotlib
  series = {"a": ([1, 10], [0.2, 0.6]), "b": ([1, 10], [0.4, 0.8])}
  reference = {"a": ([1, 10], [0.5, 0.5]), "isotropic": ([1, 10], [0.7, 0.3])}
  with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as <text>, not glyph paths
    path = plots.lines(series, tmp_path / "f.svg", xlabel="x", ylabel="y", markers=False,
                       reference=reference, reference_label="√(1 − D/V)")
  got = svg_lines(path)
  assert sorted(got) == ["reference:a", "reference:isotropic", "series:a", "series:b"]
  # pixel y is affine in data y: fit it on series a's two points, check every other line
  y0, y1 = got["series:a"][1][:, 1]
  to_px = lambda v: y0 + (np.array(v) - 0.2) * (y1 - y0) / (0.6 - 0.2)
  np.testing.assert_allclose(got["series:b"][1][:, 1], to_px([0.4, 0.8]), atol=0.01)
  np.testing.assert_allclose(got["reference:a"][1][:, 1], to_px([0.5, 0.5]), atol=0.01)
  np.testing.assert_allclose(got["reference:isotropic"][1][:, 1], to_px([0.7, 0.3]), atol=0.01)
  style = {k: s for k, (s, _) in got.items()}
  assert all("stroke-dasharray" in style[k] for k in ("reference:a", "reference:isotropic"))
  assert not any("stroke-dasharray" in style[k] for k in ("series:a", "series:b"))
  assert style["reference:a"]["stroke"] == style["series:a"]["stroke"] == plots.PALETTE[0].lower()
  assert style["series:b"]["stroke"] == plots.PALETTE[1].lower()
  assert style["reference:isotropic"]["stroke"] == plots.GRAY.lower()
  texts = _svg_texts(path)  # the legend: each series once, the baselines once, by reference_label
  assert [texts.count(t) for t in ("a", "b", "√(1 − D/V)", "isotropic")] == [1, 1, 1, 0]


def test_lines_draws_error_bars_of_the_given_half_widths(tmp_path):
  import xml.etree.ElementTree as ET
  series = {"a": ([1, 2, 4], [0.2, 0.6, 0.4]), "b": ([1, 4], [0.3, 0.5])}
  path = plots.lines(series, tmp_path / "f.svg", xlabel="x", ylabel="y", connect=False,
                     errors={"a": [0.1, 0.05, np.nan]})
  groups = {g.get("id"): g for g in ET.parse(path).iter(f"{SVG}g") if g.get("id")}
  marks = [(float(u.get("x")), float(u.get("y"))) for u in groups["series:a"].iter(f"{SVG}use")]
  px = (marks[1][1] - marks[0][1]) / (0.6 - 0.2)  # pixels per unit of y
  bars = [np.array(re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", p.get("d") or ""), float)
          for p in groups["series:a:errors"].iter(f"{SVG}path")]
  bars = [b for b in bars if b.size]
  assert len(bars) == 2 and "series:b:errors" not in groups  # nan: no bar; b: none asked
  for (x, y), half, bar in zip(marks, (0.1, 0.05), bars):
    np.testing.assert_allclose(bar[:, 0], x, atol=0.01)  # vertical, at the point
    np.testing.assert_allclose(sorted(bar[:, 1]), sorted([y - half * px, y + half * px]),
                               atol=0.01)


def test_lines_colours_cycle_through_the_palette(tmp_path):
  series = {f"r={i}": ([1, 2], [i, i + 1]) for i in range(10)}
  got = svg_lines(plots.lines(series, tmp_path / "f.svg", xlabel="x", ylabel="y", markers=False))
  strokes = [got[f"series:r={i}"][0]["stroke"] for i in range(10)]
  palette = [c.lower() for c in plots.PALETTE]
  assert strokes == [palette[i % len(palette)] for i in range(10)]


def test_vector_formats_on_request(tmp_path):
  from ml_collections import ConfigDict
  series = {"a": ([1, 2], [3, 4])}
  for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")):
    path = plots.lines(series, tmp_path / f"f{suffix}", xlabel="x", ylabel="y")
    assert path.read_bytes().startswith(magic)
  with pytest.raises(ValueError, match=r"f\.jpg: unknown format 'jpg'"):
    plots.lines(series, tmp_path / "f.jpg", xlabel="x", ylabel="y")
  assert plots.figure_format(ConfigDict()) == "png"
  assert plots.figure_format(ConfigDict({"figures": {"format": "pdf"}})) == "pdf"
  with pytest.raises(ValueError, match=r"figures.format='eps': expected one of png, svg, pdf"):
    plots.figure_format(ConfigDict({"figures": {"format": "eps"}}))


def test_spamlang_destroyed_curves_draw_each_baseline(tmp_path):
  from experiments import spamlang
  entries = []
  for d in (64, 8):
    run = f"model.d_model={d}"
    write_jsonl(tmp_path / run / "metrics.jsonl",
                [{"step": s, "accuracy": s / 200, "bottleneck/destroyed_ratio": 0.9 + s / 2000}
                 for s in (50, 100)])
    entries.append({"run": run, "V": 512, "D": d, "V/D": 512 / d, "optimizer": "adamw",
                    "lr": 0.01, "tied": False, "coverage": 1.0, "eval/accuracy": 0.5})
  spamlang.report(tmp_path, entries, "svg")
  got = svg_lines(tmp_path / "destroyed_ratio_curves.svg")
  (y0, y1) = got["series:V/D=8"][1][:, 1]  # data 0.925 and 0.95
  to_px = lambda v: y0 + (v - 0.925) * (y1 - y0) / 0.025
  for d in (64, 8):
    style, xy = got[f"reference:V/D={512 // d}"]
    np.testing.assert_allclose(xy[:, 1], to_px(math.sqrt(1 - d / 512)), atol=0.01)
    assert "stroke-dasharray" in style
  assert {p.name for p in tmp_path.iterdir() if p.is_file()} == {
      "accuracy_vs_ratio.svg", "destroyed_ratio_curves.svg", "accuracy_curves.svg"}
  got = svg_lines(tmp_path / "accuracy_curves.svg")  # chance, 1/V, under each curve
  (y0, y1) = got["series:V/D=8"][1][:, 1]  # data 0.25 and 0.5
  to_px = lambda v: y0 + (v - 0.25) * (y1 - y0) / 0.25
  for d in (64, 8):
    np.testing.assert_allclose(got[f"reference:V/D={512 // d}"][1][:, 1], to_px(1 / 512),
                               atol=0.01)


def test_sparse_points_stand_alone_and_the_legend_sits_inside_the_axes(tmp_path):
  import xml.etree.ElementTree as ET
  series = {"a": ([1, 8], [0.9, 0.1]), "b": ([1, 8], [0.5, 0.4])}
  path = plots.lines(series, tmp_path / "f.svg", xlabel="V/D", ylabel="accuracy", connect=False,
                     reference={"chance": ([1, 8], [0.01, 0.01])}, reference_label="chance")
  root = ET.parse(path).getroot()
  groups = {g.get("id", ""): g for g in root.iter(f"{SVG}g")}
  for name in ("series:a", "series:b"):
    g = groups[name]
    assert len(list(g.iter(f"{SVG}use"))) == 2  # a marker at each point
    # no line between the points: no path with a segment spanning them
    spans = [np.ptp(np.array(re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", p.get("d")), float)[:, 0])
             for p in g.iter(f"{SVG}path") if re.search(r" L ", p.get("d"))]
    assert not any(s > 50 for s in spans), spans
  axes = groups["axes_1"]
  assert any(g.get("id", "").startswith("legend") for g in axes.iter(f"{SVG}g"))
