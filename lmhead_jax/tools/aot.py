"""Ahead-of-time compilation for a TPU slice or GPUs with no device present: XLA's own verdict.

`topology_devices` asks libtpu for a slice's devices (`jax.experimental.topologies`, as MaxText's
train_compile.py does), multi-host slices included; `gpu_devices` does the same for H100/H200
GPUs with the CUDA plugin's XLA:GPU. Programs (`train_programs` of a Setup on such a mesh,
`measure_programs`, `gram_programs`) are lowered with sharded ShapeDtypeStructs and compiled for
that topology.
Per chip, `compiled_row` reports XLA's bytes (needed = arguments + outputs − aliased +
temporaries), FLOPs and bytes accessed (`cost_analysis`; none from XLA:GPU), the bytes its
collectives send (`collectives`) and a three-way roofline (`roofline`): compute, HBM and
collectives at the chip's rates (`chips`), their max (perfect overlap) and sum (none), with the
MFU each implies. XLA:TPU's cost_analysis counts a while loop's body once (one layer, one
micro-batch, one token chunk): the compute term takes the largest of its FLOPs, the HLO's
matmul FLOPs counted per loop trip (`matmuls`) and the model's (`costs`, with remat's
recompute); the HBM term stays a lower bound.
"""

import contextlib
import functools
import importlib.util
import itertools
import math
import os
import pathlib
import re
import sys
import threading
import time
import types
import typing

import jax
import jax.numpy as jnp

from lmhead_jax.analysis import gram, measure
from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.tools import collectives, costs, matmuls
from lmhead_jax.tools.chips import GPUS_PER_HOST, parse_slice
from lmhead_jax.training import sharding, train
from lmhead_jax.training.setup import Setup


class DoesNotFit(Exception):
  """A compiled program needs more bytes per chip than the chip's HBM."""


def topology_shape(kind: str, chips: int) -> tuple[int, ...]:
  """Chip grid of a slice: 3-D for v4/v5p (4 → 2x2x1, 8 → 2x2x2, 32 → 2x4x4), else 2-D
  (8 → 2x4)."""
  if chips & (chips - 1):
    raise ValueError(f"{kind} slice of {chips} chips: only powers of two are supported")
  dims = [2, 2, 1] if kind in ("v4", "v5p") else [1, 1]
  if math.prod(dims) > chips:
    raise ValueError(f"{kind} slices start at {math.prod(dims)} chips, got {chips}")
  while math.prod(dims) < chips:  # double the last of the smallest axes, as Cloud TPU's shapes
    i = max(i for i, n in enumerate(dims) if n == min(dims))
    dims[i] *= 2
  return tuple(dims)


def topology_devices(slice_name: str) -> list:
  """The compile-only devices of a TPU slice or of GPUs (`chips.parse_slice`); no device needed."""
  kind, chip, n = parse_slice(slice_name)
  return gpu_devices(chip, n) if chip.gpu else tpu_devices(kind, chip, n)


def tpu_devices(kind: str, chip, chips: int) -> list:
  """The devices of a TPU slice, from libtpu's topology (no TPU needed).

  Compiling needs no TPU, so libtpu's one-process lockfile is waived (ALLOW_MULTIPLE_LIBTPU_LOAD):
  several compiles, or one beside a job that holds a TPU, may run at once. libtpu's start-up
  asks the TPU VM's metadata for this host's slice; told that it is one host of `kind` (unless
  the environment says otherwise), it prints none of its warnings.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", f"{kind}-{chips * chip.tensorcores}")):
    os.environ.setdefault(key, value)
  try:
    from jax.experimental import topologies
    import libtpu  # noqa: F401
  except ImportError as e:
    raise ImportError("--compile=tpu needs libtpu: pip install 'lmhead-jax[tpu-compile]'") from e
  dims = topology_shape(kind, chips)
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{kind}:{'x'.join(map(str, dims))}",
      chip_config_name="megacore" if chip.tensorcores > 1 else "default",
      chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=1)
  return list(topo.devices)


_TARGET_CONFIG = b"proto-message: stream_executor.GpuTargetConfigProto"


def cuda_plugin():
  """The installed CUDA plugin's module spec (jax_plugins.xla_cuda13 or 12), or None."""
  if importlib.util.find_spec("jax_plugins") is None:
    return None
  return next(filter(None, map(importlib.util.find_spec, (
      "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"))), None)


