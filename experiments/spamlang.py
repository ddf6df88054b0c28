"""SpamLang: every sequence repeats one symbol; a head of width 2 could represent it.

Any failure to learn it is an optimization failure, and the paper finds that training gets
harder as V/D grows. Runs go to DIR/<run>/ (lmhead_jax.runs.sweep); DIR/summary.json has one row
per run with V, D, V/D, the optimizer, the learning rate, tying and the symbol coverage
(steps × batch / V: sequences per symbol); DIR/*.png are the figures.

Presets:
- `smoke`: one small run, about a minute on 2 CPU cores.
- `cpu` (≈ 1 h on 2 cores): V=4096, 1 layer with one head and d_ff=4·D, batch 32, seq 32,
  1,500 steps (coverage 11.7 sequences per symbol), 10 warmup steps, constant lr. AdamW
  lr=1e-2 over D ∈ {4, …, 128} (V/D from 1024 down to 32); SGD with momentum 0.9 at
  lr ∈ {0.1, 1, 10} and tied embeddings (AdamW) at D ∈ {8, 64}; 3 seeds. The report: per arm
  and V/D, mean ± 95% CI over seeds, and the paired difference from the arm's V/D = 64.
- `demo` (≤ 5 min on 2 cores): the `cpu` preset's pair that learns and fails, SGD-momentum
  lr=0.1 at D=64 (V/D=64) and D=8 (V/D=512), seed 0; the same runs, so the two presets share a
  DIR.
- `vocab_cpu` (the paper's axis, V at a fixed D): D=16, 1 layer with one head and d_ff=4·D,
  batch 64, seq 8, the chunked head (32 tokens a chunk: 1.75× faster than one 512-token chunk
  at V = 65,536 on XLA:CPU), V ∈ {256, …, 65,536} (V/D 16 to 4096), each V for
  max(1500, 6·V/64) steps (every symbol in ≥ 6 sequences); AdamW lr ∈ {1e-3, 1e-2} and
  SGD-momentum lr ∈ {0.1, 1}, 3 seeds, V ascending. The report keeps, per V and optimizer, the
  lr with the best mean held-out accuracy: mean ± 95% CI, and the V/D where learning fails.
- `coverage_cpu` (≈ 35 min on 2 cores): `vocab_cpu` at V = 16,384 (V/D = 1024, where it
  fails) with 4× the steps, so every symbol is in ≥ 24 sequences, each optimizer at its best
  `vocab_cpu` lr there (AdamW 1e-2, SGD 0.1), 3 seeds: is the failure data or V/D?
- `paper`: a Llama-3-style trunk of D=768, 12 layers, 12 heads, SwiGLU d_ff=2816 (106.2M
  parameters besides the embedding and head), sequences of 64, batch 256, 20,000 steps, bf16,
  500 warmup steps, cosine decay to 10%, clipping at 1.0; V ∈ {256, …, 262144} (V/D from 0.33
  to 341), tied and untied, AdamW lr ∈ {3e-4, 1e-3, 3e-3} and SGD-momentum lr ∈ {0.03, 0.1,
  0.3} (centred on the lr that learned on CPU). Coverage is ≥ 19.5 sequences per symbol. Mesh
  data × fsdp=4 × tensor=4 (`plan --tune`'s choice at V=262,144 on v5p-64: a multiple of 16
  chips).
"""

import math

import numpy as np

from lmhead_jax.reporting import metrics, plots, stats
from lmhead_jax.runs import cli, sweep
from lmhead_jax.runs.experiment import base_config

VOCAB_AXIS = (256, 1024, 4096, 16384, 65536)  # vocab_cpu, at D = 16: V/D from 16 to 4096
VOCAB_LRS = {"adamw": (1e-3, 1e-2), "sgd": (0.1, 1.0)}
SEEDS = (0, 1, 2)
COVERAGE = 6  # vocab_cpu: sequences per symbol at least
LEARNED = 0.99  # held-out accuracy that counts as learned


