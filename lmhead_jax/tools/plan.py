"""Paper-scale plans checked offline: parameters, FLOPs, per-device memory and step time on a slice.

  python -m lmhead_jax.plan --config=experiments/rank_sweep.py:paper --slice=v5p-64 [--mfu=0.4]
      [--tokens=11e9] [--compile=tpu|gpu|cpu] [--tune [--runs=rank=4096]]

Memory from `jax.eval_shape` of the real init and optimizer over each leaf's sharding, an
activation estimate (`activation_bytes`), collectives by `costs`. --compile=tpu|gpu compiles
every program for the slice with no device (`aot`) and exits non-zero with "does not fit" when
one needs more than the chip's HBM; --compile=cpu compiles the train step for the current
devices. --tune ranks meshes × train.grad_accum × model.remat by predicted step time (`tune`)
and, with --compile, compiles the best ones. Only the command line (`main` and the functions
after it) reads the experiment config; the rest takes a Setup. A refusal (a bad slice, --mfu,
--tokens, or a config that a run or the compile would refuse) is one line and exit 2.
"""

import dataclasses
import itertools
import math
import pathlib
import types

import jax
import numpy as np

from lmhead_jax.analysis import gram
from lmhead_jax.core import attention
from lmhead_jax.core.config import default_head
from lmhead_jax.data import hf
from lmhead_jax.runs import cli, experiment, grid
from lmhead_jax.runs.corpus import split_list
from lmhead_jax.tools import aot, costs
from lmhead_jax.tools.chips import CHIPS, parse_slice
from lmhead_jax.training import setup, sharding, train
from lmhead_jax.training.setup import Setup


def _sharded_bytes(shapes, axes, mesh_shape: dict) -> float:
  fake_mesh = types.SimpleNamespace(shape=mesh_shape)
  total = 0.0
  leaves = zip(jax.tree.leaves(shapes),
               jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))
  for s, a in leaves:
    spec = sharding.spec_for(s.shape, a, fake_mesh)
    split = math.prod(mesh_shape[ax] for ax in spec if ax is not None)
    total += math.prod(s.shape) * s.dtype.itemsize / split
  return total


def activation_bytes(s: Setup, tokens_per_device: int, platform: str) -> float:
  """Estimated live activations per device for one micro-batch on `platform`.

  Without remat, each layer keeps ≈ 4D + 2(H+K)·hd + 3F values per token in the compute dtype
  (norm inputs, q/k/v/o, MLP gate/up/activation) and, when attention runs as XLA's
  (`core.attention.resolve`), H·S scores per token in float32, their softmax in float32 and
  again in the compute dtype (XLA:TPU: 165 GB of temporaries for the rank sweep's 16 sequences
  of 2048 per chip); with remat a layer keeps only its input (D), one layer all of it. The head
  adds 3 float32 V-vectors per token (logits, softmax, G), or per chunk token.
  """
  c, hc = s.model, s.head
  act = np.dtype(c.compute_dtype).itemsize
  scores = (c.n_heads * s.seq_len * (8 + act)
            if attention.resolve(c.attention, platform, c.compute_dtype) == "xla" else 0)
  per_layer = (4 * c.d_model + 2 * (c.n_heads + c.kv_heads) * c.hd + 3 * c.ff) * act + scores
  layers = c.n_layers * c.d_model * act + per_layer if c.remat else c.n_layers * per_layer
  head_tokens = min(hc.chunk_size, tokens_per_device) if hc.chunk_size else tokens_per_device
  return tokens_per_device * layers + 3 * 4 * c.vocab_size * head_tokens


