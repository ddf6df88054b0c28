"""Head lab: do heads and backward rules that pass more of the logit gradient train faster?

Every method is a set of config overrides of the ordinary train step (METHODS; README, "Escaping
the bottleneck"), run with the same seeds, data and budget on two tasks:

- `spamlang` (DIR/spamlang/<run>/): the largest V/D each seed learns (held-out accuracy ≥ 99%),
  best over a small learning-rate grid, on a short V/D ladder (experiments/spamlang.py's task);
- `lm` (DIR/lm/<run>/): experiments/rank_sweep.py's trunk and data at one head width, each method
  at its best lr of a grid (lowest mean final held-out loss): the final held-out loss (equal
  steps) and the tokens each run needs to reach the baseline's final held-out loss (equal loss;
  the highest over its seeds, so that every baseline seed reaches it), both paired by seed
  against the baseline. The lr is chosen on the held-out loss it is then compared on.

DIR/summary.json has, per method and task, the numbers as mean ± 95% CI (Student t) over seeds with
the per-seed values; DIR/results.md the tables, with every lr's value so that a best at an edge of
its grid shows; DIR/*.png the figures. destroyed_ratio, visible_cosine and realized_cosine are
averaged over each run's logged steps, then over seeds.
The top-level config is the `lm` task; the `spamlang` key holds the SpamLang task's config.

Choices (the paper's forms are not public): ortho weight 0.01, alignment weight 0.1, MoS with
K = 2 mixtures, not tuned.

Presets:
- `smoke` (seconds per run): baseline and whitened, 2 seeds, one SpamLang point, a tiny LM (its
  stdlib corpus takes minutes to build once, unless `data.path` names token directories).
- `cpu` (≈ 3 h on 2 cores, seed by seed): SpamLang V=512, 1 layer, 1 head, d_ff=4·D, batch 32,
  seq 32, 500 steps (coverage 31), AdamW lr ∈ {3e-3, 1e-2, 3e-2, 1e-1}, 10 warmup steps,
  D ∈ {16, 8} (V/D 32, 64); LM: the rank sweep's `cpu` trunk (D=128, stdlib corpus, BPE 4096)
  with the full-width factorized head r=128, 100 steps of 16×128 tokens (205k tokens), AdamW
  lr ∈ {1e-3, 3e-3, 1e-2, 3e-2}, 10 warmup steps, cosine decay to 10%, held-out loss every 10
  steps on 4 batches, bottleneck metrics every 20; realized_cosine on the metric steps that are
  multiples of 10 (all of the LM's) in both tasks. 5 seeds, 6 methods: 240 SpamLang runs (≈ 20 s
  each on quiet cores, compile-bound) and 120 LM runs (≈ 1 min each). Four lrs per task, not
  three, so that each method's best lies inside its grid (with three, all but one sat at an edge).
- `paper`: the rank sweep's `paper` trunk (2B) at r ∈ {4096, 256} (the mos head has no rank: one
  run), one seed, dense loss (head.chunk_size=None: feedback alignment, the alignment loss and mos
  need G), for TPU; not run here.
"""

import copy
import json
import math

import numpy as np
from etils import epath

from experiments import rank_sweep, spamlang
from lmhead_jax.reporting import metrics, plots, stats
from lmhead_jax.runs import cli, experiment, sweep

LEARNED = 0.99  # held-out accuracy that counts as learned
METHODS = {
    "baseline": {},
    "whitened": {"head.backward": "whitened"},
    "feedback_alignment": {"head.backward": "feedback_alignment"},
    "ortho": {"head.ortho_weight": 0.01},
    "alignment": {"train.alignment_weight": 0.1},
    "mos": {"head.kind": "mos", "head.mixtures": 2},
}
BOTTLENECK = ("destroyed_ratio", "visible_cosine", "realized_cosine")


def grids(methods, seeds, axes: dict) -> tuple:
  """Seed by seed (every method of a seed before the next seed), one grid per method: its
  overrides and `method` key, times `axes` (no rank for mos)."""
  return tuple({"method": (m,), "seed": (seed,)} | {k: (v,) for k, v in METHODS[m].items()}
               | {k: v for k, v in axes.items() if not (m == "mos" and k == "head.rank")}
               for seed in seeds for m in methods)


def with_method(cfg):
  with cfg.unlocked():
    cfg.method = "baseline"
  return cfg


