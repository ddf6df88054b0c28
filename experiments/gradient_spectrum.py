"""The spectrum of the logit gradient G as the batch grows: ranks, k_70, k_99.9, rank-2D residual.

Presets:
- `cpu`: offline, V = 4096 (a byte-level BPE of the Python standard library), a fresh D = 64
  model and one trained here for 300 steps, N up to 100k tokens; float64 Gram on the host.
- `pretrained`: HF checkpoints (`--config.checkpoints=...`, data as in measure_pretrained), N up
  to 500k tokens; the Gram (float64) when its row shard fits in `spectrum.gram_max_gib` per
  device and its host part (`gram.gram_gib`) in `spectrum.host_max_gib` (0: half the host's
  memory), else the top `spectrum.rank_k` σ by a randomized eigensolver. V = 50k takes
  37.7 GiB of host memory.

Writes WORKDIR/summary.json ({"models": [{..., "points": [one summary per N]}]}, definitions in
`lmhead_jax.analysis.gram`), prints a table and draws WORKDIR/spectrum_rank.png.
"""

import time

from lmhead_jax.analysis import gram, measure
from lmhead_jax.reporting import figures_measure, plots
from lmhead_jax.runs import cli, corpus, measurement


def get_config(preset: str = "cpu"):
  cfg = measurement.base_config()
  with cfg.unlocked():
    cfg.spectrum = dict(tokens="1000,2000,5000,10000,20000,50000,100000", method="auto",
                        gram_dtype="float64", gram_max_gib=16.0, host_max_gib=0.0, rank_k=8192,
                        power_iters=30)
  if preset == "cpu":
    measurement.cpu_preset(cfg, vocab_size=4096, fresh="64", batch_size=16)
  elif preset == "pretrained":
    cfg.data.update(seq_len=1024, stdlib=False)
    cfg.measure.batch_size = 16
    cfg.spectrum.tokens += ",200000,500000"
  else:
    raise ValueError(f"unknown preset {preset!r} for experiments/gradient_spectrum.py "
                     "(known: cpu, pretrained)")
  return cfg


def table(results: list[dict]) -> str:
  keys = ("tokens", "numerical_rank", "numerical_rank_fine", "effective_rank", "k_70", "k_999",
          "residual_2d")
  fmt = lambda x: "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)
  cell = lambda p, k: ("≤" if k == "residual_2d" and p.get("residual_2d_is_bound") else "") + fmt(p[k])
  rows = [("model", "V", "D") + keys]
  rows += [(r["name"], r["vocab_size"], r["d_model"]) + tuple(cell(p, k) for k in keys)
           for r in results for p in r["points"]]
  return measure.format_rows(rows)


def main(cfg, workdir):
  fmt = plots.figure_format(cfg)
  sp = cfg.spectrum
  tokens = [int(t) for t in corpus.split_list(sp.tokens)]

  def spectrum(s, source, mesh):
    method = gram.choose_method(sp.method, s.model_cfg.vocab_size, sp.gram_dtype, sp.gram_max_gib,
                                mesh.devices.size, sp.host_max_gib)
    t0 = time.perf_counter()
    points = gram.growing_spectrum(
        s, source, mesh, tokens=tokens, batch_size=cfg.measure.batch_size, method=method,
        gram_dtype=sp.gram_dtype, k=sp.rank_k, power_iters=sp.power_iters, seed=cfg.seed)
    return {"name": s.name, "vocab_size": s.model_cfg.vocab_size, "d_model": s.model_cfg.d_model,
            "head": s.head_cfg.kind, "method": method, "seconds": time.perf_counter() - t0,
            "points": points}

  measurement.measure_each(cfg, workdir, spectrum, table, figures_measure.spectrum,
                        f"spectrum_rank.{fmt}")


if __name__ == "__main__":
  cli.main(main)
