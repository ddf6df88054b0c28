"""bottleneck.head_loss against a plain CE, side by side in one process (issues 13, 23).

  python -m benchmarks.head_loss [--cases=small,large] [--repeats=15] [--chunk_size=1024]

Each variant is a jitted value_and_grad with respect to h and W on the same inputs:
  optax_ce       optax.softmax_cross_entropy_with_integer_labels, mean, on z = h Wᵀ (what a user
                 writes without this library)
  lmhead_ce      lmhead_jax.core.loss.cross_entropy on z = h Wᵀ
  head_loss      bottleneck.head_loss, dense: the loss and BottleneckStats
  fused_ce       loss.fused_head_loss(chunk_size) alone (the chunked plain CE)
  head_loss_chunked  bottleneck.head_loss(chunk_size)
  range_map      bottleneck.range_map(W) alone (the stats' fixed cost: QR of W, SVD of R)
With OPTIONS (softcap, z-loss, label smoothing):
  optax_options  optax on materialized logits: c·tanh(z/c), optax.smooth_labels and
                 softmax_cross_entropy, plus α·logsumexp² (what a user writes without us)
  head_loss_options, head_loss_options_chunked  bottleneck.head_loss(**OPTIONS), dense, chunked
The variants alternate call by call (the machine is shared and its load drifts); medians are
reported. Prints one JSON line per case with the ratios head_loss / plain.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmhead_jax import bottleneck
from lmhead_jax.core.loss import cross_entropy, fused_head_loss

CASES = {"small": dict(v=8192, d=64, n=2048), "large": dict(v=32768, d=256, n=8192)}
OPTIONS = dict(softcap=30.0, z_loss=1e-4, label_smoothing=0.1)


def optax_options(z, y):
  """The mean of OPTIONS' objective on materialized logits z, written with optax."""
  c, alpha, eps = OPTIONS["softcap"], OPTIONS["z_loss"], OPTIONS["label_smoothing"]
  s = c * jnp.tanh(z / c)
  labels = optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1]), eps)
  return jnp.mean(optax.softmax_cross_entropy(s, labels) + alpha * jax.nn.logsumexp(s, -1) ** 2)


def variants(y, chunk_size):
  """name -> f(h, w), each to be jitted."""
  logits = lambda h, w: h @ w.T
  optax_ce = lambda h, w: optax.softmax_cross_entropy_with_integer_labels(logits(h, w), y).mean()
  grad = lambda f, aux=False: jax.value_and_grad(f, (0, 1), has_aux=aux)
  return {
      "optax_ce": grad(optax_ce),
      "lmhead_ce": grad(lambda h, w: cross_entropy(logits(h, w), y)),
      "head_loss": grad(lambda h, w: bottleneck.head_loss(h, w, y), aux=True),
      "fused_ce": grad(lambda h, w: fused_head_loss(h, w, y, chunk_size=chunk_size)[0]),
      "head_loss_chunked": grad(
          lambda h, w: bottleneck.head_loss(h, w, y, chunk_size=chunk_size), aux=True),
      "range_map": lambda h, w: bottleneck.range_map(w),
      "optax_options": grad(lambda h, w: optax_options(logits(h, w), y)),
      "head_loss_options": grad(lambda h, w: bottleneck.head_loss(h, w, y, **OPTIONS), aux=True),
      "head_loss_options_chunked": grad(lambda h, w: bottleneck.head_loss(
          h, w, y, chunk_size=chunk_size, **OPTIONS), aux=True),
  }


def run_case(v, d, n, repeats, warmup, chunk_size) -> dict:
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(v, d)) / np.sqrt(d), jnp.float32)
  y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  fns = {k: jax.jit(f).lower(h, w).compile() for k, f in variants(y, chunk_size).items()}
  times = {k: [] for k in fns}
  for i in range(warmup + repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(h, w))
      if i >= warmup:
        times[k].append(time.perf_counter() - t)
  ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
  return {"V": v, "D": d, "tokens": n, "chunk_size": chunk_size, "repeats": repeats,
          "median_ms": {k: round(t, 2) for k, t in ms.items()},
          "head_loss_over_optax_ce": round(ms["head_loss"] / ms["optax_ce"], 4),
          "head_loss_over_lmhead_ce": round(ms["head_loss"] / ms["lmhead_ce"], 4),
          "chunked_head_loss_over_fused_ce": round(ms["head_loss_chunked"] / ms["fused_ce"], 4),
          "range_map_over_lmhead_ce": round(ms["range_map"] / ms["lmhead_ce"], 4),
          "head_loss_options_over_optax_options": round(
              ms["head_loss_options"] / ms["optax_options"], 4),
          "chunked_over_optax_options": round(
              ms["head_loss_options_chunked"] / ms["optax_options"], 4)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="small,large", help="comma-separated: small, large")
  parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
  parser.add_argument("--chunk_size", type=int, default=1024, help="tokens per chunk")
  args = parser.parse_args()
  for name in args.cases.split(","):
    if name not in CASES:
      parser.error(f"--cases: unknown case {name!r} (known: {', '.join(CASES)})")
    print(json.dumps({"case": name, "device": jax.devices()[0].device_kind,
                      **run_case(**CASES[name], repeats=args.repeats, warmup=args.warmup,
                                 chunk_size=args.chunk_size)}), flush=True)


if __name__ == "__main__":
  main()