def check_assumptions(mfu: float, tokens: float | None) -> None:
  """--mfu in (0, 1]; --tokens, when given, > 0 (NaN refused)."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]")
  if tokens is not None and not 0 < tokens < math.inf:
    raise ValueError(f"--tokens={tokens} must be a positive number")


def memory(s: Setup, mesh_shape: dict, platform: str, shapes=None) -> dict:
  """Per-device GB of parameters, gradients, optimizer state and activations on a mesh."""
  shapes = jax.eval_shape(s.new_state, jax.random.key(0)) if shapes is None else shapes
  like_params = lambda x: jax.tree.structure(x) == jax.tree.structure(shapes.params)
  moments = jax.tree.leaves(shapes.opt_state, is_leaf=like_params)
  n_moments = sum(map(like_params, moments))  # AdamW: mu and nu; SGD: the momentum trace
  params_b = _sharded_bytes(shapes.params, s.axes, mesh_shape)
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  tokens = s.batch_size // s.grad_accum * s.seq_len // dp
  out = {"params_gb": params_b / 1e9, "grads_gb": params_b / 1e9,
         "opt_state_gb": n_moments * params_b / 1e9,
         "activations_gb": activation_bytes(s, tokens, platform) / 1e9}
  return out | {"total_gb": sum(out.values())}


def plan(s: Setup, slice_name: str, mesh_shape: dict, mfu: float = 0.4,
         tokens: float | None = None) -> dict:
  """One row of the plan table for Setup `s` on `slice_name` with `mesh_shape`."""
  check_assumptions(mfu, tokens)
  _, chip, devices = parse_slice(slice_name)
  setup.check_batch_split(s.batch_size, s.grad_accum, mesh_shape["data"] * mesh_shape["fsdp"])
  flops = costs.model_flops_per_token(s.model, s.head, s.seq_len)
  step_tokens = s.batch_size * s.seq_len
  total_tokens = float(tokens if tokens is not None else s.steps * step_tokens)
  sent = costs.collective_bytes(s.model, s.head, mesh_shape, s.batch_size, s.grad_accum,
                                s.seq_len)
  row = {
      "slice": slice_name, "devices": devices,
      "mesh": "x".join(f"{k}={v}" for k, v in mesh_shape.items()),
      "params": costs.param_counts(s.model, s.head)["total"], "flops_per_token": flops,
      **memory(s, mesh_shape, chip.platform), "hbm_gb": chip.hbm_bytes / 1e9,
      "est_coll_gb": sum(sent.values()) / 1e9,
      "step_s": flops * step_tokens / (devices * chip.peak_bf16_flops * mfu), "mfu": mfu,
      "tokens": total_tokens,
      "chip_hours": total_tokens * flops / (chip.peak_bf16_flops * mfu) / 3600,
  }
  return row | {"fits": row["total_gb"] < row["hbm_gb"]}


def compiled_memory(s: Setup) -> dict:
  """Per-device bytes and FLOPs that XLA reports for the train step of a Setup placed on the
  current devices."""
  b = jax.ShapeDtypeStruct((s.batch_size, s.seq_len), "int32",
                           sharding=s.batch_shardings["inputs"])
  batch = {"inputs": b, "targets": b, "mask": jax.ShapeDtypeStruct(b.shape, "float32",
                                                                 sharding=b.sharding)}
  compiled = train.make_train_step(s).lower(s.abstract_state(), batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"argument_gb": mem.argument_size_in_bytes / 1e9,
          "temp_gb": mem.temp_size_in_bytes / 1e9, "output_gb": mem.output_size_in_bytes / 1e9,
          "xla_flops": float(cost.get("flops", 0.0))}


def candidates(s: Setup, devices: int, remats=(False, True)):
  """(mesh shape, grad_accum, remat) of every layout of `s` on `devices`: data × fsdp × tensor
  = devices, each micro-batch split evenly over data × fsdp, each of `remats`."""
  divisors = [k for k in range(1, devices + 1) if devices % k == 0]
  for data, tensor in itertools.product(divisors, divisors):
    if devices % (data * tensor):
      continue
    mesh_shape = {"data": data, "fsdp": devices // (data * tensor), "tensor": tensor}
    for accum in range(1, s.batch_size + 1):
      if s.batch_size % accum == 0 and (s.batch_size // accum) % (devices // tensor) == 0:
        for remat in remats:
          yield mesh_shape, accum, remat


def variant(s: Setup, grad_accum: int, remat: bool) -> Setup:
  return dataclasses.replace(s, grad_accum=grad_accum,
                             model=dataclasses.replace(s.model, remat=remat))


def predict(s: Setup, chip, devices: int, mesh_shape: dict, shapes=None) -> dict:
  """The analytic three-way roofline of one train step (`aot.roofline`) and its memory.

  FLOPs: the model's and remat's recompute (`costs`); collectives: `costs.collective_bytes`;
  HBM traffic, a rough lower bound: per micro-batch the gathered weights read three times (four
  with remat) and the activations written and read once, per step the optimizer's reads and
  writes of parameters, gradients and moments (float32).
  """
  c, hc = s.model, s.head
  tokens = s.batch_size * s.seq_len
  model_flops = costs.model_flops_per_token(c, hc, s.seq_len) * tokens / devices
  flops = model_flops + costs.recompute_flops_per_token(c, hc, s.seq_len) * tokens / devices
  mem = memory(s, mesh_shape, chip.platform, shapes)
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  weights = (costs.param_counts(c, hc)["total"] * np.dtype(c.compute_dtype).itemsize
             / mesh_shape["tensor"])
  no_remat = dataclasses.replace(s, model=dataclasses.replace(c, remat=False))
  acts = activation_bytes(no_remat, s.batch_size // s.grad_accum * s.seq_len // dp,
                          chip.platform)
  hbm = (s.grad_accum * ((4 if c.remat else 3) * weights + 2 * acts)
         + 1e9 * (4 * mem["params_gb"] + 2 * mem["opt_state_gb"]))
  sent = costs.collective_bytes(c, hc, mesh_shape, s.batch_size, s.grad_accum, s.seq_len)
  return {"mesh": "x".join(f"{k}={v}" for k, v in mesh_shape.items()),
          "grad_accum": s.grad_accum, "remat": c.remat, "est_gb": mem["total_gb"],
          "est_fits": mem["total_gb"] < chip.hbm_bytes / 1e9,
          "est_coll_gb": sum(sent.values()) / 1e9,
          **{f"est_{k}": v for k, v in aot.roofline(flops, hbm, sum(sent.values()), model_flops,
                                                     chip, devices).items()}}


def tune(s: Setup, slice_name: str, remats=(False, True)) -> list[tuple[dict, dict, Setup]]:
  """(mesh shape, prediction, Setup) of every candidate layout that maps onto the slice, best
  first: those estimated to fit before the others, then by the no-overlap step time."""
  _, chip, devices = parse_slice(slice_name)
  shapes = jax.eval_shape(s.new_state, jax.random.key(0))
  out = []
  for mesh_shape, accum, remat in candidates(s, devices, remats):
    if not aot.maps_onto_slice(slice_name, mesh_shape.values()):
      continue
    v = variant(s, accum, remat)
    out.append((mesh_shape, predict(v, chip, devices, mesh_shape, shapes), v))
  return sorted(out, key=lambda m: (not m[1]["est_fits"], m[1]["est_serial_ms"],
                                    m[1]["est_roofline_ms"]))


COLUMNS = ("run", "params", "flops_per_token", "mesh", "params_gb", "opt_state_gb",
           "activations_gb", "total_gb", "hbm_gb", "fits", "est_coll_gb", "argument_gb", "temp_gb",
           "step_s", "tokens", "chip_hours")
AOT_COLUMNS = ("run", "program", "argument_gb", "temp_gb", "output_gb", "alias_gb", "needed_gb",
               "hbm_gb", "fits", "model_tflops", "xla_tflops", "matmul_tflops", "xla_gb_accessed",
               "coll_gb", "compute_ms", "hbm_ms", "coll_ms", "bound", "roofline_ms",
               "roofline_mfu", "serial_ms", "serial_mfu", "xla_error")
TUNE_COLUMNS = ("rank", "preset", "mesh", "grad_accum", "remat", "est_gb", "est_fits",
                "est_coll_gb", "est_compute_ms", "est_hbm_ms", "est_coll_ms", "est_roofline_ms",
                "est_serial_ms", "est_serial_mfu", "est_chip_hours", "program", "needed_gb",
                "fits", "coll_gb", "coll_ms", "roofline_ms", "serial_ms", "serial_mfu",
                "chip_hours", "xla_error")


def format_table(rows: list[dict], columns=COLUMNS) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
  cols = [c for c in columns if any(c in r for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


# The command line: the only code of the tools layer that reads the experiment config.


def run_configs(cfg, names: list[str] | None = None) -> dict:
  """{run name: config} of the runs of `cfg.sweep` (or its one run), or of those `names`."""
  named = {grid.run_name(o) or "run": grid.configure(cfg, o)
           for o in grid.expand(cfg.get("sweep") or ({},))}
  if unknown := set(names or ()) - set(named):
    raise ValueError(f"--runs: {sorted(unknown)} not in the sweep's runs {list(named)}")
  return {k: v for k, v in named.items() if names is None or k in names}


def mesh_of(cfg, devices: int) -> dict:
  dims = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
  return dict(zip(sharding.MESH_AXES, dims))


def checked_setup(cfg, mesh=None) -> Setup:
  """The run's Setup (on `mesh`), after the checks a run makes."""
  experiment.validate(cfg)
  return experiment.resolve(cfg, mesh)