def get_config(preset: str = "smoke"):
  cfg = base_config()
  cfg.data.update(kind="spamlang", seq_len=32, exclude_first=True)
  cfg.optimizer.update(name="adamw", learning_rate=1e-2, warmup_steps=10)
  if preset == "smoke":
    cfg.model.update(vocab_size=1024, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=128)
    cfg.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, eval_batches=2)
    cfg.checkpoint.update(every=100, keep=2)
  elif preset in ("demo", "cpu"):
    cfg.model.update(vocab_size=4096, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=None)
    cfg.train.update(steps=1500, batch_size=32, log_every=25, bottleneck_every=50,
                     eval_every=0, eval_batches=4)
    cfg.checkpoint.update(every=500, keep=1)
    cfg.sweep = (
        {"model.d_model": (4, 8, 16, 32, 64, 128), "seed": SEEDS},
        {"model.d_model": (8, 64), "optimizer.name": ("sgd",),
         "optimizer.learning_rate": (0.1, 1.0, 10.0), "seed": SEEDS},
        {"model.d_model": (8, 64), "model.tie_embeddings": (True,), "seed": SEEDS})
    if preset == "demo":  # the cpu preset's pair that learns (V/D=64) and fails (V/D=512)
      cfg.sweep = ({"model.d_model": (64, 8), "optimizer.name": ("sgd",),
                    "optimizer.learning_rate": (0.1,), "seed": (0,)},)
  elif preset in ("vocab_cpu", "coverage_cpu"):  # the paper's axis: V grows at a fixed D
    cfg.model.update(d_model=16, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=None)
    cfg.data.seq_len = 8
    cfg.head.chunk_size = 32
    cfg.train.update(batch_size=64, log_every=50, bottleneck_every=100, eval_every=0,
                     eval_batches=4)
    cfg.checkpoint.update(every=0)
    cfg.sweep = (vocab_grids(cfg.train.batch_size) if preset == "vocab_cpu" else
                 vocab_grids(cfg.train.batch_size, (16384,), 4 * COVERAGE,
                             {"adamw": (1e-2,), "sgd": (0.1,)}))
  elif preset == "paper":
    cfg.model.update(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2816,
                     dtype="bfloat16")
    cfg.data.seq_len = 64
    cfg.optimizer.update(warmup_steps=500, schedule="cosine", end_lr_fraction=0.1,
                         clip_norm=1.0)
    cfg.train.update(steps=20_000, batch_size=256, log_every=50, bottleneck_every=100,
                     eval_every=2000, eval_batches=8)
    cfg.checkpoint.update(every=2000, keep=2)
    cfg.mesh.update(data=-1, fsdp=4, tensor=4)
    v = {"model.vocab_size": (256, 1024, 4096, 16384, 65536, 262144),
         "model.tie_embeddings": (False, True)}
    cfg.sweep = (v | {"optimizer.name": ("adamw",), "optimizer.learning_rate": (3e-4, 1e-3, 3e-3)},
                 v | {"optimizer.name": ("sgd",), "optimizer.learning_rate": (0.03, 0.1, 0.3)})
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/spamlang.py "
                     "(known: smoke, demo, cpu, vocab_cpu, coverage_cpu, paper)")
  return cfg


def vocab_grids(batch_size: int, vocab_axis=VOCAB_AXIS, coverage=COVERAGE,
                lrs_by_optimizer=VOCAB_LRS) -> tuple:
  """Runs over V, ascending: per V, each optimizer's lr grid × SEEDS, for
  max(1500, coverage·V / batch) steps (every symbol in ≥ coverage sequences)."""
  grids = []
  for v in vocab_axis:
    base = {"model.vocab_size": (v,), "seed": SEEDS,
            "train.steps": (max(1500, math.ceil(coverage * v / batch_size)),)}
    grids += [base | {"optimizer.name": (name,), "optimizer.learning_rate": lrs}
              for name, lrs in lrs_by_optimizer.items()]
  return tuple(grids)


def describe(cfg) -> dict:
  v, d = cfg.model.vocab_size, cfg.model.d_model
  return {"V": v, "D": d, "V/D": v / d, "seed": cfg.seed, "optimizer": cfg.optimizer.name,
          "lr": cfg.optimizer.learning_rate, "tied": cfg.model.tie_embeddings,
          "coverage": cfg.train.steps * cfg.train.batch_size / v}


def arm(e: dict) -> str:
  return f"{e['optimizer']} lr={e['lr']:g}" + (" tied" if e["tied"] else "")


def held_out_accuracy(e: dict) -> float | None:
  """A run's final held-out accuracy, 0 for a diverged run."""
  return 0.0 if e.get("diverged") else e.get("eval/accuracy")


def by_arm(entries: list[dict]) -> dict:
  """{(arm, V/D): numbers over seeds}: held-out accuracy (diverged: 0), loss and destroyed_ratio
  (mean ± 95% CI), and the accuracy's paired difference (same seed) from the same arm at
  `reference`, the lowest V/D that every arm has."""
  cells = {}
  for e in entries:
    cell, seed = cells.setdefault((arm(e), e["V/D"]), {}), e.get("seed", 0)
    if seed in cell:
      raise ValueError(f"runs {cell[seed]['run']} and {e['run']} share arm {arm(e)!r}, "
                       f"V/D {e['V/D']:g} and seed {seed}")
    cell[seed] = e
  arms = {a for a, _ in cells}
  common = set.intersection(*({r for a2, r in cells if a2 == a} for a in arms))
  reference = min(common, default=None)
  out = {}
  for (a, ratio), runs in cells.items():
    per_seed = {seed: held_out_accuracy(e) for seed, e in runs.items()}
    reference_seed = {seed: held_out_accuracy(e)
                      for seed, e in cells.get((a, reference), {}).items()}
    first = next(iter(runs.values()))
    out[a, ratio] = {
        "arm": a, "V/D": ratio, "D": first["D"], "coverage": first["coverage"],
        "n": len(runs), "diverged": sum(bool(e.get("diverged")) for e in runs.values()),
        "accuracy": stats.summary(per_seed.values()),
        "versus": (reference, stats.paired(per_seed, reference_seed)),
        "loss": stats.summary(e.get("eval/loss") for e in runs.values()),
        "destroyed_ratio": stats.summary(
            e.get("bottleneck/destroyed_ratio") for e in runs.values()),
        "wall_s": stats.summary(e.get("wall_s") for e in runs.values())["mean"]}
  return dict(sorted(out.items()))


