"""Controlled pretraining: one Llama-3-style trunk, a factorized head logits = A(B h) of rank r.

Only `head.rank` (and the seed) varies between runs (DIR/<run>/, lmhead_jax.runs.sweep). The
report gives, per r over seeds (mean ± 95% CI): the final held-out loss and its paired difference
against the lowest rank (same seed); the tokens to reach the target, the lowest rank's highest
final held-out loss over seeds (linearly interpolated between evaluations); the paired speed-up,
per seed the lowest rank's tokens to the target over r's (the paper: ≈16×, r = 4096 against
r = 32); and the last step's bottleneck metrics: DIR/results.md (with figures) and
DIR/over_seeds.json.

Presets:
- `paper`: V=49,152 (SmolLM2 tokenizer), D=4096, 6 layers, 32 heads with 8 KV heads, SwiGLU
  d_ff=18,432 (4.5·D, a multiple of 1024), bf16, r ∈ {32, …, 4096}: 1.81B (r=32) to 2.03B
  (r=4096) parameters, the paper's "1.8–2.0B" at its one-decimal precision. AdamW (0.9, 0.95,
  eps 1e-8, weight decay 0.1), peak lr 3e-4, 500 warmup steps, cosine decay to 10%, clipping at
  1.0; 512 sequences of 2048 tokens per step (1M tokens) in one pass, 10,500 steps = 11.0B tokens;
  data parallel × FSDP over 4 (`plan --tune`'s choice for v5p-64); the chunked head
  (`head.chunk_size=4096`); one seed (8 runs). `data.path` and `data.eval_path` must name token
  directories (FineWeb-Edu, made by `python -m lmhead_jax.data.prepare --tokenizer <SmolLM2
  tokenizer.json> ...`).
- `cpu` (≈ 40 min a seed on 2 cores; 3 seeds, run seed by seed): the Python standard library
  corpus with a byte-level BPE of 4096, built once into DIR/corpus/ when `data.path` is empty
  (`stdlib_corpus=True`); D=128, 2 layers, 4 heads with 2 KV heads, d_ff=512; r ∈ {4, 8, …,
  128}; 16 sequences of 128 tokens per step, 1,200 steps (2.5M tokens); AdamW lr 3e-3, 60
  warmup steps, cosine to 10%, weight decay 0.1, clipping at 1.0; held-out loss every 50 steps on
  8 batches of the corpus's val split.
"""

import json
import os

import numpy as np
from etils import epath

from lmhead_jax.data import prepare
from lmhead_jax.reporting import metrics, plots, stats
from lmhead_jax.tools import costs
from lmhead_jax.runs import cli, experiment, sweep