def get_config(preset: str = "cpu"):
  spam = with_method(spamlang.get_config("smoke"))
  rank = {"smoke": "cpu"}.get(preset, preset)
  if rank not in ("cpu", "paper"):
    raise ValueError(f"unknown preset {preset!r} for experiments/head_lab.py "
                     "(known: smoke, cpu, paper)")
  cfg = with_method(rank_sweep.get_config(rank))
  methods, seeds = tuple(METHODS), (0, 1, 2, 3, 4)
  if preset == "smoke":
    methods, seeds = ("baseline", "whitened"), (0, 1)
    spam.model.update(vocab_size=64, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=None)
    spam.train.update(steps=30, batch_size=8, log_every=10, bottleneck_every=10, eval_every=0,
                      eval_batches=1)
    spam_axes = {"model.d_model": (8,), "optimizer.learning_rate": (3e-2,)}
    cfg.model.update(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                     max_seq_len=32)
    cfg.data.seq_len = 32
    cfg.optimizer.warmup_steps = 2
    cfg.train.update(steps=20, batch_size=4, log_every=5, bottleneck_every=5, eval_every=5,
                     eval_batches=1)
    cfg.checkpoint.every = 0
    cfg.head.rank, lm_axes = 16, {}
  elif preset == "cpu":
    spam.model.update(vocab_size=512, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=None)
    spam.train.update(steps=500, batch_size=32, log_every=25, bottleneck_every=25, eval_every=0,
                      eval_batches=4)
    spam_axes = {"model.d_model": (16, 8),
                 "optimizer.learning_rate": (3e-3, 1e-2, 3e-2, 1e-1)}
    cfg.optimizer.warmup_steps = 10
    cfg.train.update(steps=100, log_every=10, bottleneck_every=20, eval_every=10, eval_batches=4)
    cfg.checkpoint.every = 0
    cfg.head.rank, lm_axes = 128, {"optimizer.learning_rate": (1e-3, 3e-3, 1e-2, 3e-2)}
  else:
    spam, seeds = None, (0,)
    cfg.head.chunk_size = None
    cfg.head.rank, lm_axes = 4096, {"head.rank": (4096, 256)}
  for task in (spam, cfg):  # the realized_cosine cadence these tasks ran with
    if task is not None:
      task.train.realized_cosine_every = 10
  if spam is not None:
    spam.checkpoint.every = 0
    spam.sweep = grids(methods, seeds, spam_axes)
  cfg.sweep = grids(methods, seeds, lm_axes)
  with cfg.unlocked():
    cfg.spamlang = spam
  return cfg


def tasks(cfg) -> dict:
  """The task configs, each a sweep: {'spamlang': ..., 'lm': ...} (no spamlang in `paper`)."""
  lm = copy.deepcopy(cfg)
  with lm.unlocked():
    del lm["spamlang"]
  return ({"spamlang": cfg.spamlang} if cfg.get("spamlang") else {}) | {"lm": lm}


def describe(cfg) -> dict:
  return {"method": cfg.method, "seed": cfg.seed, "V": cfg.model.vocab_size,
          "D": cfg.model.d_model, "V/D": cfg.model.vocab_size / cfg.model.d_model,
          "lr": cfg.optimizer.learning_rate,
          "head_rank": cfg.head.rank if cfg.head.kind == "factorized" else None}


def _training_mean(workdir, entry, metric) -> float:
  _, y = metrics.run_curve(workdir, entry, f"bottleneck/{metric}", "step")
  return float(np.mean(y)) if y.size else math.nan


def _by(entries, *keys) -> dict:
  out = {}
  for e in entries:
    out.setdefault(tuple(e[k] for k in keys), []).append(e)
  return out


def at_every_lr(runs: list[dict], metric: str) -> dict:
  """Per lr of the grid (ascending, as text), `metric`'s final value over seeds: whether the
  chosen lr lies inside the grid or at an edge."""
  return {f"{lr:g}": stats.summary([e.get(metric) for e in sorted(g, key=lambda e: e["seed"])])
          for (lr,), g in sorted(_by(runs, "lr").items())}


def _bottleneck(workdir, entries) -> dict:
  return {m: stats.summary([_training_mean(workdir, e, m) for e in entries]) for m in BOTTLENECK}


