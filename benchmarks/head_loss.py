"""bottleneck.head_loss against other fused linear cross-entropies, in one process (issues 13, 23).

  python -m benchmarks.head_loss [--cases=small,large,issue23,rank_sweep]
      [--dtypes=float32,bfloat16] [--variants=all] [--repeats=7] [--warmup=1]
      [--chunk_size=1024] [--wait_s=600] [--compile=v5p-8]

Each variant (`VARIANTS`) is a jitted value_and_grad in h[N, D] and W of a mean CE of z = h Wᵀ,
on the same inputs. tokamax and jax-cce are optional (`pip install tokamax jax-cce`); a variant
that does not import is listed with its error. Per variant: XLA's temporary bytes
(`memory_analysis`), the median time of fwd+bwd, and the process's peak RSS during its first call
(variants run in order of their temporaries, as freed memory can stay resident a while: an upper
bound close to the variant's own). The variants alternate call by call (the machine is shared
and its load drifts); medians. A call waits up to wait_s for its temporaries and outputs + 1 GiB
of free memory, else is skipped. Prints one JSON line per case and dtype (progress on stderr).
`--compile=SLICE` compiles instead for one chip of a TPU slice (`compile_case`).
"""

import argparse
import importlib
import json
import statistics
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil

from lmhead_jax.core import bottleneck
from lmhead_jax.core.loss import fused_head_loss

CASES = {"small": dict(v=8192, d=64, n=2048), "large": dict(v=32768, d=256, n=8192),
         "issue23": dict(v=131072, d=1024, n=8192),
         "rank_sweep": dict(v=49152, d=4096, n=32768)}  # the paper preset's tokens per chip
VOCAB_BLOCK = 8192  # fused_ce_blocked's
OPTIONS = dict(softcap=30.0, z_loss=1e-4, label_smoothing=0.1)
VARIANTS = {
    "optax_ce": "optax.softmax_cross_entropy_with_integer_labels on materialized z (fp32)",
    "fused_ce": "loss.fused_head_loss, dense: this library's CE without the stats",
    "fused_ce_chunked": "loss.fused_head_loss(chunk_size)",
    "fused_ce_blocked": "loss.fused_head_loss(chunk_size, vocab_block): online LSE over V",
    "head_loss": "bottleneck.head_loss, dense: the CE and its BottleneckStats",
    "head_loss_chunked": "bottleneck.head_loss(chunk_size)",
    "head_loss_refined": "head_loss, dense, W's range map refined from the last step's "
                         "(refine_range_map: a training loop's metric step)",
    "head_loss_chunked_refined": "the same, chunked",
    "range_map": "bottleneck.range_map(W) alone: the stats' fixed cost (no gradient)",
    "tokamax": "tokamax.linear_softmax_cross_entropy_loss, 'xla' (its CPU default; dense)",
    "tokamax_chunked": "the same, 'chunked_xla' (token blocks 1024, vocabulary blocks 2048)",
    "jax_cce": "jax_cce.linear_cross_entropy (vocabulary chunks of 4096)",
    "optax_options": "optax on materialized z with OPTIONS: tanh cap, smooth_labels, z-loss",
    "head_loss_options": "bottleneck.head_loss(**OPTIONS), dense",
    "head_loss_options_chunked": "bottleneck.head_loss(**OPTIONS, chunk_size)",
}
TRANSPOSED = ("tokamax", "tokamax_chunked")  # take W as [D, V], tokamax's layout
REFINED = ("head_loss_refined", "head_loss_chunked_refined")  # take the last map M' too
RATIOS = {  # of median times; "…_temp" of XLA temporaries
    "chunked_over_dense": ("head_loss_chunked", "head_loss"),
    "chunked_over_dense_temp": ("head_loss_chunked", "head_loss"),
    "stats_overhead_dense": ("head_loss", "fused_ce"),
    "stats_overhead_chunked": ("head_loss_chunked", "fused_ce_chunked"),
    "stats_overhead_dense_refined": ("head_loss_refined", "fused_ce"),
    "stats_overhead_chunked_refined": ("head_loss_chunked_refined", "fused_ce_chunked"),
    "head_loss_chunked_over_optax_ce": ("head_loss_chunked", "optax_ce"),
    "head_loss_chunked_over_tokamax_chunked": ("head_loss_chunked", "tokamax_chunked"),
    "head_loss_chunked_over_jax_cce": ("head_loss_chunked", "jax_cce"),
    "range_map_over_fused_ce_chunked": ("range_map", "fused_ce_chunked"),
    "head_loss_options_over_optax_options": ("head_loss_options", "optax_options"),
    "options_chunked_over_optax_options": ("head_loss_options_chunked", "optax_options"),
}


def _optional(module):
  """(the module, None), or (None, why it does not import)."""
  try:
    return importlib.import_module(module), None
  except Exception as e:  # an optional baseline may fail in any way (a jax it does not fit)
    return None, f"{type(e).__name__}: {e}"