@functools.cache
def gpu_target_config(device_name: str) -> str:
  """XLA:GPU's target config (GpuTargetConfigProto text) for a GPU named `device_name`.

  XLA ships one per supported GPU (xla/backends/gpu/target_config/*.txtpb), embedded in the CUDA
  plugin's library; it is read from there, so it always matches the installed compiler.
  """
  spec = cuda_plugin()
  if spec is None:
    raise ImportError("--compile=gpu needs the CUDA plugin (no GPU or CUDA libraries needed): "
                      "pip install 'lmhead-jax[gpu-compile]'")
  data = (pathlib.Path(spec.origin).parent / "xla_cuda_plugin.so").read_bytes()
  found = {}
  for at in re.finditer(re.escape(_TARGET_CONFIG), data):
    text = data[data.rfind(b"# Copyright", 0, at.start()):data.index(b"\0", at.start())].decode()
    if name := re.search(r'device_description_str: "([^"]+)"', text):
      found[name[1]] = text
  if device_name not in found:
    raise ValueError(f"XLA:GPU in {spec.origin} has no target config for {device_name!r}; it "
                     f"has {sorted(found)}")
  return found[device_name]


def gpu_devices(chip, gpus: int) -> list:
  """`gpus` compile-only GPUs of `chip`'s kind, 8 per host, from XLA:GPU's target config.

  The CUDA plugin registers without a GPU only when CUDA is not among jax's platforms
  (JAX_PLATFORMS=cpu; `plan --compile=gpu` sets it).
  """
  from jax.experimental import topologies
  per_host = min(gpus, GPUS_PER_HOST)
  if gpus % per_host:
    raise ValueError(f"{gpus} GPUs: more than one host needs a multiple of {GPUS_PER_HOST}")
  try:
    topo = topologies.get_topology_desc(
        platform="cuda", topology_name="", target_config=gpu_target_config(chip.gpu),
        topology=f"1x{gpus // per_host}x{per_host}")
  except NotImplementedError as e:
    raise RuntimeError("the CUDA plugin is installed but not registered: without a GPU it "
                       "registers only when jax runs on CPU (JAX_PLATFORMS=cpu)") from e
  return list(topo.devices)


def maps_onto_slice(slice_name: str, sizes) -> bool:
  """Whether `jax.make_mesh` can lay mesh axes of `sizes` onto a TPU slice's torus: each axis a
  product of its own physical axes (v5p-64, 2x4x4: (4, 4, 2) can, (2, 8, 2) cannot). GPUs: any."""
  kind, chip, n = parse_slice(slice_name)
  if chip.gpu:
    return True

  def assign(sizes, dims):
    if not sizes:
      return True
    for k in range(1, len(dims) + 1):
      for used in itertools.combinations(range(len(dims)), k):
        if math.prod(dims[i] for i in used) == sizes[0] and assign(
            sizes[1:], [d for i, d in enumerate(dims) if i not in used]):
          return True
    return False

  return assign([x for x in sizes if x > 1], [d for d in topology_shape(kind, n) if d > 1])


def slice_mesh(slice_name: str, data: int, fsdp: int, tensor: int):
  """A (data, fsdp, tensor) mesh over the compile-only devices of `slice_name`."""
  return sharding.make_mesh(data, fsdp, tensor, devices=topology_devices(slice_name))


class Program(typing.NamedTuple):
  lowered: typing.Any
  model_flops: float | None  # per step, all chips: the MFU's numerator (None: not a model pass)
  flops: float | None = None  # the FLOPs the chips must run, when more (remat's recompute)


def _batch(mesh, batch_size: int, seq_len: int) -> dict:
  b = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                           sharding=sharding.batch_sharding(mesh))
  return {"inputs": b, "targets": b,
          "mask": jax.ShapeDtypeStruct(b.shape, jnp.float32, sharding=b.sharding)}


def _abstract_params(c: ModelConfig, hc: HeadConfig, mesh, dtype=None):
  shapes = costs.param_shapes(c, hc)
  if dtype is not None:
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
  return sharding.abstract_like(
      shapes, sharding.param_shardings(shapes, model.param_axes(c, hc), mesh))


def forward_flops(c: ModelConfig, hc: HeadConfig, tokens: int, seq_len: int) -> float:
  """Forward model FLOPs: a third of the training FLOPs of `costs` (2·N·P + attention)."""
  return costs.model_flops_per_token(c, hc, seq_len) / 3 * tokens