def summarize_spamlang(workdir, entries: list[dict]) -> dict:
  """Per method: the largest V/D each seed learns over the lr grid (0: none), and per V/D the
  best lr's (highest mean accuracy) held-out accuracy and bottleneck metrics over seeds."""
  out = {}
  for (method,), group in _by(entries, "method").items():
    learned = {s: max([e["V/D"] for e in g if (e.get("eval/accuracy") or 0) >= LEARNED],
                      default=0.0) for (s,), g in _by(group, "seed").items()}
    ratios = {}
    for (ratio,), at in sorted(_by(group, "V/D").items()):
      runs_at = _by(at, "lr")
      lr = max(runs_at, key=lambda k: np.mean([e.get("eval/accuracy") or 0 for e in runs_at[k]]))
      best = sorted(runs_at[lr], key=lambda e: e["seed"])
      ratios[f"{ratio:g}"] = {"lr": lr[0], "accuracy": stats.summary([e.get("eval/accuracy")
                                                            for e in best]),
                              "accuracy_by_lr": at_every_lr(at, "eval/accuracy"),
                              **_bottleneck(workdir, best)}
    out[method] = {"largest_ratio": stats.summary([learned[s] for s in sorted(learned)]),
                   "by_ratio": ratios}
  return out


def lm_label(entries: list[dict]):
  """Runs' labels: the method, with the head rank when the runs have several."""
  several = len({e["head_rank"] for e in entries if e["head_rank"]}) > 1
  return lambda e: e["method"] + (f" r={e['head_rank']}" if several and e["head_rank"] else "")


def best_lr(runs: list[dict]) -> list[dict]:
  """The runs (sorted by seed) of the lr with the lowest mean final held-out loss over seeds (a
  diverged seed counts as +inf)."""
  loss = lambda e: e.get("eval/loss") if e.get("eval/loss") is not None else math.inf
  runs_at = _by(runs, "lr")
  lr = min(runs_at, key=lambda k: np.mean([loss(e) for e in runs_at[k]]))
  return sorted(runs_at[lr], key=lambda e: e["seed"])


def summarize_lm(workdir, entries: list[dict]) -> dict:
  """Per method (and head rank), at its best lr (`best_lr`), over seeds: the final held-out loss
  (equal steps) and its paired difference against the baseline at the baseline's best lr; the
  tokens to the target (equal loss: the highest final held-out loss of those baseline seeds,
  which each of them reaches; the full-width baseline's for mos) and, per seed, the baseline's
  tokens over the method's (the speed-up, paired); bottleneck metrics."""
  grids = _by(entries, "method", "head_rank")
  groups = {k: best_lr(g) for k, g in grids.items()}
  widest = max(r for m, r in groups if m == "baseline")
  label, out = lm_label(entries), {}
  for (method, rank), group in groups.items():
    base = groups[("baseline", rank or widest)]
    target = max((e["eval/loss"] for e in base if e.get("eval/loss") is not None),
                 default=math.nan)  # every seed diverged
    tokens = lambda es: {e["seed"]: metrics.tokens_to_target(
        *metrics.run_curve(workdir, e), target) for e in es}
    reach, base_reach = tokens(group), tokens(base)
    speedup = {s: base_reach[s] / t if t > 0 else None  # None: never reached the target
               for s, t in reach.items() if s in base_reach}
    per_seed = lambda es: {e["seed"]: e.get("eval/loss") for e in es}
    out[label(group[0])] = {"lr": group[0]["lr"], "runs": [e["run"] for e in group],
                            "eval_loss": stats.summary([e.get("eval/loss") for e in group]),
                            "eval_loss_by_lr": at_every_lr(grids[(method, rank)], "eval/loss"),
                            "eval_loss_minus_baseline": stats.paired(per_seed(group),
                                                                     per_seed(base)),
                            "target": target, "tokens_to_target": stats.summary(reach.values()),
                            "speedup": stats.summary(speedup.values()),
                            **_bottleneck(workdir, group)}
  return out


def _mean_curves(workdir, entries, y, label, x="step") -> dict:
  """Per label, the mean over seeds of y against x (runs of one label share their x)."""
  out = {}
  for (name,), group in _by([e | {"label": label(e)} for e in entries], "label").items():
    x_mean, y_mean = metrics.mean_curve([metrics.run_curve(workdir, e, y, x) for e in group])
    if x_mean.size:
      out[name] = (x_mean, y_mean)
  return out


def lr_table(rows: list, grid, columns: dict) -> str:
  """A markdown table of `columns` then one column per lr: `grid(row)` ({lr: summary}) as text."""
  lrs = sorted({lr for r in rows for lr in grid(r)}, key=float)
  return metrics.markdown_table(rows, columns | {
      f"lr {lr}": (lambda r, lr=lr: stats.text(grid(r)[lr], 3) if lr in grid(r) else "")
      for lr in lrs})


