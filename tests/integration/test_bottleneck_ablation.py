"""experiments/bottleneck_ablation.py: presets, the summary against hand-computed numbers, a
tiny end-to-end run."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from experiments import bottleneck_ablation as ablation
from lmhead_jax.runs import experiment, grid
from lmhead_jax.tools import plan


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_arms_build_validate_and_run_seed_by_seed(preset):
  cfg = ablation.get_config(preset)
  runs = grid.expand(cfg.sweep)
  ranks = (4, 16, 64) if preset == "cpu" else (32, 512)
  assert len(runs) == 3 * (1 + 3 * len(ranks))
  assert [o["seed"] for o in runs] == sorted(o["seed"] for o in runs)  # seed by seed
  for overrides in runs:
    run_cfg = grid.configure(cfg, overrides)
    experiment.validate(run_cfg)
    c, hc = experiment.configs(run_cfg)
    e = ablation.describe(run_cfg)
    r = e["r"]
    assert e["arm"] == overrides["arm"] and (r == c.d_model) == (e["arm"] == "full")
    assert (hc.kind, hc.rank, hc.backward, hc.backward_rank, hc.forward_rank) == {
        "full": ("linear", None, "exact", None, None),
        "factorized": ("factorized", r, "exact", None, None),
        "backward": ("linear", None, "truncated", r, None),
        "forward": ("linear", None, "exact", None, r)}[e["arm"]]
  assert {ablation.describe(grid.configure(cfg, o))["r"] for o in runs} == {*ranks, cfg.model.d_model}


def test_paper_preset_plans_on_a_v5p_slice():
  rows = plan.plan_sweep(ablation.get_config("paper"), "v5p-64")
  assert len(rows) == 21 + 1 and all(r["fits"] for r in rows[:-1])


def test_unknown_preset_names_it():
  with pytest.raises(ValueError, match="'tpu' for experiments/bottleneck_ablation.py"):
    ablation.get_config("tpu")


def write_run(workdir, arm, r, seed, losses):
  run = f"{arm}-{r}-{seed}"
  os.makedirs(workdir / run)
  with open(workdir / run / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps({"step": k, "tokens_seen": 100 * k, "eval/loss": y}) + "\n"
                 for k, y in enumerate(losses, 1))
  return {"run": run, "arm": arm, "r": r, "D": 8, "seed": seed, "eval/loss": losses[-1]}


def test_summary_from_runs(tmp_path):
  """Curves at 100, 200, 300 tokens; the target is factorized's worst final loss (3.6)."""
  curves = {("full", 8): ([5.0, 4.0, 3.0], [5.0, 3.0, 2.8]),
            ("factorized", 2): ([5.0, 4.5, 3.5], [5.0, 4.0, 3.6]),
            ("backward", 2): ([5.0, 4.4, 3.4], [5.0, 3.6, 3.3]),
            ("forward", 2): ([5.0, 4.0, 3.2], [5.0, 3.2, 2.9])}
  entries = [write_run(tmp_path, arm, r, seed, losses)
             for (arm, r), per_seed in curves.items() for seed, losses in enumerate(per_seed)]
  out = ablation.summarize(tmp_path, entries)
  assert list(out) == [2]
  got = out[2]
  assert {a["target"] for a in got.values()} == {3.6}
  # full: seed 0 crosses 3.6 between 4.0 (200) and 3.0 (300) at 240; seed 1 at 100 + 100·1.4/2
  assert got["full"]["tokens_to_target"]["values"] == pytest.approx([240.0, 170.0])
  assert got["factorized"]["tokens_to_target"]["values"] == pytest.approx([290.0, 300.0])
  assert got["backward"]["tokens_over_full"]["values"] == pytest.approx([280 / 240, 200 / 170])
  diff = got["backward"]["minus_full"]  # 3.4 − 3.0, 3.3 − 2.8
  t = scipy.stats.ttest_rel([3.4, 3.3], [3.0, 2.8])
  ci = t.confidence_interval(0.95)
  assert diff["values"] == pytest.approx([0.4, 0.5]) and diff["p"] == pytest.approx(t.pvalue)
  assert diff["ci95"] == pytest.approx((ci.high - ci.low) / 2)
  # factorized's gap: 0.5 and 0.8, mean 0.65; backward's mean 0.45; forward's 0.15
  assert got["backward"]["gap_share"] == pytest.approx(0.45 / 0.65)
  assert got["forward"]["gap_share"] == pytest.approx(0.15 / 0.65)
  assert got["factorized"]["gap_share"] == pytest.approx(1.0)
  assert got["full"]["minus_full"]["values"] == [0.0, 0.0]
  assert got["forward"]["minus_factorized"]["mean"] == pytest.approx(np.mean([-0.3, -0.7]))
  text = ablation.report(tmp_path, out, entries)
  assert "| r | arm | held-out loss |" in text and "2 seeds" in text
  for name in ("ablation_loss_vs_rank", "ablation_curves_r2"):
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
  """Every arm trains on a random token corpus; over_seeds.json agrees with the runs on disk, and
  the sweep's own summary.json (the runs' list, read on resume) is left to the sweep."""
  from test_head_lab import tiny_token_dirs
  cfg = ablation.get_config("cpu")
  cfg.model.update(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32)
  cfg.data.seq_len = 32
  cfg.data.path, cfg.data.eval_path = tiny_token_dirs(tmp_path / "data", 256)
  cfg.optimizer.warmup_steps = 2
  cfg.train.update(steps=12, batch_size=4, log_every=4, bottleneck_every=4, eval_every=4,
                   eval_batches=1)
  cfg.sweep = ablation.grids((4,), (0, 1))
  out = tmp_path / "out"
  ablation.main(cfg, str(out))
  runs = json.loads((out / "summary.json").read_text())
  assert len(runs) == 2 * len(ablation.ARMS) and all("wall_s" in e for e in runs)
  summary = json.loads((out / "over_seeds.json").read_text())
  assert list(summary) == ["4"] and set(summary["4"]) == set(ablation.ARMS)
  for arm, numbers in summary["4"].items():
    dirs = sorted(d for d in os.listdir(out) if d.startswith(f"arm={arm}+"))
    losses = [json.loads((out / d / "summary.json").read_text())["eval/loss"] for d in dirs]
    assert numbers["eval_loss"]["values"] == pytest.approx(losses)
  assert (out / "ablation_loss_vs_rank.png").exists()