def train_programs(s: Setup, only: tuple[str, ...] | None = None) -> dict[str, Program]:
  """The train step with every metric, with the bottleneck stats but not realized_cosine (a
  metric step off `train.realized_cosine_every`'s multiples), these two refining the last
  metric step's range map (the runner's metric steps after the first two, for heads that
  `train.carries_range_map`), without metrics, and the eval step (or those in `only`), lowered
  for a Setup placed on a mesh."""
  state, batch = s.abstract_state(), _batch(s.mesh, s.batch_size, s.seq_len)
  d = s.head.d_model
  range_map = jax.ShapeDtypeStruct((d, min(s.head.live_vocab, d)), jnp.float32,
                                   sharding=sharding.replicated(s.mesh))
  tokens = s.batch_size * s.seq_len
  flops = costs.model_flops_per_token(s.model, s.head, s.seq_len) * tokens
  run = flops + costs.recompute_flops_per_token(s.model, s.head, s.seq_len) * tokens
  lower = {
      "train_step": lambda: Program(train.make_train_step(s).lower(state, batch), flops, run),
      "train_step_bottleneck": lambda: Program(
          train.make_train_step(s, with_realized=False).lower(state, batch), flops, run),
      "train_step_refined": lambda: Program(train.make_train_step(
          s, with_realized=False, carry_range_map=True).lower(state, batch, range_map), flops,
          run),
      "train_step_refined_realized": lambda: Program(train.make_train_step(
          s, carry_range_map=True).lower(state, batch, range_map), flops, run),
      "train_step_no_metrics": lambda: Program(
          train.make_train_step(s, with_bottleneck=False).lower(state, batch), flops, run),
      "eval_step": lambda: Program(train.make_eval_step(s).lower(state.params, batch),
                                   forward_flops(s.model, s.head, tokens, s.seq_len)),
  }
  if not train.carries_range_map(s):
    del lower["train_step_refined"], lower["train_step_refined_realized"]
  return {k: make() for k, make in lower.items() if only is None or k in only}


class Measured(typing.NamedTuple):
  name: str
  model: ModelConfig
  head: HeadConfig
  dtype: typing.Any  # of the parameters; None: float32


def measure_programs(models: list[Measured], mesh, batch_size: int, seq_len: int,
                     chunk_len: int) -> dict[str, Program]:
  """The range map of W (`bottleneck.range_map`; no model FLOPs) and the measuring step (trunk
  and head forward), per model."""
  out = {}
  batch = _batch(mesh, batch_size, seq_len)
  rep = sharding.replicated(mesh)
  for name, c, hc, dtype in models:
    params = _abstract_params(c, hc, mesh, dtype)
    range_map = jax.jit(lambda hp: bottleneck.range_map(heads.matrix(hp)), out_shardings=rep)
    m = jax.ShapeDtypeStruct((c.d_model, c.d_model), jnp.float32, sharding=rep)
    step = measure.make_step(types.SimpleNamespace(model_cfg=c, head_cfg=hc), mesh, chunk_len)
    out[f"{name}/range_map"] = Program(range_map.lower(heads.params_of(params, hc)), None)
    out[f"{name}/measure_step"] = Program(step.lower(params, m, batch),
                                          forward_flops(c, hc, batch_size * seq_len, seq_len))
  return out


def gram_programs(models: list[Measured], mesh, batch_size: int, seq_len: int,
                  gram_dtype: str) -> dict[str, Program]:
  """The Gram path's accumulation step (`gram.gram_update`: a batch's G gathered, C += GᵀG on
  each device's rows of C in gram_dtype), per model; no model FLOPs."""
  out = {}
  y = _batch(mesh, batch_size, seq_len)
  for name, c, _, dtype in models:
    dtype = dtype or jnp.float32
    h = jax.ShapeDtypeStruct((batch_size, seq_len, c.d_model), dtype,
                             sharding=sharding.batch_sharding(mesh, 3))
    w = jax.ShapeDtypeStruct((c.vocab_size, c.d_model), dtype, sharding=sharding.replicated(mesh))
    with jax.enable_x64(gram_dtype == "float64"):
      acc = jax.ShapeDtypeStruct((gram.gram_size(c.vocab_size, mesh.devices.size),) * 2,
                                 jnp.dtype(gram_dtype), sharding=gram.gram_sharding(mesh))
      lowered = gram.gram_update(mesh, c.vocab_size).lower(acc, h, w, y["targets"], y["mask"])
    out[f"{name}/gram_update"] = Program(lowered, None)
  return out