def report(workdir, found: dict, entries: dict, fmt: str = "png") -> str:
  """The results table (method × task); figures saved into the workdir."""
  lm_dir, label = f"{workdir}/lm", lm_label(entries["lm"])
  runs = {r for numbers in found["lm"].values() for r in numbers["runs"]}  # each method's best lr
  chosen = [e for e in entries["lm"] if e["run"] in runs]
  plots.lines(_mean_curves(lm_dir, chosen, "eval/loss", label, "tokens_seen"),
              f"{workdir}/head_lab_lm_loss.{fmt}", xlabel="tokens", ylabel="held-out loss",
              title="Head lab, LM: held-out loss (mean over seeds)", markers=False)
  for m in BOTTLENECK:
    plots.lines(_mean_curves(lm_dir, chosen, f"bottleneck/{m}", label),
                f"{workdir}/head_lab_lm_{m}.{fmt}", xlabel="step", ylabel=m,
                title=f"Head lab, LM: {m} (mean over seeds)", markers=False)
  columns, text = {"method": lambda r: r[0]}, ""
  bottleneck_columns = {m: (lambda r, m=m: stats.text(r[-1][m], 3)) for m in BOTTLENECK}
  if "spamlang" in found:
    spam = found["spamlang"]
    series = {m: tuple(np.array([(float(k), v["accuracy"]["mean"] or 0.0)
                                 for k, v in s["by_ratio"].items()]).T)
              for m, s in spam.items()}
    plots.lines(series, f"{workdir}/head_lab_spamlang_accuracy.{fmt}", xlabel="V / D",
                ylabel="held-out accuracy (best lr)", title="Head lab, SpamLang", logx=True,
                connect=False)
    columns["SpamLang largest V/D ≥ 99%"] = lambda r: stats.text(spam[r[0]]["largest_ratio"], 3)
    rows = [(m, k, v) for m, s in spam.items() for k, v in s["by_ratio"].items()]
    text = ("\n\nSpamLang at each V/D, the lr with the highest mean held-out accuracy; bottleneck "
            "metrics: mean over logged steps, then over seeds\n\n" + metrics.markdown_table(rows, {
                "method": lambda r: r[0], "V/D": lambda r: r[1], "lr": lambda r: r[2]["lr"],
                "held-out accuracy": lambda r: stats.text(r[2]["accuracy"]), **bottleneck_columns})
            + "\n\nSpamLang held-out accuracy at every lr\n\n"
            + lr_table(rows, lambda r: r[2]["accuracy_by_lr"], {"method": lambda r: r[0],
                                                                 "V/D": lambda r: r[1]}))
  lm = found["lm"]
  columns |= {
      "LM lr": lambda r: r[1]["lr"],
      "LM held-out loss": lambda r: stats.text(r[1]["eval_loss"]),
      "− baseline (paired)": lambda r: stats.text(r[1]["eval_loss_minus_baseline"], 3),
      "LM tokens to target": lambda r: stats.text(r[1]["tokens_to_target"], 3),
      "speed-up (paired)": lambda r: stats.text(r[1]["speedup"], 3), **bottleneck_columns}
  target = next(iter(lm.values()))["target"]
  return (f"LM: each method at its lr with the lowest mean final held-out loss; target: the "
          f"baseline seeds' highest final held-out loss ({target:.4f}); bottleneck metrics: LM, "
          "mean over logged steps, then over seeds (mean ± 95% CI)\n\n"
          + metrics.markdown_table(list(lm.items()), columns)
          + "\n\nLM final held-out loss at every lr\n\n"
          + lr_table(list(lm.items()), lambda r: r[1]["eval_loss_by_lr"],
                     {"method": lambda r: r[0]}) + text)


def by_method(found: dict) -> dict:
  """{task: {method: numbers}} as {method: {task: numbers}}."""
  methods = dict.fromkeys(m for numbers in found.values() for m in numbers)
  return {m: {t: found[t][m] for t in found if m in found[t]} for m in methods}


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  todo = tasks(cfg)
  for task in todo.values():
    experiment.validate_experiment(task)  # both tasks, before anything trains
  rank_sweep.use_stdlib_corpus(todo["lm"], f"{workdir}/lm")
  entries = {name: sweep.run(task, f"{workdir}/{name}", describe) for name, task in todo.items()}
  found = {}
  if "spamlang" in entries:
    found["spamlang"] = summarize_spamlang(f"{workdir}/spamlang", entries["spamlang"])
  found["lm"] = summarize_lm(f"{workdir}/lm", entries["lm"])

  def write():
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(by_method(found), indent=2))
    return report(workdir, found, entries, fmt)

  sweep.publish(workdir, write)


if __name__ == "__main__":
  cli.main(main)
