"""experiments/head_lab.py: presets, the summaries against hand-computed numbers, the smoke run."""

import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from experiments import head_lab
import helpers
from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.reporting import stats
from lmhead_jax.tools import plan
from lmhead_jax.runs import experiment, grid


def t_ci(values) -> float:
  x = np.asarray(values, np.float64)
  return float(scipy.stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_every_method_builds_and_validates(preset):
  cfg = head_lab.get_config(preset)
  todo = head_lab.tasks(cfg)
  assert list(todo) == (["lm"] if preset == "paper" else ["spamlang", "lm"])
  for task in todo.values():
    experiment.validate_experiment(task)
    runs = grid.expand(task.sweep)
    methods = {o["method"] for o in runs}
    assert methods == (set(head_lab.METHODS) if preset != "smoke" else {"baseline", "whitened"})
    for overrides in runs:
      run_cfg = grid.configure(task, overrides)
      experiment.configs(run_cfg)  # the model and head configs build
      for key, value in head_lab.METHODS[overrides["method"]].items():
        group, leaf = key.split(".")
        assert run_cfg[group][leaf] == value
      assert head_lab.describe(run_cfg)["method"] == overrides["method"]
  if preset == "paper":  # the 2B trunk at two head ranks; mos has none
    ranks = {(o["method"], o.get("head.rank")) for o in grid.expand(cfg.sweep)}
    assert ("baseline", 4096) in ranks and ("whitened", 256) in ranks and ("mos", None) in ranks
    assert cfg.model.d_model == 4096 and cfg.head.chunk_size is None
  if preset == "cpu":
    assert len(grid.expand(cfg.spamlang.sweep)) == 6 * 5 * 2 * 4  # methods, seeds, D, lr
    assert len(grid.expand(cfg.sweep)) == 6 * 5 * 4  # methods, seeds, lr
    seeds = [o["seed"] for o in grid.expand(cfg.sweep)]
    assert seeds == sorted(seeds)  # seed by seed


def test_paper_preset_plans_on_a_v5p_slice():
  rows = plan.plan_sweep(head_lab.get_config("paper"), "v5p-64")
  assert len(rows) == 5 * 2 + 1 + 1  # five methods at two ranks, mos once, the total
  assert all(r["fits"] for r in rows[:-1])
  assert {r["params"] for r in rows[:-1] if "rank=4096" in r["run"]} == {2_030_096_384}


def test_unknown_preset_names_it():
  with pytest.raises(ValueError, match="'tpu' for experiments/head_lab.py"):
    head_lab.get_config("tpu")


def test_spamlang_summary_from_runs(tmp_path):
  """Seed 0 learns V/D=64 (at one lr only), seed 1 only 32, seed 2 nothing."""
  acc = {(0, 32, 0.01): 1.0, (0, 64, 0.01): 0.5, (0, 64, 0.03): 0.995,
         (1, 32, 0.01): 0.99, (1, 64, 0.01): 0.2, (1, 64, 0.03): 0.3,
         (2, 32, 0.01): 0.98, (2, 64, 0.01): 0.1, (2, 64, 0.03): 0.4}
  entries = []
  for (seed, ratio, lr), a in acc.items():
    run = f"{seed}-{ratio}-{lr}"
    helpers.write_jsonl(tmp_path / run / "metrics.jsonl", [
        {"step": s, "bottleneck/destroyed_ratio": 0.9 + 0.01 * s,
         "bottleneck/visible_cosine": 0.1 * s, "bottleneck/realized_cosine": 0.2}
        for s in (1, 2, 3)])
    entries.append({"run": run, "method": "m", "seed": seed, "V/D": float(ratio), "lr": lr,
                    "eval/accuracy": a})
  out = head_lab.summarize_spamlang(tmp_path, entries)["m"]
  largest = out["largest_ratio"]
  assert largest["values"] == [64.0, 32.0, 0.0]
  assert largest["mean"] == pytest.approx(32.0)
  assert largest["ci95"] == pytest.approx(t_ci([64, 32, 0]))
  at64 = out["by_ratio"]["64"]  # lr 0.03 has the higher mean accuracy (0.565 vs 0.267)
  assert at64["lr"] == 0.03 and at64["accuracy"]["values"] == [0.995, 0.3, 0.4]
  assert out["by_ratio"]["32"]["lr"] == 0.01
  by_lr = at64["accuracy_by_lr"]  # every lr, ascending, its seeds in order
  assert list(by_lr) == ["0.01", "0.03"]
  assert by_lr["0.01"]["values"] == [0.5, 0.2, 0.1]
  assert by_lr["0.01"]["mean"] == pytest.approx(np.mean([0.5, 0.2, 0.1]))
  assert by_lr["0.03"]["ci95"] == pytest.approx(t_ci([0.995, 0.3, 0.4]))
  # identical values over the seeds: a CI of exactly 0
  assert at64["realized_cosine"] == {"values": pytest.approx([0.2] * 3), "sd": 0.0, "ci95": 0.0,
                                     "mean": pytest.approx(0.2), "n": 3}
  assert at64["destroyed_ratio"]["mean"] == pytest.approx(0.92)  # mean of 0.91, 0.92, 0.93


def test_lm_summary_from_runs(tmp_path):
  """Held-out loss curves at 100, 200, 300 tokens, two lrs per method; each method is judged at
  its lr with the lowest mean final loss (baseline: 0.1, mos: 0.2); target = the worst final loss
  of the chosen baseline seeds."""
  curves = {("baseline", 0.1, 0): [5.0, 4.0, 3.0], ("baseline", 0.1, 1): [5.0, 4.5, 3.5],
            ("baseline", 0.2, 0): [6.0, 5.0, 4.5], ("baseline", 0.2, 1): [6.0, 5.0, 4.4],
            ("mos", 0.2, 0): [4.0, 3.0, 2.0], ("mos", 0.2, 1): [5.0, 4.0, 3.6],
            ("mos", 0.1, 0): [4.0, 3.5, 3.0], ("mos", 0.1, 1): [5.0, 4.0, 3.2]}
  entries = []
  for (method, lr, seed), losses in curves.items():
    run = f"{method}-{lr}-{seed}"
    helpers.write_jsonl(tmp_path / run / "metrics.jsonl", [
        {"step": k, "tokens_seen": 100 * k, "eval/loss": loss,
         "bottleneck/realized_cosine": 0.1 * k} for k, loss in enumerate(losses, 1)])
    entries.append({"run": run, "method": method, "seed": seed, "eval/loss": losses[-1],
                    "lr": lr, "head_rank": 8 if method == "baseline" else None})
  out = head_lab.summarize_lm(tmp_path, entries)
  assert set(out) == {"baseline", "mos"}
  base, mos = out["baseline"], out["mos"]
  assert (base["lr"], mos["lr"]) == (0.1, 0.2)
  assert base["runs"] == ["baseline-0.1-0", "baseline-0.1-1"]  # the figures' runs
  assert base["target"] == mos["target"] == 3.5
  # linear between the evaluations around the crossing: baseline 4.0 → 3.0 over 200..300 tokens
  # crosses 3.5 at 250, the other seed ends at 3.5 (300); mos 4.0 → 3.0 over 100..200 at 150,
  # its seed 1 never reaches it (3.6).
  assert base["tokens_to_target"]["values"] == [250.0, 300.0]
  assert mos["tokens_to_target"]["values"] == [150.0, None]
  assert mos["speedup"]["values"] == pytest.approx([250 / 150, None])  # paired by seed
  assert mos["speedup"]["n"] == 1
  assert base["speedup"]["values"] == [1.0, 1.0]
  assert base["eval_loss"]["ci95"] == pytest.approx(t_ci([3.0, 3.5]))
  paired = mos["eval_loss_minus_baseline"]  # 2.0 − 3.0 and 3.6 − 3.5, seed by seed
  assert paired["values"] == pytest.approx([-1.0, 0.1]) and paired["seeds"] == [0, 1]
  assert paired["ci95"] == pytest.approx(t_ci([-1.0, 0.1]))
  assert base["eval_loss_minus_baseline"]["values"] == [0.0, 0.0]
  assert list(mos["eval_loss_by_lr"]) == ["0.1", "0.2"]  # the losing lr too
  assert mos["eval_loss_by_lr"]["0.1"]["values"] == [3.0, 3.2]
  assert base["eval_loss_by_lr"]["0.2"]["mean"] == pytest.approx(4.45)
  assert base["realized_cosine"]["mean"] == pytest.approx(0.2)
  assert base["destroyed_ratio"]["n"] == 0  # not logged: no number rather than a made-up one


def test_lr_table_has_a_column_per_lr_of_any_row():
  """Rows with different grids: one column per lr in numeric order, blank where a row lacks it."""
  rows = [("a", {"0.1": stats.summary([1.0, 3.0]), "0.01": stats.summary([2.0, 2.0])}),
          ("b", {"0.03": stats.summary([5.0, None])})]
  table = head_lab.lr_table(rows, lambda r: r[1], {"method": lambda r: r[0]}).splitlines()
  assert table[0] == "| method | lr 0.01 | lr 0.03 | lr 0.1 |"
  assert table[2] == f"| a | 2 ± 0 |  | 2 ± {t_ci([1.0, 3.0]):.2g} |"
  assert table[3] == "| b |  | 5 (1/2 seeds) |  |"


def test_a_diverged_seed_makes_its_lr_lose():
  """A seed without a final loss (diverged) counts as +inf for its lr's mean."""
  runs = [{"lr": 0.1, "seed": 0, "eval/loss": 1.0}, {"lr": 0.1, "seed": 1, "eval/loss": None},
          {"lr": 0.01, "seed": 1, "eval/loss": 3.0}, {"lr": 0.01, "seed": 0, "eval/loss": 2.0}]
  assert [e["seed"] for e in head_lab.best_lr(runs)] == [0, 1]
  assert {e["lr"] for e in head_lab.best_lr(runs)} == {0.01}


def tiny_token_dirs(root, vocab):
  rng = np.random.default_rng(0)
  for split, n in (("train", 20_000), ("val", 2_000)):
    write_token_dir(root / split, [rng.integers(0, vocab, n)], vocab_size=vocab, tokenizer="none")
  return str(root / "train"), str(root / "val")


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
  """The smoke preset (on a random token corpus): summary.json agrees with the runs on disk."""
  cfg = head_lab.get_config("smoke")
  cfg.data.path, cfg.data.eval_path = tiny_token_dirs(tmp_path / "data", cfg.model.vocab_size)
  out = tmp_path / "out"
  head_lab.main(cfg, str(out))
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary) == {"baseline", "whitened"}
  for method, tasks in summary.items():
    assert set(tasks) == {"spamlang", "lm"}
    runs = {t: [json.loads((out / t / d / "summary.json").read_text()) | {"run": d}
                for d in sorted(os.listdir(out / t)) if f"method={method}+" in d + "+"]
            for t in tasks}
    accuracy = [r["eval/accuracy"] for r in runs["spamlang"]]  # one V/D: 64 / 8
    learned = [8.0 if a >= head_lab.LEARNED else 0.0 for a in accuracy]
    assert tasks["spamlang"]["largest_ratio"]["values"] == learned
    loss = tasks["lm"]["eval_loss"]
    assert loss["values"] == pytest.approx([r["eval/loss"] for r in runs["lm"]])
    assert loss["mean"] == pytest.approx(np.mean(loss["values"]))
    assert loss["ci95"] == pytest.approx(t_ci(loss["values"]))
    for m in head_lab.BOTTLENECK:
      assert 0 <= tasks["lm"][m]["mean"] <= 1
  table = (out / "results.md").read_text()
  assert "| method | SpamLang largest V/D ≥ 99% | LM lr | LM held-out loss |" in table
  for name in ("lm_loss", "lm_realized_cosine", "spamlang_accuracy"):
    assert (out / f"head_lab_{name}.png").read_bytes()[:4] == b"\x89PNG"
