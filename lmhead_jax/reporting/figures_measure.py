"""Figures of the measurement experiments (matplotlib, imported on first use), saved by
`plots.save` as PNG, SVG or PDF by the path's suffix."""

import math

from lmhead_jax.reporting.plots import GRAY, PALETTE, pyplot, save


def destroyed(results: list[dict], path) -> None:
  """destroyed_ratio (batch, ± 95% CI) and token_destroyed_ratio per model, with √(1 − rank/V)
  dashed across each model's slot; the legend above the axes."""
  fig, ax = pyplot().subplots(figsize=(max(4.0, 1.1 * len(results) + 1.5), 3.8), dpi=130,
                              layout="constrained")
  x = range(len(results))
  ax.hlines([r["baseline"] for r in results], [i - 0.3 for i in x], [i + 0.3 for i in x],
            colors=GRAY, linestyles="--", lw=1.1, label="random subspace √(1 − rank/V)",
            gid="reference")
  for dx, key, label, color in ((-0.12, "destroyed_ratio", "destroyed (batch G)", PALETTE[0]),
                                (0.12, "token_destroyed_ratio", "destroyed (per token)",
                                 PALETTE[1])):
    ax.errorbar([i + dx for i in x], [r[key]["mean"] for r in results],
                yerr=[r[key]["ci95"] or 0.0 for r in results], fmt="o", capsize=3, label=label,
                color=color)
  ax.set_xticks(list(x), [f"{r['name']}\nD={r['d_model']} V={r['vocab_size']}" for r in results],
                fontsize=7)
  ax.set_xlim(-0.5, len(results) - 0.5)
  ax.set_ylabel("‖G(I − Π)‖ / ‖G‖")
  ax.grid(alpha=0.3)
  fig.legend(loc="outside upper center", ncol=3, fontsize=7, frameon=False)
  save(fig, path)


def _nan(v):
  return math.nan if v is None else v


def _spectrum_figure(results: list[dict]):
  """Top: numerical rank, effective rank, k_70 and k_99.9 of G against the tokens N, with V and 2D
  dashed; bottom: residual_2d. One column per model, the legend below the panels."""
  fig, axes = pyplot().subplots(2, len(results), figsize=(4.2 * len(results), 5.6), dpi=130,
                                squeeze=False, sharex="col", height_ratios=(2, 1),
                                layout="constrained")
  keys = ("numerical_rank_fine", "numerical_rank", "effective_rank", "k_999", "k_70")
  for top, bottom, r in zip(axes[0], axes[1], results):
    n = [p["tokens"] for p in r["points"]]
    top.set_prop_cycle(color=PALETTE)
    for key in keys:
      top.plot(n, [_nan(p[key]) for p in r["points"]], "o-", ms=3, label=key)
    top.axhline(r["vocab_size"], ls="--", c="k", lw=0.9, label="V")
    top.axhline(2 * r["d_model"], ls=":", c=GRAY, lw=1.1, label="2D")
    top.set(xscale="log", yscale="log", title=r["name"])
    bottom.plot(n, [_nan(p["residual_2d"]) for p in r["points"]], "o-", ms=3, color=PALETTE[-1],
                label="residual_2d = ‖G − G₂D‖ / ‖G‖")
    bottom.set(xscale="log", ylim=(0, 1.02), xlabel="tokens N")
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("components of G")
  axes[1][0].set_ylabel("residual at rank 2D")
  handles = [h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]]
  fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
  return fig


def spectrum(results: list[dict], path) -> None:
  """The spectrum figure (`_spectrum_figure`) at `path`."""
  save(_spectrum_figure(results), path)


def update(results: list[dict], path) -> None:
  """Loss decrease against the step norm ε, one panel per model, one line per direction; the
  legend below the panels."""
  fig, axes = pyplot().subplots(1, len(results), figsize=(4.2 * len(results), 3.9), dpi=130,
                                squeeze=False, sharey=True, layout="constrained")
  for ax, r in zip(axes[0], results):
    ax.set_prop_cycle(color=PALETTE)
    for name, d in r["directions"].items():
      dec = [-x if x < 0 else math.nan for x in d["loss_change"]]
      ax.plot(r["eps"], dec, "o-", ms=3, label=f"U = {d['label']}")
    ax.set(xscale="log", yscale="log", xlabel="ε (per-token logit step norm)",
           title=f"{r['name']} (D={r['d_model']}, V={r['vocab_size']})")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss decrease  ℒ(Z) − ℒ(Z + ε√N U/‖U‖)")
  fig.legend(handles=axes[0][0].get_legend_handles_labels()[0], loc="outside lower center",
             ncol=4, fontsize=7, frameon=False)
  save(fig, path)
