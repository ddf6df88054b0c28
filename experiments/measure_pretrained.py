"""How much of the logit gradient the LM head destroys, measured on pretrained (or fresh) models.

Presets:
- `cpu`: offline, a few minutes on 2 CPU cores. Fresh random-init models (D = 32, 64, 128 and a
  rank-16 factorized head, V = 8192) and one model trained here for 300 steps, on the Python
  standard library corpus (a byte-level BPE of 8192 ids trained on it).
- `pretrained`: HF checkpoints on text, sharded over every device, e.g.
  `--config.checkpoints=/ckpt/Llama-3.2-1B,/ckpt/pythia-410m --config.data.text=/data/docs.jsonl`.

Writes WORKDIR/summary.json ({"models": [...]}, see `lmhead_jax.analysis.measure`), prints a
table and draws WORKDIR/measure_destroyed.png. Models and data: `lmhead_jax.analysis.subjects`.
"""

from lmhead_jax.analysis import measure
from lmhead_jax.reporting import figures_measure, plots
from lmhead_jax.runs import cli, measurement


def get_config(preset: str = "cpu"):
  cfg = measurement.base_config()
  with cfg.unlocked():
    cfg.measure.chunk_len = 0  # positions per chunk of the logits (0: whole sequences)
  if preset == "cpu":
    measurement.cpu_preset(cfg, vocab_size=8192, fresh="32,64,128,128r16", batch_size=16)
    cfg.measure.num_sequences = 512
  elif preset == "pretrained":
    cfg.data.update(seq_len=1024, stdlib=False)
    cfg.measure.update(batch_size=32, num_sequences=10_000, chunk_len=256)
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/measure_pretrained.py "
                     "(known: cpu, pretrained)")
  return cfg


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  m = cfg.measure
  measurement.measure_each(
      cfg, workdir, lambda s, source, mesh: measure.measure(
          s, source, mesh, batch_size=m.batch_size, num_sequences=m.num_sequences,
          seed=cfg.seed, chunk_len=m.chunk_len or None),
      measure.table, figures_measure.destroyed, f"measure_destroyed.{fmt}")


if __name__ == "__main__":
  cli.main(main)
