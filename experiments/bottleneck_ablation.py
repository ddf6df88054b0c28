"""Bottleneck ablation: is a rank-r head slow because of its gradient or its expressivity?

Four arms on the rank sweep's trunk and data (experiments/rank_sweep.py), with the same seeds,
data order and budget (DIR/<run>/, lmhead_jax.runs.sweep):
- `full`: the full-rank linear head (the r = D point of every arm);
- `factorized`: logits A(B h) of rank r: both bottlenecks;
- `backward`: the full-rank head whose trunk receives G W_r (`head.backward=truncated`): the
  gradient bottleneck only;
- `forward`: rank-r logits h W_rᵀ while the trunk receives the full G W (`head.forward_rank=r`,
  straight-through): the expressivity bottleneck only.
The report (DIR/results.md, DIR/over_seeds.json): per r and arm, the final held-out loss (mean ± 95%
CI over seeds), its paired difference against `full` (same seed), the tokens to reach the
target (the factorized arm's highest final held-out loss at that r, which each of its seeds
reaches) and their paired ratio to `full`'s, and the share of the factorized arm's loss gap
that each single-bottleneck arm reproduces. Figures: final held-out loss against r, and the
held-out loss curves at the smallest r.

Presets:
- `cpu` (≈ 60 min on 2 shared cores: 30 runs of 100–140 s): the rank sweep's `cpu` trunk (D=128, stdlib corpus, BPE 4096),
  r ∈ {4, 16, 64}, 3 seeds, 300 steps of 16×128 tokens (614k tokens), 30 warmup steps, cosine
  decay to 10%, held-out loss every 25 steps on 4 batches: 30 runs.
- `paper`: the rank sweep's `paper` trunk (2B, D=4096), r ∈ {32, 512}, 3 seeds: 21 runs of
  11B tokens; for TPU (`plan --compile=tpu`), not run here.
"""

import json

import numpy as np
from etils import epath

from experiments import rank_sweep
from lmhead_jax.reporting import metrics, plots, stats
from lmhead_jax.runs import cli, sweep

ARMS = {  # overrides, and the key that sets r
    "full": ({"head.kind": "linear"}, None),
    "factorized": ({"head.kind": "factorized"}, "head.rank"),
    "backward": ({"head.kind": "linear", "head.backward": "truncated"}, "head.backward_rank"),
    "forward": ({"head.kind": "linear"}, "head.forward_rank"),
}


def grids(ranks, seeds) -> tuple:
  """Seed by seed (each seed's arms complete before the next seed starts), arm by arm."""
  out = []
  for seed in seeds:
    for arm, (overrides, key) in ARMS.items():
      out.append({"arm": (arm,), "seed": (seed,)} | {k: (v,) for k, v in overrides.items()}
                 | ({key: tuple(ranks)} if key else {}))
  return tuple(out)


def get_config(preset: str = "cpu"):
  if preset not in ("cpu", "paper"):
    raise ValueError(f"unknown preset {preset!r} for experiments/bottleneck_ablation.py "
                     "(known: cpu, paper)")
  cfg = rank_sweep.get_config(preset)
  with cfg.unlocked():
    cfg.arm = "full"
  cfg.head.kind = "linear"
  seeds = (0, 1, 2)
  if preset == "cpu":
    ranks = (4, 16, 64)
    cfg.optimizer.warmup_steps = 30
    cfg.train.update(steps=300, log_every=25, bottleneck_every=50, eval_every=25,
                     eval_batches=4)
    cfg.checkpoint.every = 0
  else:
    ranks = (32, 512)
  cfg.sweep = grids(ranks, seeds)
  return cfg


def describe(cfg) -> dict:
  key = ARMS[cfg.arm][1]
  rank = cfg.head[key.split(".")[1]] if key else cfg.model.d_model
  return {"arm": cfg.arm, "r": int(rank), "D": cfg.model.d_model, "seed": cfg.seed}