def _versus(cell: dict) -> str:
  reference, diff = cell["versus"]
  if reference == cell["V/D"]:
    return "(reference)"
  return "" if reference is None else paired_text(diff)


def paired_text(diff: dict) -> str:
  """A `stats.paired` difference as "mean ± CI (p = …)"; "" when no seed pairs."""
  p = f" (p = {diff['p']:.2g})" if diff["p"] is not None else ""
  return f"{stats.text(diff, 3)}{p}" if diff["mean"] is not None else ""


COLUMNS = {
    "V/D": lambda c: c["V/D"], "D": lambda c: c["D"], "arm": lambda c: c["arm"],
    "n": lambda c: c["n"], "diverged": lambda c: c["diverged"],
    "accuracy (held-out)": lambda c: stats.text(c["accuracy"], 4),
    "Δ accuracy, paired, vs the arm's reference V/D": _versus,
    "loss (held-out)": lambda c: stats.text(c["loss"], 4) if c["loss"]["n"] else "",
    "destroyed_ratio": lambda c: (stats.text(c["destroyed_ratio"], 4)
                                  if c["destroyed_ratio"]["n"] else ""),
    "coverage": lambda c: c["coverage"], "wall (s), mean": lambda c: c["wall_s"]}


def report(workdir, entries: list[dict], fmt: str = "png") -> str:
  """The results table over seeds (`by_arm`); figures saved into the workdir (the curves: the
  first arm's lowest seed)."""
  cells = by_arm(entries)
  ratios = [e["V/D"] for e in entries]
  chance = {"chance": ([min(ratios), max(ratios)], [1 / entries[0]["V"]] * 2)}
  arms = {}
  for c in cells.values():
    arms.setdefault(c["arm"], []).append(c)
  n = max(c["n"] for c in cells.values())
  plots.lines({a: (np.array([c["V/D"] for c in cs]), np.array([c["accuracy"]["mean"] for c in cs]))
               for a, cs in arms.items()},
              f"{workdir}/accuracy_vs_ratio.{fmt}", xlabel="V / D", ylabel="held-out accuracy",
              title="SpamLang: final held-out accuracy"
              + (f" (mean ± 95% CI, {n} seeds)" if n > 1 else ""), logx=True, connect=False,
              errors={a: np.array([c["accuracy"]["ci95"] or np.nan for c in cs])
                      for a, cs in arms.items()},
              reference=chance, reference_label=f"chance: 1/V = 1/{entries[0]['V']}")
  seed = min(e.get("seed", 0) for e in entries)
  first = [e for e in entries if arm(e) == arm(entries[0]) and e.get("seed", 0) == seed]
  by_ratio = lambda e: f"V/D={e['V/D']:g}"
  title = f"SpamLang, {arm(entries[0])}" + (f", seed {seed}" if "seed" in entries[0] else "")
  destroyed = plots.over_training(workdir, first, "bottleneck/destroyed_ratio", by_ratio)
  baselines = {by_ratio(e): math.sqrt(1 - e["D"] / e["V"]) for e in first}
  plots.lines(destroyed, f"{workdir}/destroyed_ratio_curves.{fmt}", xlabel="step",
              ylabel="destroyed_ratio", title=title, markers=False,
              reference={k: (x[[0, -1]], [baselines[k]] * 2) for k, (x, _) in destroyed.items()},
              reference_label="isotropic G: √(1 − D/V)")
  accuracy = plots.over_training(workdir, first, "accuracy", by_ratio)
  chance = {by_ratio(e): 1 / e["V"] for e in first}
  plots.lines(accuracy, f"{workdir}/accuracy_curves.{fmt}", xlabel="step",
              ylabel="train accuracy (each step's batch)", title=title, markers=False,
              reference={k: (x[[0, -1]], [chance[k]] * 2) for k, (x, _) in accuracy.items()},
              reference_label="chance: 1/V")
  return ("mean ± 95% CI over seeds (Student t; diverged runs count as accuracy 0)\n\n"
          + metrics.markdown_table(list(cells.values()), COLUMNS))


