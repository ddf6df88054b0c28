"""Experiment presets: parameter counts, sweep grids, reports, and tiny end-to-end runs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from experiments import rank_sweep, spamlang
import helpers

from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.tools import costs
from lmhead_jax.runs import experiment, grid

ROOT = str(helpers.ROOT)
PRESETS = [(m, p) for m in (spamlang, rank_sweep) for p in helpers.PRESETS[m]]


def runs(cfg):
  return [grid.configure(cfg, o) for o in grid.expand(cfg.sweep or ({},))]


@pytest.mark.parametrize("module,preset", PRESETS)
def test_presets_expand_to_valid_runs(module, preset):
  cfg = module.get_config(preset)
  for run_cfg in runs(cfg):
    experiment.configs(run_cfg)  # validates the model and head configs
    assert "sweep" not in run_cfg
  names = [grid.run_name(o) for o in grid.expand(cfg.get("sweep") or ())]
  assert len(names) == len(set(names))


def test_rank_sweep_paper_parameter_counts():
  v, d, layers, heads, kv, hd, ff = 49152, 4096, 6, 32, 8, 128, 18432
  trunk = v * d + layers * (2 * d * heads * hd + 2 * d * kv * hd + 3 * d * ff + 2 * d) + d
  cfg = rank_sweep.get_config("paper")
  counts = {}
  for run_cfg in runs(cfg):
    r = run_cfg.head.rank
    counts[r] = costs.param_counts(*experiment.configs(run_cfg))["total"]
    assert counts[r] == trunk + v * r + r * d
  assert sorted(counts) == [32, 64, 128, 256, 512, 1024, 2048, 4096]
  assert 1.8e9 <= min(counts.values()) and max(counts.values()) < 2.05e9
  assert {round(n / 1e9, 1) for n in counts.values()} <= {1.8, 1.9, 2.0}
  assert cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len == pytest.approx(11e9, rel=0.01)


def test_spamlang_paper_trunk_and_ratios():
  cfg = spamlang.get_config("paper")
  d, layers, ff = 768, 12, 2816
  trunk = layers * (4 * d * d + 3 * d * ff + 2 * d) + d
  assert trunk == 106_187_520
  ratios = set()
  for run_cfg in runs(cfg):
    v = run_cfg.model.vocab_size
    embed = v * d * (1 if run_cfg.model.tie_embeddings else 2)
    assert costs.param_counts(*experiment.configs(run_cfg))["total"] == trunk + embed
    ratios.add(v / d)
    assert spamlang.describe(run_cfg)["coverage"] >= 19
  assert max(ratios) / min(ratios) >= 1000


def test_spamlang_cpu_grid():
  entries = [spamlang.describe(c) for c in runs(spamlang.get_config("cpu"))]
  adamw = sorted({e["V/D"] for e in entries if spamlang.arm(e) == "adamw lr=0.01"})
  assert adamw == [32, 64, 128, 256, 512, 1024]
  assert {spamlang.arm(e) for e in entries} == {
      "adamw lr=0.01", "adamw lr=0.01 tied", "sgd lr=0.1", "sgd lr=1", "sgd lr=10"}
  assert all(e["coverage"] == 1500 * 32 / 4096 for e in entries)
  assert len(entries) == 3 * 14 and {e["seed"] for e in entries} == {0, 1, 2}


def test_spamlang_vocab_cpu_grid_fixes_d_and_coverage():
  cfg = spamlang.get_config("vocab_cpu")
  entries = [spamlang.describe(c) for c in runs(cfg)]
  assert [e["V"] for e in entries] == sorted(e["V"] for e in entries)  # V ascending
  assert {e["D"] for e in entries} == {16} and cfg.head.chunk_size == 32
  assert sorted({e["V"] for e in entries}) == [256, 1024, 4096, 16384, 65536]
  for v in (256, 65536):
    arms = {(e["optimizer"], e["lr"], e["seed"]) for e in entries if e["V"] == v}
    assert arms == {(o, lr, s) for o, lrs in spamlang.VOCAB_LRS.items() for lr in lrs
                    for s in (0, 1, 2)}
  assert min(e["coverage"] for e in entries) >= spamlang.COVERAGE


def test_spamlang_coverage_cpu_is_vocab_cpu_at_16384_with_4x_the_steps():
  vocab = {(e["optimizer"], e["lr"], e["seed"]): e for e in map(
      spamlang.describe, runs(spamlang.get_config("vocab_cpu"))) if e["V"] == 16384}
  entries = [spamlang.describe(c) for c in runs(spamlang.get_config("coverage_cpu"))]
  assert {(e["optimizer"], e["lr"], e["seed"]) for e in entries} == {
      (o, lr, s) for o, lr in (("adamw", 1e-2), ("sgd", 0.1)) for s in (0, 1, 2)}
  for e in entries:
    same = vocab[(e["optimizer"], e["lr"], e["seed"])]
    assert e["coverage"] == 4 * same["coverage"] == 24
    assert {k: v for k, v in e.items() if k != "coverage"} == {
        k: v for k, v in same.items() if k != "coverage"}


def vocab_entries(acc: dict) -> list[dict]:
  """{(optimizer, V, lr): per-seed held-out accuracy (None: diverged)} as sweep entries."""
  return [{"run": f"{o}-{v}-{lr}-{s}", "V": v, "D": 16, "V/D": v / 16, "seed": s,
           "optimizer": o, "lr": lr, "coverage": 6.0, "eval/loss": 1.0,
           "bottleneck/destroyed_ratio": 0.9, **({"eval/accuracy": a} if a is not None
                                                  else {"diverged": True})}
          for (o, v, lr), accs in acc.items() for s, a in enumerate(accs)]


def test_spamlang_vocab_report_keeps_the_best_lr_per_v(tmp_path):
  """adamw at V=256: lr 0.01 (mean 0.995, learned) beats 0.001; at V=4096 both fail. sgd at
  V=256 (lr 0.1 beats 1) is compared with adamw's best lr seed by seed."""
  acc = {("adamw", 256, 0.01): (1.0, 0.99, 0.995), ("adamw", 256, 0.001): (0.5, 0.6, 0.7),
         ("adamw", 4096, 0.01): (0.2, 0.1, None), ("adamw", 4096, 0.001): (0.3, 0.2, 0.25),
         ("sgd", 256, 0.1): (1.0, 0.9, 0.8), ("sgd", 256, 1.0): (0.0, 0.0, 0.0)}
  entries = vocab_entries(acc)
  found = spamlang.by_vocab(entries)["adamw"]
  assert found[256]["lr"] == 0.01 and found[256]["learned"]
  assert found[256]["accuracy"]["mean"] == pytest.approx(0.995)
  assert found[4096]["lr"] == 0.001 and not found[4096]["learned"]  # 0.25 > (0.2 + 0.1 + 0) / 3
  assert found[4096]["accuracy"]["values"] == [0.3, 0.2, 0.25]
  text = spamlang.vocab_report(tmp_path, entries)
  assert text.startswith("- adamw: learns up to V/D = 16; first failure at V/D = 256\n"
                         "- sgd: learns at no V/D; first failure at V/D = 16\n")  # mean 0.9
  assert (tmp_path / "accuracy_vs_vocab.png").read_bytes()[:4] == b"\x89PNG"
  rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in text.splitlines()[5:]}
  sgd, adamw = np.array([1.0, 0.9, 0.8]), np.array([1.0, 0.99, 0.995])
  diff = sgd - adamw
  half = scipy.stats.t.ppf(0.975, 2) * np.std(diff, ddof=1) / np.sqrt(3)
  p = scipy.stats.ttest_rel(sgd, adamw).pvalue
  assert rows["| sgd", "256"][6] == f"{diff.mean():.3g} ± {half:.2g} (p = {p:.2g})"
  assert rows["| adamw", "256"][6] == rows["| adamw", "4096"][6] == "(reference)"


