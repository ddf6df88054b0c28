"""Reading metrics back, tokens-to-target, tables, and figures from synthetic runs."""

import json
import math
import re

import numpy as np
import pytest

from lmhead_jax.reporting import plots, runs


def write_jsonl(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
  # A run resumed from step 2 logs steps 3 and 4 again.
  write_jsonl(tmp_path / "m.jsonl", [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)]
              + [{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}, {"step": 5, "loss": 0.1}])
  records = runs.read_metrics(tmp_path / "m.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 0.5),
                                                      (4, 0.25), (5, 0.1)]


def test_read_metrics_names_a_bad_line(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"loss": 2}\n')
  with pytest.raises(ValueError, match=r"m.jsonl:2"):
    runs.read_metrics(tmp_path / "m.jsonl")


def test_read_metrics_names_the_file_of_binary_garbage(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1}\n\xff\xfe\x00garbage\n')
  with pytest.raises(ValueError, match=rf"{path}:2: not a metrics record"):
    runs.read_metrics(path)


def test_curve_skips_missing_and_nonfinite_values():
  records = [{"step": 1, "tokens_seen": 10, "eval/loss": 3.0}, {"step": 2, "tokens_seen": 20},
             {"step": 3, "tokens_seen": 30, "eval/loss": float("nan")},
             {"step": 4, "tokens_seen": 40, "eval/loss": 2.0}]
  x, y = runs.curve(records, "eval/loss", "tokens_seen")
  np.testing.assert_array_equal(x, [10, 40])
  np.testing.assert_array_equal(y, [3.0, 2.0])


@pytest.mark.parametrize("x,y,target,want", [
    ([10, 20, 30, 40], [5, 4, 2, 1], 3.0, 25.0),  # 20 + 10 * (4 - 3) / (4 - 2)
    ([10, 20, 30, 40], [5, 4, 2, 1], 2.0, 30.0),  # reached exactly at a logged point
    ([10, 20, 30, 40], [5, 4, 2, 1], 6.0, 10.0),  # already below at the first point
    ([10, 20, 30, 40], [5, 3, 4, 2], 3.5, 17.5),  # the first crossing counts
    ([0, 100], [1.0, 0.2], 0.8, 25.0),
    ([10, 20, 30, 40], [5, 4, 2, 1], 0.5, math.nan)])  # never reached
def test_tokens_to_target_interpolates_the_first_crossing(x, y, target, want):
  got = runs.tokens_to_target(np.array(x), np.array(y), target)
  assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12)


def test_speedups_against_the_lowest_rank():
  curves = {"r=4": (np.array([100, 200, 300, 400]), np.array([6.0, 5.0, 4.5, 4.0])),
            "r=8": (np.array([100, 200, 300, 400]), np.array([6.0, 4.5, 3.5, 3.0])),
            "r=16": (np.array([100, 200, 300, 400]), np.array([5.0, 3.0, 2.5, 2.0])),
            "r=2": (np.array([100, 200, 300, 400]), np.array([7.0, 6.0, 5.0, 4.5]))}
  out = runs.speedups(curves, "r=4")
  assert out["r=4"] == {"target": 4.0, "tokens_to_target": 400.0, "speedup": 1.0}
  # r=8 crosses 4.0 between 200 (4.5) and 300 (3.5): 250 tokens; 400 / 250 = 1.6.
  assert out["r=8"]["tokens_to_target"] == pytest.approx(250.0)
  assert out["r=8"]["speedup"] == pytest.approx(1.6)
  # r=16 crosses between 100 (5.0) and 200 (3.0): 150 tokens; 400 / 150.
  assert out["r=16"]["tokens_to_target"] == pytest.approx(150.0)
  assert out["r=16"]["speedup"] == pytest.approx(400 / 150)
  assert math.isnan(out["r=2"]["tokens_to_target"]) and math.isnan(out["r=2"]["speedup"])


def test_markdown_table():
  rows = [{"a": 1, "b": 0.123456}, {"a": 2, "b": None}]
  text = runs.markdown_table(rows, {"A": lambda r: r["a"], "B x2": lambda r: r["b"]})
  assert text == "| A | B x2 |\n|---|---|\n| 1 | 0.1235 |\n| 2 |  |"


