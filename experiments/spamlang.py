"""SpamLang: every sequence repeats one symbol; a head of width 2 could represent it.

Presets: `smoke` (one small run, about a minute on 2 CPU cores).
"""

from lmhead_jax import cli, runner
from lmhead_jax.config import base_config


def get_config(preset: str = "smoke"):
  cfg = base_config()
  cfg.data.update(kind="spamlang", seq_len=32, exclude_first=True)
  cfg.optimizer.update(name="adamw", learning_rate=1e-2, warmup_steps=10)
  if preset == "smoke":
    cfg.model.update(vocab_size=1024, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=128)
    cfg.train.update(steps=300, batch_size=32, log_every=25, eval_every=100, eval_batches=2)
    cfg.checkpoint.update(every=100, keep=2)
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/spamlang.py (known: smoke)")
  return cfg


def main(cfg, workdir):
  summary = runner.run(cfg, workdir)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


if __name__ == "__main__":
  cli.main(main)