tokamax, TOKAMAX_ERROR = _optional("tokamax")
jax_cce, JAX_CCE_ERROR = _optional("jax_cce")
UNAVAILABLE = {k: e for k, e in [("tokamax", TOKAMAX_ERROR), ("tokamax_chunked", TOKAMAX_ERROR),
                                 ("jax_cce", JAX_CCE_ERROR)] if e}


def logits(h_NxD, w_VxD):
  """z = h Wᵀ with float32 accumulation (and result), whatever the inputs' dtype."""
  return jnp.einsum("nd,vd->nv", h_NxD, w_VxD, preferred_element_type=jnp.float32)


def optax_options(z_NxV, y_N):
  """The mean of OPTIONS' objective on materialized logits z, written with optax."""
  c, alpha, eps = OPTIONS["softcap"], OPTIONS["z_loss"], OPTIONS["label_smoothing"]
  s = c * jnp.tanh(z_NxV / c)
  labels = optax.smooth_labels(jax.nn.one_hot(y_N, z_NxV.shape[-1]), eps)
  return jnp.mean(optax.softmax_cross_entropy(s, labels) + alpha * jax.nn.logsumexp(s, -1) ** 2)


def variants(y_N, chunk_size, vocab_block=VOCAB_BLOCK) -> dict:
  """name -> f(h, w) of every installed variant, each to be jitted; w is [D, V] for TRANSPOSED
  variants, else [V, D]; REFINED ones take f(h, w, m), m the range map of an earlier W. f
  returns (loss, (dh, dW)), loss being (loss, stats) for head_loss, or range_map's M."""
  grad = lambda f, aux=False: jax.value_and_grad(f, (0, 1), has_aux=aux)
  head = lambda **kw: grad(lambda h, w: bottleneck.head_loss(h, w, y_N, **kw), aux=True)
  refined = lambda **kw: grad(lambda h, w, m: bottleneck.head_loss(
      h, w, y_N, w_range_map=bottleneck.refine_range_map(jax.lax.stop_gradient(w), m)[0],
      **kw), aux=True)
  fns = {
      "optax_ce": grad(lambda h, w: optax.softmax_cross_entropy_with_integer_labels(
          logits(h, w), y_N).mean()),
      "fused_ce": grad(lambda h, w: fused_head_loss(h, w, y_N, chunk_size=None)[0]),
      "fused_ce_chunked": grad(lambda h, w: fused_head_loss(h, w, y_N, chunk_size=chunk_size)[0]),
      "fused_ce_blocked": grad(lambda h, w: fused_head_loss(
          h, w, y_N, chunk_size=chunk_size, vocab_block=vocab_block)[0]),
      "head_loss": head(),
      "head_loss_chunked": head(chunk_size=chunk_size),
      "head_loss_refined": refined(chunk_size=None),
      "head_loss_chunked_refined": refined(chunk_size=chunk_size),
      "range_map": lambda h, w: bottleneck.range_map(w),
      "optax_options": grad(lambda h, w: optax_options(logits(h, w), y_N)),
      "head_loss_options": head(**OPTIONS),
      "head_loss_options_chunked": head(chunk_size=chunk_size, **OPTIONS),
  }
  if tokamax is not None:
    for name, impl in (("tokamax", "xla"), ("tokamax_chunked", "chunked_xla")):
      fns[name] = grad(lambda h, w, impl=impl: tokamax.linear_softmax_cross_entropy_loss(
          h, y_N, w, reduction="mean", implementation=impl))
  if jax_cce is not None:
    fns["jax_cce"] = grad(lambda h, w: jax_cce.linear_cross_entropy(h, w, y_N))
  return {k: fns[k] for k in VARIANTS if k in fns}


def _call(f, args) -> tuple[float, int]:
  """(seconds, peak RSS in bytes sampled every 10 ms) of one call of f(*args)."""
  proc, done = psutil.Process(), threading.Event()
  peak = [proc.memory_info().rss]
  def sample():
    while not done.wait(0.01):
      peak[0] = max(peak[0], proc.memory_info().rss)
  sampler = threading.Thread(target=sample)
  sampler.start()
  start = time.perf_counter()
  jax.block_until_ready(f(*args))
  seconds = time.perf_counter() - start
  done.set()
  sampler.join()
  return seconds, peak[0]


def _memory_for(needed, wait_s) -> bool:
  """Whether `needed` bytes + 1 GiB are available, waiting up to wait_s seconds for them."""
  deadline = time.monotonic() + wait_s
  while psutil.virtual_memory().available < needed + 2**30:
    if time.monotonic() > deadline:
      return False
    time.sleep(5)
  return True


