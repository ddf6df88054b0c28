"""Equal-norm update directions: the loss drop of moving the logits along −G, −GΠ (hidden-only)
and −(GWWᵀ + HHᵀG) (joint SGD step), each scaled to the same norm, over a log grid of ε.

Presets:
- `cpu`: offline, V = 8192 (a byte-level BPE of the Python standard library): fresh D = 64 and
  D = 128 models and a D = 64 model trained here for 300 steps; one batch of 8×128 tokens each.
- `vocab_cpu`: the largest V/D here: V = 65,536 (the same corpus), fresh D = 16 and D = 64
  (V/D = 4096, 1024) and the trained D = 64; ε on a grid twice as fine, up to 1e4 (−GΠ's best ε
  lies beyond the default 30 here).
- `pretrained`: HF checkpoints (`--config.checkpoints=...`, data as in measure_pretrained).

Writes WORKDIR/summary.json ({"models": [...]}, definitions in `lmhead_jax.analysis.directions`),
prints the ratios by which −G beats each direction, and draws WORKDIR/update_directions.png.
"""

import jax
import numpy as np

from lmhead_jax.analysis import directions, gram, measure
from lmhead_jax.reporting import figures_measure, plots
from lmhead_jax.runs import cli, measurement


def get_config(preset: str = "cpu"):
  cfg = measurement.base_config()
  with cfg.unlocked():
    cfg.update_dir = dict(eps_min=1e-4, eps_max=30.0, eps_points=22)
  if preset == "cpu":
    measurement.cpu_preset(cfg, vocab_size=8192, fresh="64,128", batch_size=8)
  elif preset == "vocab_cpu":
    measurement.cpu_preset(cfg, vocab_size=65536, fresh="16,64", batch_size=8)
    cfg.head.chunk_size = 1024  # the trained model's 300 steps: 2k×65k logits a chunk at a time
    cfg.update_dir.update(eps_max=1e4, eps_points=63)  # twice as fine, each direction's best ε
  elif preset == "pretrained":
    cfg.data.update(seq_len=512, stdlib=False)
    cfg.measure.batch_size = 8
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/update_direction.py "
                     "(known: cpu, vocab_cpu, pretrained)")
  return cfg


def table(results: list[dict]) -> str:
  rows = [("model", "V", "D", "direction", "cos(−G, U)", "ratio 1st order", "ratio best ε")]
  rows += [(r["name"], r["vocab_size"], r["d_model"], r["directions"][k]["label"],
            f"{r['directions'][k]['cosine']:.4f}", f"{q['first_order']:.1f}", f"{q['best']:.2f}")
           for r in results for k, q in r["ratios"].items()]
  return measure.format_rows(rows)


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  u = cfg.update_dir
  eps = np.logspace(np.log10(u.eps_min), np.log10(u.eps_max), u.eps_points).astype(np.float32)

  def update_directions(s, source, mesh):
    h, y, m, _ = next(gram.hidden_chunks(s, source, mesh, num_tokens=1,
                                         batch_size=cfg.measure.batch_size, seed=cfg.seed))
    out = jax.device_get(directions.loss_curves(h.reshape(-1, h.shape[-1]),
                                                measure.head_matrix(s.params, s.head_cfg),
                                                y.reshape(-1), m.reshape(-1), eps))
    res = {k: {"label": directions.LABELS[k], "cosine": float(d["cosine"]),
               "loss_change": d["loss_change"].tolist(), "first_order": d["first_order"].tolist()}
           for k, d in out.items()}
    return {"name": s.name, "vocab_size": s.model_cfg.vocab_size, "d_model": s.model_cfg.d_model,
            "tokens": int(np.sum(jax.device_get(m))), "eps": eps.tolist(), "directions": res,
            "ratios": directions.ratios(res)}

  measurement.measure_each(cfg, workdir, update_directions, table, figures_measure.update,
                        f"update_directions.{fmt}")


if __name__ == "__main__":
  cli.main(main)
