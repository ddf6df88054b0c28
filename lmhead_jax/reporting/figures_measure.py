"""Figures of the measurement experiments (matplotlib, imported on first use)."""

import math


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def destroyed(results: list[dict], path) -> None:
  """destroyed_ratio (batch, ± 95% CI) and token_destroyed_ratio per model, with √(1 − rank/V)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(results) + 1.5), 3.6))
  x = range(len(results))
  for dx, key, label in ((-0.12, "destroyed_ratio", "destroyed (batch G)"),
                         (0.12, "token_destroyed_ratio", "destroyed (per token)")):
    ax.errorbar([i + dx for i in x], [r[key]["mean"] for r in results],
                yerr=[r[key]["ci95"] or 0.0 for r in results], fmt="o", capsize=3, label=label)
  ax.scatter(x, [r["baseline"] for r in results], marker="_", s=400, c="k",
             label="random subspace √(1 − rank/V)")
  ax.set_xticks(list(x), [f"{r['name']}\nD={r['d_model']} V={r['vocab_size']}" for r in results],
                fontsize=7)
  ax.set_ylabel("‖G(I − Π)‖ / ‖G‖")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def spectrum(results: list[dict], path) -> None:
  """Numerical rank, effective rank, k_70 and k_99.9 of G against the number of tokens N."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
  keys = ("numerical_rank_fine", "numerical_rank", "effective_rank", "k_999", "k_70")
  for ax, r in zip(axes[0], results):
    n = [p["tokens"] for p in r["points"]]
    for key in keys:
      ax.plot(n, [p[key] if p[key] is not None else math.nan for p in r["points"]], "o-",
              ms=3, label=key)
    ax.axhline(r["vocab_size"], ls="--", c="k", lw=0.8, label="V")
    ax.axhline(2 * r["d_model"], ls=":", c="gray", lw=0.8, label="2D")
    ax.set(xscale="log", yscale="log", xlabel="tokens N", title=r["name"])
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("components of G")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def update(results: list[dict], path) -> None:
  """Loss decrease against the step norm ε, one panel per model, one line per direction."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False,
                           sharey=True)
  for ax, r in zip(axes[0], results):
    for name, d in r["directions"].items():
      dec = [-x if x < 0 else math.nan for x in d["loss_change"]]
      ax.plot(r["eps"], dec, "o-", ms=3, label=f"U = {d['label']}")
    ax.set(xscale="log", yscale="log", xlabel="ε (per-token logit step norm)",
           title=f"{r['name']} (D={r['d_model']}, V={r['vocab_size']})")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss decrease  ℒ(Z) − ℒ(Z + ε√N U/‖U‖)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