def test_final_vs_groups_and_sorts_runs():
  entries = [{"V/D": 64.0, "acc": 1.0, "opt": "adamw"}, {"V/D": 16.0, "acc": 0.5, "opt": "adamw"},
             {"V/D": 64.0, "acc": 0.2, "opt": "sgd"}, {"V/D": 32.0, "opt": "sgd"},
             {"V/D": 16.0, "acc": float("nan"), "opt": "sgd"}]
  series = plots.final_vs(entries, "V/D", "acc", lambda e: e["opt"])
  assert list(series) == ["adamw", "sgd"]
  np.testing.assert_array_equal(series["adamw"][0], [16.0, 64.0])
  np.testing.assert_array_equal(series["adamw"][1], [0.5, 1.0])
  np.testing.assert_array_equal(series["sgd"][0], [64.0])


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
  for name, series in (("curves.png", curves),
                       ("final.png", plots.final_vs(entries, "V/D", "acc", lambda e: "adamw"))):
    path = plots.lines(series, tmp_path / "fig" / name, xlabel="x", ylabel="y", logx=True)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 2_000 < len(png) < 200_000
    assert matplotlib.image.imread(path).shape[:2] == (360, 650)


SVG = "{http://www.w3.org/2000/svg}"


def _svg_lines(path) -> dict:
  """{gid: (style dict, [[x, y], ...] in pixels)} of the SVG's paths in groups named series:* or
  reference*, as matplotlib wrote them."""
  import xml.etree.ElementTree as ET
  out = {}
  for g in ET.parse(path).iter(f"{SVG}g"):
    gid = g.get("id", "")
    if gid.startswith(("series:", "reference")):
      for i, p in enumerate(g.iter(f"{SVG}path")):
        style = dict(kv.split(": ") for kv in p.get("style").split("; "))
        xy = re.findall(r"[ML] (-?[\d.]+) (-?[\d.]+)", p.get("d"))
        out[gid if i == 0 else f"{gid}#{i}"] = (style, np.array(xy, float))
  return out


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
  got = _svg_lines(path)
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


def test_lines_colours_cycle_through_the_palette(tmp_path):
  series = {f"r={i}": ([1, 2], [i, i + 1]) for i in range(10)}
  got = _svg_lines(plots.lines(series, tmp_path / "f.svg", xlabel="x", ylabel="y", markers=False))
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
  got = _svg_lines(tmp_path / "destroyed_ratio_curves.svg")
  (y0, y1) = got["series:V/D=8"][1][:, 1]  # data 0.925 and 0.95
  to_px = lambda v: y0 + (v - 0.925) * (y1 - y0) / 0.025
  for d in (64, 8):
    style, xy = got[f"reference:V/D={512 // d}"]
    np.testing.assert_allclose(xy[:, 1], to_px(math.sqrt(1 - d / 512)), atol=0.01)
    assert "stroke-dasharray" in style
  assert {p.name for p in tmp_path.iterdir() if p.is_file()} == {
      "accuracy_vs_ratio.svg", "destroyed_ratio_curves.svg", "accuracy_curves.svg"}
  got = _svg_lines(tmp_path / "accuracy_curves.svg")  # chance, 1/V, under each curve
  (y0, y1) = got["series:V/D=8"][1][:, 1]  # data 0.25 and 0.5
  to_px = lambda v: y0 + (v - 0.25) * (y1 - y0) / 0.25
  for d in (64, 8):
    np.testing.assert_allclose(got[f"reference:V/D={512 // d}"][1][:, 1], to_px(1 / 512),
                               atol=0.01)


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
  got = _svg_lines(tmp_path / "m.svg")
  refs = [got[k] for k in ("reference", "reference#1", "reference#2")]
  assert all("stroke-dasharray" in style for style, _ in refs) and "reference#3" not in got
  heights = [xy[0, 1] for _, xy in refs]  # pixel y grows downwards
  assert np.argsort(heights).tolist() == np.argsort([-r["baseline"] for r in results]).tolist()


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
