"""Reading runs back: metrics.jsonl, curves, tokens-to-target, speed-ups, tables."""

import math

import numpy as np
import pytest
from helpers import write_jsonl

from lmhead_jax.reporting import metrics


def test_read_metrics_keeps_the_last_record_of_each_step(tmp_path):
  # A run resumed from step 2 logs steps 3 and 4 again.
  write_jsonl(tmp_path / "m.jsonl", [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)]
              + [{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}, {"step": 5, "loss": 0.1}])
  records = metrics.read_metrics(tmp_path / "m.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 0.5),
                                                      (4, 0.25), (5, 0.1)]


def test_read_metrics_names_a_bad_line(tmp_path):
  (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"loss": 2}\n')
  with pytest.raises(ValueError, match=r"m.jsonl:2"):
    metrics.read_metrics(tmp_path / "m.jsonl")


def test_read_metrics_names_the_file_of_binary_garbage(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1}\n\xff\xfe\x00garbage\n')
  with pytest.raises(ValueError, match=rf"{path}:2: not a metrics record"):
    metrics.read_metrics(path)


def test_curve_skips_missing_and_nonfinite_values():
  records = [{"step": 1, "tokens_seen": 10, "eval/loss": 3.0}, {"step": 2, "tokens_seen": 20},
             {"step": 3, "tokens_seen": 30, "eval/loss": float("nan")},
             {"step": 4, "tokens_seen": 40, "eval/loss": 2.0}]
  x, y = metrics.curve(records, "eval/loss", "tokens_seen")
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
  got = metrics.tokens_to_target(np.array(x), np.array(y), target)
  assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12)


def test_mean_curve_averages_seeds_on_their_common_prefix():
  """A run cut short (a resumed or diverged seed) limits the mean to the steps all runs have."""
  x, y = metrics.mean_curve([(np.array([1.0, 2.0, 3.0]), np.array([4.0, 2.0, 1.0])),
                             (np.array([1.0, 2.0]), np.array([6.0, 3.0]))])
  np.testing.assert_array_equal(x, [1.0, 2.0])
  np.testing.assert_array_equal(y, [5.0, 2.5])


def test_markdown_table():
  rows = [{"a": 1, "b": 0.123456}, {"a": 2, "b": None}]
  text = metrics.markdown_table(rows, {"A": lambda r: r["a"], "B x2": lambda r: r["b"]})
  assert text == "| A | B x2 |\n|---|---|\n| 1 | 0.1235 |\n| 2 |  |"


def test_run_curve_reads_a_sweep_runs_metrics(tmp_path):
  (tmp_path / "rank=4").mkdir()
  (tmp_path / "rank=4" / "metrics.jsonl").write_text(
      '{"step": 1, "tokens_seen": 10, "loss": 5.0}\n'
      '{"step": 2, "tokens_seen": 20, "loss": 4.0, "eval/loss": 4.5}\n')
  x, y = metrics.run_curve(tmp_path, {"run": "rank=4"})
  np.testing.assert_array_equal(x, [20.0])
  np.testing.assert_array_equal(y, [4.5])
  x, y = metrics.run_curve(tmp_path, {"run": "rank=4"}, "loss", "step")
  np.testing.assert_array_equal(x, [1.0, 2.0])