def plan_sweep(cfg, slice_name: str, mfu: float = 0.4, tokens: float | None = None,
               compile_: str | None = None) -> list[dict]:
  """One row per run of `cfg.sweep` (or one for a single run), plus a total row."""
  check_assumptions(mfu, tokens)
  devices = parse_slice(slice_name)[2]
  rows = []
  for name, run_cfg in run_configs(cfg).items():
    s = checked_setup(run_cfg)
    row = {"run": name, **plan(s, slice_name, mesh_of(run_cfg, devices), mfu, tokens)}
    if compile_ == "cpu":
      m = run_cfg.mesh
      row.update(compiled_memory(s.on(sharding.make_mesh(m.data, m.fsdp, m.tensor))))
    rows.append(row)
  if len(rows) > 1:
    rows.append({"run": "total", "tokens": sum(r["tokens"] for r in rows),
                 "chip_hours": sum(r["chip_hours"] for r in rows)})
  return rows


def measured_models(cfg) -> list[aot.Measured]:
  """A measurement config's models: its HF `checkpoints` (read from their config.json alone,
  params in `dtype`) or else `model`/`head` (float32 params)."""
  out = []
  for path in map(pathlib.Path, split_list(cfg.get("checkpoints", ""))):
    c = hf.read_config(path, cfg.dtype)
    out.append(aot.Measured(path.name, c, default_head(c), c.compute_dtype))
  return out or [aot.Measured("model", *experiment.configs(cfg), None)]