def test_spamlang_vocab_report_refuses_two_runs_of_one_seed():
  entries = vocab_entries({("adamw", 256, 0.01): (1.0, 0.99)})
  entries[1]["seed"] = 0
  with pytest.raises(ValueError, match="adamw at V 256 and lr 0.01 has two runs of one seed"):
    spamlang.by_vocab(entries)


def test_rank_sweep_paper_needs_a_data_path(tmp_path):
  with pytest.raises(ValueError, match="data.path is empty"):
    rank_sweep.use_stdlib_corpus(rank_sweep.get_config("paper"), str(tmp_path))


def fake_rank_runs(workdir, seeds=(0,)):
  """Entries and metrics of three ranks with piecewise-linear held-out loss curves; seed s
  adds s to every loss of r = 8 (the other ranks' curves are the same for every seed)."""
  curves = {2: [6.0, 5.0, 4.0], 4: [6.0, 4.0, 3.0], 8: [5.0, 3.0, 2.0]}
  entries = []
  for seed in seeds:
    for r, losses in curves.items():
      losses = [v + seed * (r == 8) for v in losses]
      run = f"rank={r}+seed={seed}"
      helpers.write_jsonl(workdir / run / "metrics.jsonl", [
          {"step": k, "tokens_seen": 1000 * k, "eval/loss": loss}
          for k, loss in enumerate(losses, 1)])
      entries.append({"run": run, "r": r, "seed": seed, "V": 64, "V/r": 64 / r,
                      "params": 1e6 + r, "eval/loss": losses[-1],
                      "bottleneck/destroyed_ratio": 1 - r / 64 + seed / 100, "wall_s": 1.0})
  return entries