def by_vocab(entries: list[dict]) -> dict:
  """{optimizer: {V: numbers}}: per V, the lr with the highest mean held-out accuracy over
  seeds (diverged: 0), its accuracy per seed and over seeds and its loss (mean ± 95% CI), and
  whether it learned (mean accuracy ≥ LEARNED)."""
  out = {}
  for e in entries:
    runs = out.setdefault(e["optimizer"], {}).setdefault(e["V"], {}).setdefault(e["lr"], {})
    if e["seed"] in runs:
      raise ValueError(f"{e['optimizer']} at V {e['V']} and lr {e['lr']:g} has two runs of one "
                       f"seed: {runs[e['seed']]['run']}, {e['run']}")
    runs[e["seed"]] = e
  for per_v in out.values():
    for v, per_lr in per_v.items():
      lr, by_seed = max(per_lr.items(), key=lambda kv: stats.summary(
          map(held_out_accuracy, kv[1].values()))["mean"] or 0)
      runs = list(by_seed.values())
      per_seed = {seed: held_out_accuracy(e) for seed, e in by_seed.items()}
      accuracy = stats.summary(per_seed.values())
      per_v[v] = {"lr": lr, "V/D": runs[0]["V/D"], "coverage": runs[0]["coverage"],
                  "per_seed": per_seed, "accuracy": accuracy,
                  "learned": (accuracy["mean"] or 0) >= LEARNED,
                  "loss": stats.summary([e.get("eval/loss") for e in runs]),
                  "destroyed_ratio": stats.summary(
                      [e.get("bottleneck/destroyed_ratio") for e in runs])}
  return out


def vocab_report(workdir, entries: list[dict], fmt: str = "png") -> str:
  """`by_vocab`'s table, with each optimizer's accuracy minus the first one's at the same V
  (both at their best lr, paired by seed), and the accuracy-against-V figure, saved into the
  workdir."""
  found = by_vocab(entries)
  first = next(iter(found))
  versus = lambda r: ("(reference)" if r[0] == first else paired_text(
      stats.paired(r[2]["per_seed"], found[first].get(r[1], {}).get("per_seed", {}))))
  d = entries[0]["D"]
  series = {name: (np.array(list(per_v), float),
                   np.array([x["accuracy"]["mean"] for x in per_v.values()], float))
            for name, per_v in found.items()}
  errors = {name: np.array([x["accuracy"]["ci95"] or np.nan for x in per_v.values()])
            for name, per_v in found.items()}
  vs = np.array(sorted({e["V"] for e in entries}), float)
  plots.lines(series, f"{workdir}/accuracy_vs_vocab.{fmt}", xlabel=f"V (D = {d})", logx=True,
              ylabel="held-out accuracy (best lr)", connect=False, errors=errors,
              title=f"SpamLang at fixed D = {d} (mean ± 95% CI, {len(SEEDS)} seeds)",
              reference={"chance": (vs, 1 / vs)}, reference_label="chance: 1/V")
  rows = [(name, v, x) for name, per_v in found.items() for v, x in sorted(per_v.items())]
  lines = []
  for name, per_v in found.items():
    learned = [x["V/D"] for x in per_v.values() if x["learned"]]
    failed = [x["V/D"] for x in per_v.values() if not x["learned"]]
    up_to = f"learns up to V/D = {max(learned):g}" if learned else "learns at no V/D"
    lines.append(f"- {name}: {up_to}; first failure at "
                 f"V/D = {f'{min(failed):g}' if failed else 'none'}")
  return ("\n".join(lines) + "\n\n" + metrics.markdown_table(rows, {
      "optimizer": lambda r: r[0], "V": lambda r: r[1], "V/D": lambda r: r[2]["V/D"],
      "best lr": lambda r: r[2]["lr"], "coverage": lambda r: r[2]["coverage"],
      "held-out accuracy": lambda r: stats.text(r[2]["accuracy"], 3),
      f"− {first} (paired)": versus, "held-out loss": lambda r: stats.text(r[2]["loss"], 3),
      "destroyed_ratio": lambda r: stats.text(r[2]["destroyed_ratio"], 3),
      "learned": lambda r: r[2]["learned"]}))


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  entries = sweep.run(cfg, workdir, describe)
  if any({"model.vocab_size", "seed"} <= set(grid) for grid in cfg.get("sweep") or ()):
    sweep.publish(workdir, lambda: vocab_report(workdir, entries, fmt))
  elif cfg.get("sweep"):
    sweep.publish(workdir, lambda: report(workdir, entries, fmt))
  else:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in entries[0].items()})


if __name__ == "__main__":
  cli.main(main)