def programs_of(cfg, mesh, only=None) -> dict[str, aot.Program]:
  """The programs to compile for a run's config on `mesh` (those named in `only`)."""
  if "measure" not in cfg:
    return aot.train_programs(checked_setup(cfg, mesh), only)
  seq_len = int(cfg.data.seq_len)
  models, batch_size = measured_models(cfg), int(cfg.measure.batch_size)
  programs = aot.measure_programs(models, mesh, batch_size, seq_len,
                                  int(cfg.measure.get("chunk_len") or seq_len))
  if "spectrum" in cfg:  # gradient_spectrum: the Gram path's step where it picks that path
    sp = cfg.spectrum  # (host_max_gib=0 means the measuring host's memory, not this one's)
    on_gram = [m for m in models if gram.choose_method(
        sp.method, m.model.vocab_size, sp.gram_dtype, sp.gram_max_gib, mesh.devices.size,
        sp.host_max_gib or math.inf) == "gram"]
    programs |= aot.gram_programs(on_gram, mesh, batch_size, seq_len, sp.gram_dtype)
  return {k: v for k, v in programs.items() if only is None or k in only}


def compile_sweep(cfg, slice_name: str, runs: list[str] | None = None,
                  programs: list[str] | None = None) -> list[dict]:
  """XLA:TPU's or XLA:GPU's rows (`aot.compile_rows`) for each run of `cfg.sweep` (or those
  named)."""
  devices = parse_slice(slice_name)[2]
  rows = []
  for name, run_cfg in run_configs(cfg, runs).items():
    mesh_shape = mesh_of(run_cfg, devices)
    if "measure" not in run_cfg:  # the same refusals as the plan without --compile
      plan(checked_setup(run_cfg), slice_name, mesh_shape)
    mesh = aot.slice_mesh(slice_name, *mesh_shape.values())
    rows += [{"run": name, **r}
             for r in aot.compile_rows(programs_of(run_cfg, mesh, programs), slice_name)]
  return rows