def roofline(flops: float, hbm_bytes: float, link_bytes: float, model_flops: float,
             chip, devices: int) -> dict:
  """Per-chip time bounds of one step: compute, HBM and collectives; their max (perfect
  overlap) and sum (none), and the MFU that each implies (model FLOPs per chip / peak / time)."""
  terms = {"compute": flops / chip.peak_bf16_flops, "hbm": hbm_bytes / chip.hbm_bytes_per_s,
           "collectives": link_bytes / chip.link_bytes_per_s(devices)}
  overlap, serial = max(terms.values()), sum(terms.values())
  mfu = lambda t: model_flops / chip.peak_bf16_flops / t if model_flops and t else None
  return {"compute_ms": 1e3 * terms["compute"], "hbm_ms": 1e3 * terms["hbm"],
          "coll_ms": 1e3 * terms["collectives"], "roofline_ms": 1e3 * overlap,
          "serial_ms": 1e3 * serial, "bound": max(terms, key=terms.get),
          "roofline_mfu": mfu(overlap), "serial_mfu": mfu(serial)}


def compiled_row(name: str, program: Program, chip, devices: int) -> dict:
  """Per-chip memory, cost, collectives and roofline of one compiled program.

  XLA:TPU refuses to compile a program whose temporaries exceed HBM; the row then carries its
  message (with the bytes it needed and had) and fits=False.
  """
  try:
    compiled = program.lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"program": name, "fits": False, "xla_error": str(e).splitlines()[0]}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()  # None from XLA:GPU without a GPU
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  xla_flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  text = compiled.as_text()
  sent, matmul_flops = collectives.per_device(text), matmuls.flops(text)
  needed = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
  per_chip = program.model_flops / devices if program.model_flops else 0.0
  run = (program.flops or program.model_flops or 0.0) / devices
  flops = max(xla_flops, matmul_flops, run)  # each a lower bound (module docstring)
  return {
      "program": name, "argument_gb": mem.argument_size_in_bytes / 1e9,
      "output_gb": mem.output_size_in_bytes / 1e9, "alias_gb": mem.alias_size_in_bytes / 1e9,
      "temp_gb": mem.temp_size_in_bytes / 1e9, "needed_gb": needed / 1e9,
      "hbm_gb": chip.hbm_bytes / 1e9, "fits": needed <= chip.hbm_bytes,
      "model_tflops": per_chip / 1e12 if program.model_flops else None,
      "xla_tflops": xla_flops / 1e12 if cost else None, "matmul_tflops": matmul_flops / 1e12,
      "xla_gb_accessed": accessed / 1e9 if cost else None,
      "coll_gb": sum(sent.values()) / 1e9, **{f"{k}_gb": v / 1e9 for k, v in sent.items()},
      **roofline(flops, accessed, sum(sent.values()), per_chip, chip, devices),
  }


def compile_rows(programs: dict[str, Program], slice_name: str,
                 only: tuple[str, ...] | None = None) -> list[dict]:
  """One row per program (or those in `only`), compiled by XLA:TPU or XLA:GPU for
  `slice_name`."""
  _, chip, devices = parse_slice(slice_name)
  rows = []
  for name, program in programs.items():
    if only is None or name in only:
      with progress(f"compiling {name} for {slice_name}"):
        rows.append(compiled_row(name, program, chip, devices))
  return rows


@contextlib.contextmanager
def progress(what: str, every_s: float = 30.0):
  """Prints `what`, then the elapsed time every `every_s` seconds until done, on stderr."""
  t0, done = time.perf_counter(), threading.Event()
  say = lambda tail: print(f"{what}: {tail}", file=sys.stderr, flush=True)

  def beat():
    while not done.wait(every_s):
      say(f"{time.perf_counter() - t0:.0f} s so far")

  say("started")
  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()
    say(f"done in {time.perf_counter() - t0:.0f} s")


def check_fits(rows: list[dict], slice_name: str) -> None:
  """Raises DoesNotFit naming every program over HBM, its bytes and what to change."""
  over = [r for r in rows if "fits" in r and not r["fits"]]
  if over:
    lines = [f"{r.get('run', '')} {r['program']}: ".lstrip() + (
        r["xla_error"] if "xla_error" in r else
        f"needs {r['needed_gb']:.2f} GB per chip (arguments {r['argument_gb']:.2f}, temporaries "
        f"{r['temp_gb']:.2f}, outputs {r['output_gb']:.2f}), {slice_name} has "
        f"{r['hbm_gb']:.2f} GB") for r in over]
    raise DoesNotFit(
        f"does not fit on {slice_name}:\n  " + "\n  ".join(lines) + "\nchange: shard more "
        "(--config.mesh.fsdp=-1, a larger slice), recompute activations (model.remat=True), "
        "a smaller micro-batch (train.batch_size, train.grad_accum; measure.batch_size), or a "
        "chunked head (head.chunk_size; measure.chunk_len)")