def get_config(preset: str = "cpu"):
  cfg = experiment.base_config()
  with cfg.unlocked():
    cfg.stdlib_corpus = False  # an empty data.path: build DIR/corpus/ from the stdlib
  cfg.head.kind = "factorized"
  cfg.data.update(kind="tokens", path="", eval_path="")
  cfg.optimizer.update(name="adamw", schedule="cosine", end_lr_fraction=0.1, weight_decay=0.1,
                       b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  if preset == "paper":
    cfg.model.update(vocab_size=49152, d_model=4096, n_layers=6, n_heads=32, n_kv_heads=8,
                     d_ff=18432, dtype="bfloat16", remat=True)
    cfg.data.seq_len = 2048
    cfg.head.chunk_size = 4096  # fused head + CE: 4096×V logits live, not 32k×V per device
    cfg.optimizer.update(learning_rate=3e-4, warmup_steps=500)
    # `plan --slice=v5p-64 --tune` ranked layouts × grad_accum × remat by predicted step time and
    # compiled the best: data=8 × fsdp=4 in one pass, 33–34 GB per chip (docs/PERFORMANCE.md).
    cfg.train.update(steps=10_500, batch_size=512, grad_accum=1, log_every=10,
                     bottleneck_every=50, eval_every=500, eval_batches=16)
    cfg.checkpoint.update(every=500, keep=2)
    cfg.mesh.update(data=-1, fsdp=4, tensor=1)
    cfg.sweep = ({"head.rank": (32, 64, 128, 256, 512, 1024, 2048, 4096)},)
  elif preset == "cpu":
    cfg.stdlib_corpus = True
    cfg.model.update(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     d_ff=512, max_seq_len=128)
    cfg.data.seq_len = 128
    cfg.optimizer.update(learning_rate=3e-3, warmup_steps=60)
    cfg.train.update(steps=1200, batch_size=16, log_every=10, bottleneck_every=100,
                     eval_every=50, eval_batches=8)
    cfg.checkpoint.update(every=400, keep=1)
    cfg.sweep = tuple({"head.rank": (4, 8, 16, 32, 64, 128), "seed": (seed,)}
                      for seed in (0, 1, 2))  # seed by seed: each seed's ranks, then the next
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/rank_sweep.py (known: cpu, paper)")
  return cfg


def use_stdlib_corpus(cfg, workdir) -> None:
  """Points an empty `data.path` at DIR/corpus/: the stdlib with a BPE of model.vocab_size."""
  if cfg.data.path:
    return
  if not cfg.stdlib_corpus:
    raise ValueError("data.path is empty: pass --config.data.path=<token dir> and "
                     "--config.data.eval_path=<token dir> (see lmhead_jax.data.prepare)")
  out = os.path.join(workdir, "corpus")
  if not os.path.exists(os.path.join(out, "val", "index.json")):  # written last
    prepare.prepare(out, stdlib=True, train_bpe_vocab=cfg.model.vocab_size, val_fraction=0.01)
  cfg.data.update(path=os.path.join(out, "train"), eval_path=os.path.join(out, "val"))


def describe(cfg) -> dict:
  v, r = cfg.model.vocab_size, cfg.head.rank
  params = costs.param_counts(*experiment.configs(cfg))["total"]
  return {"r": r, "V": v, "V/r": v / r, "params": params, "seed": cfg.seed,
          "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len}


def summarize(workdir, entries: list[dict]) -> dict:
  """{r: numbers over seeds} (module docstring); paired: the same seed at the lowest rank."""
  by = {}
  for e in entries:
    by.setdefault(e["r"], {})[e["seed"]] = e
  lowest = by[min(by)]
  final = lambda runs: {s: e.get("eval/loss") for s, e in runs.items()}
  target = max((v for v in final(lowest).values() if v is not None), default=float("nan"))
  tokens = lambda runs: {s: metrics.tokens_to_target(*metrics.run_curve(workdir, e), target)
                         for s, e in runs.items()}
  base = tokens(lowest)
  out = {}
  for r, runs in sorted(by.items()):
    reach = tokens(runs)
    speedup = {s: base[s] / t if t > 0 else None  # None: never reached the target
               for s, t in reach.items() if s in base}
    last = lambda key: stats.summary([e.get(key) for e in runs.values()])
    out[r] = {"target": target, "eval_loss": stats.summary(final(runs).values()),
              "minus_lowest": stats.paired(final(runs), final(lowest)),
              "tokens_to_target": stats.summary(reach.values()),
              "speedup": stats.summary(speedup.values()),
              "destroyed_ratio": last("bottleneck/destroyed_ratio"),
              "visible_cosine": last("bottleneck/visible_cosine"), "wall_s": last("wall_s")}
  return out


def report(workdir, found: dict, entries: list[dict], fmt: str = "png") -> str:
  """The table of `summarize`'s numbers; loss-curve and destroyed-ratio figures saved into the
  workdir."""
  ranks = sorted(found)
  curves = {f"r={r}": metrics.mean_curve([metrics.run_curve(workdir, e) for e in entries
                                          if e["r"] == r]) for r in ranks}
  n = len({e["seed"] for e in entries})
  plots.lines(curves, f"{workdir}/loss_vs_tokens.{fmt}", xlabel="tokens",
              ylabel="held-out loss", markers=False,
              title="Head rank sweep" + (f" (mean over {n} seeds)" if n > 1 else ""))
  r_x = np.array(ranks, float)
  destroyed = [found[r]["destroyed_ratio"] for r in ranks]
  plots.lines({"measured (last step)": (r_x, np.array([d["mean"] for d in destroyed], float))},
              f"{workdir}/destroyed_vs_rank.{fmt}", xlabel="head rank r",
              ylabel="destroyed_ratio", title="Gradient destroyed by the head", logx=True,
              connect=False, errors={"measured (last step)": np.array(
                  [d["ci95"] if d["ci95"] is not None else np.nan for d in destroyed])},
              reference={"isotropic": (r_x, np.sqrt(1 - r_x / entries[0]["V"]))},
              reference_label="isotropic G: √(1 − r/V)")
  one = {e["r"]: e for e in entries}
  columns = {
      "r": lambda r: r, "V/r": lambda r: one[r]["V/r"],
      "params": lambda r: f"{one[r]['params'] / 1e6:.2f}M",
      "held-out loss": lambda r: stats.text(found[r]["eval_loss"]),
      f"− r={ranks[0]} (paired)": lambda r: stats.text(found[r]["minus_lowest"], 3),
      "tokens to target": lambda r: stats.text(found[r]["tokens_to_target"], 4),
      "speed-up (paired)": lambda r: stats.text(found[r]["speedup"], 4),
      "destroyed_ratio": lambda r: stats.text(found[r]["destroyed_ratio"]),
      "visible_cosine": lambda r: stats.text(found[r]["visible_cosine"], 3),
      "wall (s)": lambda r: stats.text(found[r]["wall_s"], 3)}
  return (f"{n} seed{'s' * (n > 1)}; mean ± 95% CI (Student t). target: r={ranks[0]}'s highest "
          f"final held-out loss over seeds, {found[ranks[0]]['target']:.4f}\n\n"
          + metrics.markdown_table(ranks, columns))


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  use_stdlib_corpus(cfg, workdir)
  entries = sweep.run(cfg, workdir, describe)

  def write():
    found = summarize(workdir, entries)
    (epath.Path(workdir) / "over_seeds.json").write_text(json.dumps(found, indent=2))
    return report(workdir, found, entries, fmt)

  sweep.publish(workdir, write)


if __name__ == "__main__":
  cli.main(main)