def tune_sweep(cfg, slice_name: str, runs: list[str] | None = None, show: int = 10,
               compile_best: int = 0, programs: list[str] | None = None,
               remat: bool = True) -> list[dict]:
  """The `show` best layouts of the one run (`--runs`) of `cfg` on `slice_name` (`remat`: also
  over model.remat, else the config's), the config's own marked `preset`; the first
  `compile_best` compiled (`programs`, default the plain step)."""
  if "measure" in cfg:
    raise ValueError("--tune lays out a training run; this is a measurement config")
  named = run_configs(cfg, runs)
  if len(named) != 1:
    raise ValueError(f"--tune needs one run; pass --runs=<one of {list(named)}>")
  (run_cfg,) = named.values()
  if show < 1:
    raise ValueError(f"--tune_show={show} must be >= 1")
  if compile_best < 0:
    raise ValueError(f"--tune_compile={compile_best} must be >= 0")
  s = checked_setup(run_cfg)
  _, chip, devices = parse_slice(slice_name)
  preset = (mesh_of(run_cfg, devices), s.grad_accum, s.model.remat)
  ranked = tune(s, slice_name, (False, True) if remat else (s.model.remat,))
  rows = []
  for i, (mesh_shape, row, v) in enumerate(ranked):
    mine = (mesh_shape, v.grad_accum, v.model.remat) == preset
    if i < show or mine:
      hours = lambda ms: v.steps * ms / 1e3 * devices / 3600
      rows.append({"rank": i + 1, "preset": "<-" if mine else "", **row,
                   "est_chip_hours": hours(row["est_serial_ms"])})
      if i < compile_best:
        on = v.on(aot.slice_mesh(slice_name, *mesh_shape.values()))
        for r in aot.compile_rows(aot.train_programs(on, programs or ("train_step_no_metrics",)),
                                  slice_name):
          rows.append({"rank": i + 1, **r, "chip_hours": hours(r.get("serial_ms", math.nan))})
  return rows


def main(argv):
  """The plan's command line; a refusal is one line and exit 2 (`cli.refuse`)."""
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    _main(f)
  except ValueError as e:
    cli.refuse(e, f.verbose, 2)


def _main(f):
  if f.compile in ("tpu", "gpu") and parse_slice(f.slice)[1].platform != f.compile:
    raise ValueError(f"--compile={f.compile} needs a {f.compile.upper()} slice "
                     f"({', '.join(k for k, c in CHIPS.items() if c.platform == f.compile)}), "
                     f"got --slice={f.slice}")
  if f.compile == "gpu":  # XLA:GPU compiles with no GPU present only when it is not a backend
    jax.config.update("jax_platforms", "cpu")
  if f.tune:
    compile_best = f.tune_compile if f.compile in ("tpu", "gpu") else 0
    rows = tune_sweep(f.config, f.slice, f.runs, f.tune_show, compile_best, f.programs,
                      f.tune_remat)
    print(format_table(rows, TUNE_COLUMNS))
  elif "measure" not in f.config:
    print(format_table(plan_sweep(f.config, f.slice, f.mfu, f.tokens, f.compile)))
  else:
    experiment.validate_experiment(f.config)
  if f.compile in ("tpu", "gpu") and not f.tune:
    rows = compile_sweep(f.config, f.slice, f.runs, f.programs)
    print(format_table(rows, AOT_COLUMNS))
    try:
      aot.check_fits(rows, f.slice)
    except aot.DoesNotFit as e:
      raise SystemExit(str(e)) from None


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "experiments/<name>.py[:preset]")
  flags.DEFINE_string("slice", "v5p-64", "TPU slice (v5p-64, v6e-64, v4-32: TPU cores) or GPUs "
                      "(h100-8, h200-64: GPUs, 8 per host).")
  flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilization for the step time.")
  flags.DEFINE_float("tokens", None, "Training tokens per run (default: steps × batch).")
  flags.DEFINE_enum("compile", None, ["tpu", "gpu", "cpu"], "tpu, gpu: compile every program "
                    "with XLA:TPU (libtpu) or XLA:GPU (the CUDA plugin) for the slice, no device "
                    "needed; cpu: the train step for the current devices (fake CPU ones via "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N).")
  flags.DEFINE_multi_string("runs", None, "With --compile=tpu|gpu or --tune, only this run of "
                            "the sweep (e.g. rank=32); repeat for several; default all.")
  flags.DEFINE_list("programs", None, "With --compile=tpu|gpu, only these programs (e.g. "
                    "train_step); default all (with --tune: train_step_no_metrics).")
  flags.DEFINE_bool("tune", False, "Rank meshes × train.grad_accum × model.remat of one run by "
                    "predicted step time; with --compile=tpu|gpu, compile the best ones.")
  flags.DEFINE_integer("tune_show", 10, "With --tune, the number of best layouts to print.")
  flags.DEFINE_integer("tune_compile", 3, "With --tune and --compile=tpu|gpu, the number of "
                       "best layouts to compile.")
  flags.DEFINE_bool("tune_remat", True, "With --tune, search model.remat too (else keep the "
                    "config's).")
  flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal, not just its line.")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