def rank_report(workdir, seeds):
  entries = fake_rank_runs(workdir, seeds)
  text = rank_sweep.report(workdir, rank_sweep.summarize(workdir, entries), entries)
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()[3:]}
  return text, rows


def test_rank_sweep_report(tmp_path):
  text, rows = rank_report(tmp_path, (0,))
  assert text.startswith("1 seed; mean ± 95% CI (Student t). target: r=2's highest final "
                         "held-out loss over seeds, 4.0000")
  # r=4 reaches 4.0 at 2000 tokens; r=8 between 1000 (5.0) and 2000 (3.0): 1500; r=2 at 3000.
  assert rows["2"][5:7] == ["3000", "1"]
  assert rows["4"][5:7] == ["2000", "1.5"]
  assert rows["8"][5:7] == ["1500", "2"]
  assert rows["8"][3:5] == ["2", "-2"]  # held-out loss; paired difference against r = 2
  for png in ("loss_vs_tokens.png", "destroyed_vs_rank.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_rank_sweep_report_over_seeds(tmp_path):
  """Two seeds: r = 8's seed 1 curve is 1 higher (6, 4, 3), reaching 4.0 at 2000 tokens."""
  _, rows = rank_report(tmp_path, (0, 1))
  t = scipy.stats.t.ppf(0.975, 1)
  speedups, losses = np.array([3000 / 1500, 3000 / 2000]), np.array([2.0, 3.0])
  half = lambda x: t * np.std(x, ddof=1) / np.sqrt(2)
  assert rows["8"][3] == f"{losses.mean():.4g} ± {half(losses):.2g}"
  assert rows["8"][4] == f"{(losses - 4).mean():.3g} ± {half(losses - 4):.2g}"
  assert rows["8"][5] == f"{1750:.4g} ± {half(np.array([1500, 2000])):.2g}"
  assert rows["8"][6] == f"{speedups.mean():.4g} ± {half(speedups):.2g}"
  assert rows["4"][5:7] == ["2000 ± 0", "1.5 ± 0"]


def tiny_token_dirs(root, vocab=64):
  rng = np.random.default_rng(0)
  for split, n in (("train", 20_000), ("val", 2_000)):
    write_token_dir(root / split, [rng.integers(0, vocab, n)], vocab_size=vocab, tokenizer="none")
  return str(root / "train"), str(root / "val")


def test_rank_sweep_end_to_end_tiny(tmp_path, capsys):
  cfg = rank_sweep.get_config("cpu")
  cfg.model.update(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  cfg.data.path, cfg.data.eval_path = tiny_token_dirs(tmp_path / "data")
  cfg.data.seq_len = 16
  cfg.optimizer.warmup_steps = 1
  cfg.train.update(steps=4, batch_size=4, log_every=1, bottleneck_every=1, eval_every=2,
                   eval_batches=1)
  cfg.sweep = ({"head.rank": (2, 16)},)
  rank_sweep.main(cfg, str(tmp_path / "out"))
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert [e["r"] for e in summary] == [2, 16]
  assert all(math.isfinite(e["eval/loss"]) and e["tokens"] == 4 * 4 * 16 for e in summary)
  results = (tmp_path / "out" / "results.md").read_text()
  assert "| r | V/r | params |" in results and "| 16 | 4 |" in results
  assert "[2/2] rank=16" in capsys.readouterr().out
  assert (tmp_path / "out" / "loss_vs_tokens.png").exists()


def test_spamlang_report_over_seeds(tmp_path):
  """Per arm and V/D: mean ± 95% CI over seeds, a diverged run counting as accuracy 0 and
  missing from the loss, and the paired difference from the same arm at V/D = 64, the lowest
  V/D of every arm (adamw's 32 is not sgd's), on the seeds that pair (scipy's t quantile and
  paired t-test)."""
  acc = {("adamw", 128): (0.75, 0.5), ("adamw", 64): (1.0, 0.9, 0.95),
         ("adamw", 4): (0.0, 0.2, 0.1), ("sgd", 64): (0.5, 0.7), ("sgd", 4): (None, 0.1)}
  entries = []
  for (name, d), accs in acc.items():
    for seed, a in enumerate(accs):
      run = f"d_model={d}+name={name}+seed={seed}"
      helpers.write_jsonl(tmp_path / run / "metrics.jsonl", [
          {"step": step, "accuracy": (a or 0) * step / 100,
           "bottleneck/destroyed_ratio": 1 - d / 4096} for step in (50, 100)])
      entries.append({"run": run, "V": 4096, "D": d, "V/D": 4096 / d, "seed": seed,
                      "optimizer": name, "lr": 0.01, "tied": False, "coverage": 11.71875,
                      **({"diverged": True} if a is None else {
                          "eval/accuracy": a, "eval/loss": 3.0 + seed, "wall_s": 10.0 + seed,
                          "bottleneck/destroyed_ratio": 1 - d / 4096})})
  half = lambda x: scipy.stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
  cell = lambda x, digits=4: f"{np.mean(x):.{digits}g} ± {half(x):.2g}"
  p = lambda a, b: f"(p = {scipy.stats.ttest_rel(a, b).pvalue:.2g})"
  lines = spamlang.report(tmp_path, entries).splitlines()
  assert lines[2] == ("| V/D | D | arm | n | diverged | accuracy (held-out) | Δ accuracy, "
                      "paired, vs the arm's reference V/D | loss (held-out) | destroyed_ratio "
                      "| coverage | wall (s), mean |")
  assert lines[4:] == [
      f"| 32 | 128 | adamw lr=0.01 | 2 | 0 | {cell([0.75, 0.5])} "
      f"| {cell([-0.25, -0.4], 3)} (2/3 seeds) {p([0.75, 0.5], [1.0, 0.9])} "
      f"| {cell([3, 4])} | 0.9688 ± 0 | 11.72 | 10.5 |",
      f"| 64 | 64 | adamw lr=0.01 | 3 | 0 | {cell([1.0, 0.9, 0.95])} | (reference) "
      f"| {cell([3, 4, 5])} | 0.9844 ± 0 | 11.72 | 11 |",
      f"| 1024 | 4 | adamw lr=0.01 | 3 | 0 | {cell([0.0, 0.2, 0.1])} "
      f"| {cell([-1, -0.7, -0.85], 3)} {p([0.0, 0.2, 0.1], [1.0, 0.9, 0.95])} "
      f"| {cell([3, 4, 5])} | 0.999 ± 0 | 11.72 | 11 |",
      f"| 64 | 64 | sgd lr=0.01 | 2 | 0 | {cell([0.5, 0.7])} | (reference) "
      f"| {cell([3, 4])} | 0.9844 ± 0 | 11.72 | 10.5 |",
      f"| 1024 | 4 | sgd lr=0.01 | 2 | 1 | {cell([0.0, 0.1])} "
      f"| {cell([-0.5, -0.6], 3)} {p([0.0, 0.1], [0.5, 0.7])} "
      "| 4 (1/2 seeds) | 0.999 (1/2 seeds) | 11.72 | 11 |"]
  for png in ("accuracy_vs_ratio.png", "destroyed_ratio_curves.png", "accuracy_curves.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="share arm 'sgd lr=0.01', V/D 1024 and seed 1"):
    spamlang.report(tmp_path, entries + [dict(entries[-1], run="again")])


@pytest.mark.slow
def test_spamlang_demo_cli_tiny(tmp_path):
  overrides = ["--config.train.steps=3", "--config.train.log_every=1",
               "--config.train.bottleneck_every=1", "--config.model.vocab_size=64",
               "--config.train.eval_batches=1", "--config.checkpoint.every=0"]
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.spamlang", "--config=experiments/spamlang.py:demo",
       f"--workdir={tmp_path}", *overrides], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| V/D | D | arm | n | diverged | accuracy (held-out) |" in proc.stdout
  assert "| 1 | 64 | sgd lr=0.1 |" in proc.stdout and "| 8 | 8 | sgd lr=0.1 |" in proc.stdout
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [e["D"] for e in summary] == [64, 8]
  assert all(e["coverage"] == 3 * 32 / 64 for e in summary)
  for png in ("accuracy_vs_ratio.png", "destroyed_ratio_curves.png", "accuracy_curves.png"):
    assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
