"""Reading metrics back, tokens-to-target, tables, and figures from synthetic runs."""

import json
import math

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
    assert matplotlib.image.imread(path).shape[:2] == (360, 550)
