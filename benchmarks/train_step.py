"""Train-step throughput, MFU, memory and compile time; --compare times variants side by side.

  python -m benchmarks.train_step --config=benchmarks/configs.py:bottleneck_cpu [--config.x=y]
      [--compare] [--steps=20] [--warmup=3]

Prints one JSON line per variant. `mfu` is model FLOPs (lmhead_jax.tools.costs) per second over the
peak of a large matmul of the model's compute dtype, measured in the same process. --compare
alternates the variants step by step in one process (the machines are shared and noisy) and adds
a line of ratios against a plain-JAX step of the same model (`jax.value_and_grad` of the mean CE,
the same optax update, no metrics): the library's step with the bottleneck metrics on every step
and realized_cosine every `train.realized_cosine_every` steps (the runner's default cadence),
with the metrics off, and chunked against dense head when `head.chunk_size` is set. Metric steps
refine the previous step's range map of W, as the runner's do after a run's first two.
"""

import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.core.loss import cross_entropy
from lmhead_jax.runs import experiment
from lmhead_jax.tools import costs
from lmhead_jax.training import sharding, train


def matmul_peak_flops(dtype, n: int = 4096, reps: int = 5) -> float:
  """FLOP/s of an n×n matmul in `dtype` on the default device (best of `reps`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def available_memory_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"


class Variant:
  """One compiled train step with its own state and a fixed random batch."""

  def __init__(self, name, cfg, mesh, with_bottleneck=True, with_realized=None, plain=False):
    self.name, self.cfg = name, cfg
    setup = experiment.resolve(cfg, mesh)
    self.state, _ = train.init_state(jax.random.key(cfg.seed), setup)
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    self.batch = jax.device_put(
        {"inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
         "targets": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
         "mask": np.ones(shape, np.float32)}, sharding.batch_sharding(mesh))
    self.carry = with_bottleneck and not plain and train.carries_range_map(setup)
    step = (plain_step(setup) if plain else
            train.make_train_step(setup, with_bottleneck=with_bottleneck,
                                  with_realized=with_realized, carry_range_map=self.carry))
    self.args = (self.batch,)
    if self.carry:  # the runner's metric steps refine the last one's range map
      w_VxD = heads.matrix(heads.params_of(self.state.params, setup.head))
      self.args += (jax.device_put(bottleneck.range_map(w_VxD), sharding.replicated(mesh)),)
    t = time.perf_counter()
    self.compiled = step.lower(self.state, *self.args).compile()
    self.compile_time_s = time.perf_counter() - t
    mem = self.compiled.memory_analysis()
    self.temp_bytes = int(mem.temp_size_in_bytes) if mem is not None else None
    # A program that would not fit is compiled (for its byte count) but never run.
    self.fits = self.temp_bytes is None or self.temp_bytes < 0.8 * available_memory_bytes()
    self.times = []

  def step(self, timed: bool):
    t = time.perf_counter()
    self.state, metrics, *range_map = self.compiled(self.state, *self.args)
    jax.block_until_ready(metrics)
    self.args = (self.batch, *range_map)
    if timed:
      self.times.append(time.perf_counter() - t)

  def report(self, peak: float) -> dict:
    tokens = self.cfg.train.batch_size * self.cfg.data.seq_len
    if not self.times:
      return {"variant": self.name, "tokens_per_step": tokens, "fits": False,
              "compile_time_s": self.compile_time_s, "xla_temp_bytes": self.temp_bytes}
    step_s = statistics.median(self.times)
    flops = costs.model_flops_per_token(*experiment.configs(self.cfg), self.cfg.data.seq_len)
    return {"variant": self.name, "tokens_per_step": tokens, "step_time_ms": 1e3 * step_s,
            "tokens_per_sec": tokens / step_s, "model_flops_per_token": flops,
            "mfu": flops * tokens / step_s / (peak * jax.device_count()),
            "matmul_peak_flops_per_device": peak, "compile_time_s": self.compile_time_s,
            "xla_temp_bytes": self.temp_bytes, "timed_steps": len(self.times)}


def plain_step(setup):
  """A plain-JAX train step of the same model: the mean CE's value and gradient, the Setup's
  optax update, the same shardings; no metrics, no clipping."""
  def loss(params, batch):
    h = model.hidden(params, batch["inputs"], setup.model)
    z = heads.logits(heads.params_of(params, setup.head), h, setup.head)
    return cross_entropy(z, batch["targets"], batch["mask"])

  def step(state, batch):
    value, grads = jax.value_and_grad(loss)(state.params, batch)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, opt_state=opt_state,
                          params=optax.apply_updates(state.params, updates))
    return state, {"loss": value}

  return jax.jit(sharding.traced_on(setup.mesh, step),
                 in_shardings=(setup.state_shardings, setup.batch_shardings),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=0)


def variants(cfg, mesh, compare: bool) -> list[Variant]:
  out = [Variant("bottleneck_every_step", cfg, mesh)]
  if compare:
    out.append(Variant("bottleneck_no_realized", cfg, mesh, with_realized=False))
    out.append(Variant("bottleneck_off", cfg, mesh, with_bottleneck=False))
    out.append(Variant("plain_jax", cfg, mesh, plain=True))
    if cfg.head.chunk_size:
      dense = cfg.copy_and_resolve_references()
      dense.head.chunk_size = None
      out.append(Variant("dense_head", dense, mesh))
  return out


def run(cfg, compare: bool, steps: int, warmup: int, matmul_n: int = 4096) -> list[dict]:
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  vs = variants(cfg, mesh, compare)
  for i in range(warmup + steps):
    for v in vs:  # alternate, so drifts in machine load hit every variant alike
      if v.fits:
        v.step(timed=i >= warmup)
  peak = matmul_peak_flops(jnp.dtype(cfg.model.dtype), matmul_n)
  rows = [v.report(peak) for v in vs]
  mem, source = peak_memory_bytes()
  for r in rows:
    r.update(peak_memory_bytes=mem, peak_memory_source=source)
  if compare:
    by = {r["variant"]: r for r in rows}
    time_of = lambda name: by[name]["step_time_ms"]
    k = max(int(cfg.train.realized_cosine_every), 1)
    cadence_ms = (time_of("bottleneck_every_step") + (k - 1) * time_of("bottleneck_no_realized")) / k
    ratios = {"variant": "ratios",
              "bottleneck_vs_off_throughput": by["bottleneck_every_step"]["tokens_per_sec"] /
              by["bottleneck_off"]["tokens_per_sec"],
              "vs_plain_jax_throughput": {
                  "metrics_every_step_realized_every_step": time_of("plain_jax") /
                  time_of("bottleneck_every_step"),
                  f"metrics_every_step_realized_every_{k}": time_of("plain_jax") / cadence_ms,
                  "metrics_off": time_of("plain_jax") / time_of("bottleneck_off")}}
    if "dense_head" in by:
      if "tokens_per_sec" in by["dense_head"]:
        ratios["chunked_vs_dense_throughput"] = (by["bottleneck_every_step"]["tokens_per_sec"] /
                                                 by["dense_head"]["tokens_per_sec"])
      ratios["chunked_vs_dense_xla_temp_bytes"] = (by["bottleneck_every_step"]["xla_temp_bytes"] /
                                                   by["dense_head"]["xla_temp_bytes"])
    rows.append(ratios)
  return rows


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  for row in run(f.config, f.compare, f.steps, f.warmup):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "A config file[:preset].")
  flags.DEFINE_bool("compare", False, "Time variants side by side and print ratios.")
  flags.DEFINE_integer("steps", 20, "Timed steps per variant (median reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps per variant first.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