def run_case(v, d, n, dtype="float32", names=None, repeats=7, warmup=1, chunk_size=1024,
             wait_s=600) -> dict:
  """Compiles the variants `names` (default: all installed), runs those that fit, alternating,
  and returns times, memory and RATIOS as a JSON-ready dict."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(rng.normal(size=(v, d)) / np.sqrt(d), dtype)
  y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  fns = variants(y, chunk_size)
  unavailable = {k: UNAVAILABLE[k] for k in names or VARIANTS if k in UNAVAILABLE}
  names = [k for k in names or VARIANTS if k in fns]
  # W's own map: refining costs the same whatever M' is
  earlier_map = (jax.jit(bottleneck.range_map)(w),) if set(names) & set(REFINED) else ()
  args = {k: (h, w.T.copy() if k in TRANSPOSED else w) + (earlier_map if k in REFINED else ())
          for k in names}
  compiled = {k: jax.jit(fns[k]).lower(*args[k]).compile() for k in names}
  memory = {k: c.memory_analysis() for k, c in compiled.items()}
  temp = {k: m.temp_size_in_bytes for k, m in memory.items()}
  names.sort(key=temp.get)  # freed memory can stay resident: least first
  not_run, times, rss = {}, {k: [] for k in names}, dict.fromkeys(names, 0)
  for i in range(warmup + repeats):
    for k in names:
      needed = temp[k] + memory[k].output_size_in_bytes
      if not _memory_for(needed, wait_s):  # others share the machine: try again next round
        not_run[k] = f"needs {needed / 2**30:.2f} GiB + 1 GiB, not available for {wait_s} s"
        print(f"{k} call {i}: not run, {not_run[k]}", file=sys.stderr, flush=True)
        continue
      seconds, peak = _call(compiled[k], args[k])
      rss[k] = rss[k] or peak
      print(f"{k} call {i}: {seconds:.2f} s, peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr,
            flush=True)
      if i >= warmup:
        times[k].append(seconds)
  ms = {k: 1e3 * statistics.median(t) for k, t in times.items() if t}
  not_run = {k: why for k, why in not_run.items() if not times[k]}
  ratios = {}
  for name, (a, b) in RATIOS.items():
    values = temp if name.endswith("_temp") else ms
    if a in values and b in values and values[b]:
      ratios[name] = round(values[a] / values[b], 4)
  return {"V": v, "D": d, "tokens": n, "dtype": dtype, "chunk_size": chunk_size,
          "timed_calls": {k: len(t) for k, t in times.items()},
          "median_ms": {k: round(t, 1) for k, t in ms.items()},
          "xla_temp_bytes": temp,
          "peak_rss_gib": {k: round(r / 2**30, 2) for k, r in rss.items() if r},
          "ratios": ratios, "not_run": not_run, "unavailable": unavailable}


def compile_case(v, d, n, dtype, names, chunk_size, slice_name) -> dict:
  """XLA's verdict on one chip of `slice_name` (`aot`: no device needed): per variant, the
  compiled row (temporaries, FLOPs counted per loop trip, bytes accessed) and `roofline_mfu`,
  the fraction of the 6·N·D·V matmul limit at peak that the roofline allows."""
  from lmhead_jax.tools import aot, chips
  _, chip, _ = chips.parse_slice(slice_name)
  one = jax.sharding.SingleDeviceSharding(aot.topology_devices(slice_name)[0])
  fns = variants(np.random.default_rng(0).integers(0, v, n).astype(np.int32), chunk_size)
  rows = {}
  for k in [k for k in names or VARIANTS if k in fns]:
    w = (d, v) if k in TRANSPOSED else (v, d)
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=one) for s in ((n, d), w)]
    if k in REFINED:
      args.append(jax.ShapeDtypeStruct((d, min(v, d)), jnp.float32, sharding=one))
    limit = None if k == "range_map" else 6.0 * n * d * v  # the CE's matmul FLOPs
    program = aot.Program(jax.jit(fns[k]).lower(*args), limit)
    with aot.progress(f"compiling {k} for {slice_name}"):
      rows[k] = aot.compiled_row(k, program, chip, 1)
  return {"V": v, "D": d, "tokens": n, "dtype": dtype, "chunk_size": chunk_size,
          "slice": slice_name, "compiled": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="small,large", help=f"comma-separated: {', '.join(CASES)}")
  parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
  parser.add_argument("--variants", default="all", help=f"all, or comma-separated: "
                      f"{', '.join(VARIANTS)}")
  parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
  parser.add_argument("--chunk_size", type=int, default=1024, help="tokens per chunk")
  parser.add_argument("--wait_s", type=int, default=600,
                      help="how long a call waits for memory before it is skipped")
  parser.add_argument("--compile", metavar="SLICE", default=None,
                      help="compile for one chip of this slice (e.g. v5p-8; libtpu) and report "
                      "XLA's counts and the roofline instead of running")
  args = parser.parse_args()
  names = None if args.variants == "all" else args.variants.split(",")
  for flag, given, known in (("variants", names or (), VARIANTS),
                             ("cases", args.cases.split(","), CASES)):
    if unknown := [k for k in given if k not in known]:
      parser.error(f"--{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
  for name in args.cases.split(","):
    for dtype in args.dtypes.split(","):
      if args.compile:
        result = compile_case(**CASES[name], dtype=dtype, names=names,
                              chunk_size=args.chunk_size, slice_name=args.compile)
      else:
        result = run_case(**CASES[name], dtype=dtype, names=names, repeats=args.repeats,
                          warmup=args.warmup, chunk_size=args.chunk_size, wait_s=args.wait_s)
      device = f"one chip of {args.compile}" if args.compile else jax.devices()[0].device_kind
      print(json.dumps({"case": name, "device": device, **result}), flush=True)


if __name__ == "__main__":
  main()
