"""Reading runs back: metrics.jsonl, curves, tokens-to-target, tables."""

import json
import math
from collections.abc import Callable

import numpy as np
from etils import epath


def read_metrics(path) -> list[dict]:
  """The records of a metrics.jsonl by step; the last record of a step wins (as on resume)."""
  by_step = {}
  lines = epath.Path(path).read_bytes().split(b"\n")
  for n, line in enumerate(lines, 1):
    if line.strip():
      try:
        record = json.loads(line)
        by_step[int(record["step"])] = record
      except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}:{n}: not a metrics record with a 'step' ({e!r})") from None
  return [by_step[s] for s in sorted(by_step)]


def curve(records: list[dict], y: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
  """(x, y) over the records that hold a finite `y`."""
  pts = [(r[x], r[y]) for r in records
         if isinstance(r.get(y), (int, float)) and math.isfinite(r[y])]
  return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def run_curve(workdir, entry: dict, y: str = "eval/loss",
              x: str = "tokens_seen") -> tuple[np.ndarray, np.ndarray]:
  """`curve` of the sweep run `entry["run"]` from its WORKDIR/<run>/metrics.jsonl (by default
  the held-out loss against tokens)."""
  return curve(read_metrics(f"{workdir}/{entry['run']}/metrics.jsonl"), y, x)


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """The mean y over runs that log at the same x (seeds of one setting), on their common prefix."""
  n = min(len(x) for x, _ in curves)
  return curves[0][0][:n], np.mean([y[:n] for _, y in curves], axis=0)


def tokens_to_target(x: np.ndarray, y: np.ndarray, target: float) -> float:
  """The first x at which the curve y(x) reaches `target` (y <= target), linearly
  interpolated between the logged points around the crossing; nan if it never does."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  hit = np.flatnonzero(y <= target)
  if not hit.size:
    return math.nan
  i = int(hit[0])
  if i == 0:
    return float(x[0])
  x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
  return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))


def markdown_table(rows: list[dict], columns: dict[str, Callable[[dict], object]]) -> str:
  """A markdown table: one line per row, one column per (header, row -> value)."""
  def cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(f(r)) for f in columns.values()) + " |" for r in rows]
  return "\n".join(lines)