def summarize(workdir, entries: list[dict]) -> dict:
  """{r: {arm: numbers}} for every r below D (module docstring); `full` at each r is the one
  full-rank run per seed, measured against that r's target."""
  by = {}
  for e in entries:
    by.setdefault((e["arm"], e["r"]), {})[e["seed"]] = e
  d = entries[0]["D"]
  full = by[("full", d)]
  final = lambda runs: {s: e.get("eval/loss") for s, e in runs.items()}
  out = {}
  for r in sorted({r for arm, r in by if arm != "full"}):
    fact = final(by[("factorized", r)])
    target = max(v for v in fact.values() if v is not None)
    tokens = lambda runs: {s: metrics.tokens_to_target(*metrics.run_curve(workdir, e), target)
                           for s, e in runs.items()}
    base_final, base_tokens = final(full), tokens(full)
    gap = stats.paired(fact, base_final)
    out[r] = {}
    for arm in ARMS:
      runs = full if arm == "full" else by[(arm, r)]
      loss, reach = final(runs), tokens(runs)
      diff = stats.paired(loss, base_final)
      ratio = {s: reach[s] / base_tokens[s] for s in reach
               if s in base_tokens and base_tokens[s] > 0}
      out[r][arm] = {
          "target": target, "eval_loss": stats.summary(loss.values()),
          "minus_full": diff, "minus_factorized": stats.paired(loss, fact),
          "gap_share": (diff["mean"] / gap["mean"]
                        if diff["mean"] is not None and gap["mean"] else None),
          "tokens_to_target": stats.summary(reach.values()),
          "tokens_over_full": stats.summary(ratio.values())}
  return out


def report(workdir, found: dict, entries: list[dict], fmt: str = "png") -> str:
  """The table, and the figures saved into the workdir."""
  ranks = sorted(found)
  d = entries[0]["D"]
  series, errors = {}, {}
  for arm in ARMS:
    if arm != "full":
      s = [found[r][arm]["eval_loss"] for r in ranks]
      series[arm] = (np.array(ranks, float), np.array([x["mean"] for x in s], float))
      errors[arm] = np.array([x["ci95"] if x["ci95"] is not None else np.nan for x in s])
  base = found[ranks[0]]["full"]["eval_loss"]
  plots.lines(series, f"{workdir}/ablation_loss_vs_rank.{fmt}", xlabel="r", logx=True,
              ylabel="final held-out loss", title="Bottleneck ablation (mean ± 95% CI)",
              connect=False, errors=errors,
              reference={f"full rank (r = D = {d})": (np.array([ranks[0], ranks[-1]], float),
                                                      np.full(2, base["mean"]))},
              reference_label=f"full rank (r = D = {d})")
  r0 = ranks[0]
  curves = {}
  for arm in [*series, "full"]:  # the arms' colours of the figure above, then full
    runs = [e for e in entries if e["arm"] == arm and e["r"] == (d if arm == "full" else r0)]
    curves[arm] = metrics.mean_curve([metrics.run_curve(workdir, e) for e in runs])
  plots.lines(curves, f"{workdir}/ablation_curves_r{r0}.{fmt}", xlabel="tokens",
              ylabel="held-out loss", title=f"Bottleneck ablation at r={r0} (mean over seeds)",
              markers=False)
  rows = [(r, arm, found[r][arm]) for r in ranks for arm in ARMS]
  table = metrics.markdown_table(rows, {
      "r": lambda x: x[0], "arm": lambda x: x[1],
      "held-out loss": lambda x: stats.text(x[2]["eval_loss"]),
      "− full (paired)": lambda x: stats.text(x[2]["minus_full"], 3),
      "− factorized (paired)": lambda x: stats.text(x[2]["minus_factorized"], 3),
      "share of factorized gap": lambda x: x[2]["gap_share"],
      "tokens to target": lambda x: stats.text(x[2]["tokens_to_target"], 3),
      "tokens / full's (paired)": lambda x: stats.text(x[2]["tokens_over_full"], 3)})
  n = len({e["seed"] for e in entries})
  return (f"{n} seeds; mean ± 95% CI (Student t); paired: per-seed differences. Target at each "
          "r: the factorized arm's highest final held-out loss over seeds.\n\n" + table)


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  rank_sweep.use_stdlib_corpus(cfg, workdir)
  entries = sweep.run(cfg, workdir, describe)
  found = summarize(workdir, entries)

  def write():
    (epath.Path(workdir) / "over_seeds.json").write_text(json.dumps(found, indent=2))
    return report(workdir, found, entries, fmt)

  sweep.publish(workdir, write)


if __name__ == "__main__":
  cli.main(main)
