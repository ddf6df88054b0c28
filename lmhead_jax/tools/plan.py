"""Paper-scale plans checked offline: parameters, FLOPs, per-device memory and step time on a slice.

  python -m lmhead_jax.plan --config=experiments/rank_sweep.py:paper --slice=v5p-64 [--mfu=0.4]
      [--tokens=11e9] [--compile=tpu|gpu|cpu] [--config.mesh.fsdp=-1 ...]

Parameter and optimizer bytes come from `jax.eval_shape` of the real init and optimizer, divided
by each leaf's real sharding on the slice's mesh. Activations are an estimate (formula in
`activation_bytes`). --compile=tpu compiles every program with XLA:TPU for the slice's topology
(libtpu, no TPU needed; `lmhead_jax.tools.aot`) and exits non-zero with "does not fit" when one
needs more than the chip's HBM; --compile=gpu does the same with XLA:GPU for H100/H200 GPUs;
--compile=cpu compiles the train step for the current (e.g. fake CPU) devices and reports XLA's
per-device memory and FLOP counts beside.

Chips and slices: `lmhead_jax.tools.chips`. Refusals (a bad slice, --mfu, --tokens, or a config
that a run or the compile would refuse) are one line and exit 2.
"""

import math
import types

import jax

from lmhead_jax.tools import aot, costs
from lmhead_jax.tools.chips import CHIPS, parse_slice
from lmhead_jax.training import cli, experiment, setup, sharding, sweep, train


def _sharded_bytes(shapes, axes, mesh_shape: dict) -> float:
  fake_mesh = types.SimpleNamespace(shape=mesh_shape)
  total = 0.0
  for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
    spec = sharding.spec_for(s.shape, a, fake_mesh)
    split = math.prod(mesh_shape[ax] for ax in spec if ax is not None)
    total += math.prod(s.shape) * s.dtype.itemsize / split
  return total


def activation_bytes(cfg, tokens_per_device: int) -> float:
  """Estimated live activations per device for one micro-batch.

  Without remat, each layer keeps ≈ 4D + 2(H+K)·hd + H·S + 3F values per token (norm inputs,
  q/k/v/o, attention probabilities, MLP gate/up/activation); with remat only its input (D).
  The head adds 3 float32 V-vectors per token (logits, softmax, G), or per chunk token.
  """
  c, hc = setup.configs(cfg)
  act = 2 if c.dtype == "bfloat16" else 4
  s = int(cfg.data.seq_len)
  per_layer = (4 * c.d_model + 2 * (c.n_heads + c.kv_heads) * c.hd + c.n_heads * s + 3 * c.ff)
  layers = c.n_layers * c.d_model + per_layer if c.remat else c.n_layers * per_layer
  head_tokens = min(hc.chunk_size, tokens_per_device) if hc.chunk_size else tokens_per_device
  return tokens_per_device * layers * act + 3 * 4 * c.vocab_size * head_tokens


def check_assumptions(mfu: float, tokens: float | None) -> None:
  """--mfu in (0, 1]; --tokens, when given, > 0 (NaN refused)."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]")
  if tokens is not None and not 0 < tokens < math.inf:
    raise ValueError(f"--tokens={tokens} must be a positive number")


def plan(cfg, slice_name: str, mfu: float = 0.4, tokens: float | None = None) -> dict:
  """One row of the plan table for `cfg` on `slice_name`; refuses what a run would refuse."""
  check_assumptions(mfu, tokens)
  experiment.validate(cfg)
  _, chip, devices = parse_slice(slice_name)
  dims = sharding.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
  mesh_shape = dict(zip(sharding.MESH_AXES, dims))
  s = setup.resolve(cfg)
  setup.check_batch_split(s.batch_size, s.grad_accum, mesh_shape["data"] * mesh_shape["fsdp"])
  shapes = jax.eval_shape(s.new_state, jax.random.key(0))
  like_params = lambda x: jax.tree.structure(x) == jax.tree.structure(shapes.params)
  moments = jax.tree.leaves(shapes.opt_state, is_leaf=like_params)
  n_moments = sum(map(like_params, moments))  # AdamW: mu and nu; SGD: the momentum trace
  params_b = _sharded_bytes(shapes.params, s.axes, mesh_shape)
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  micro_batch = int(cfg.train.batch_size) // int(cfg.train.grad_accum)
  tokens_per_device = micro_batch * int(cfg.data.seq_len) // dp
  flops = costs.model_flops_per_token(cfg)
  step_tokens = int(cfg.train.batch_size) * int(cfg.data.seq_len)
  step_s = flops * step_tokens / (devices * chip.peak_bf16_flops * mfu)
  total_tokens = float(tokens if tokens is not None else cfg.train.steps * step_tokens)
  row = {
      "slice": slice_name, "devices": devices,
      "mesh": "x".join(f"{k}={v}" for k, v in mesh_shape.items()),
      "params": costs.param_counts(cfg)["total"], "flops_per_token": flops,
      "params_gb": params_b / 1e9, "grads_gb": params_b / 1e9,
      "opt_state_gb": n_moments * params_b / 1e9,
      "activations_gb": activation_bytes(cfg, tokens_per_device) / 1e9,
      "hbm_gb": chip.hbm_bytes / 1e9, "step_s": step_s, "mfu": mfu,
      "tokens": total_tokens,
      "chip_hours": total_tokens * flops / (chip.peak_bf16_flops * mfu) / 3600,
  }
  row["total_gb"] = sum(row[k] for k in ("params_gb", "grads_gb", "opt_state_gb",
                                         "activations_gb"))
  row["fits"] = row["total_gb"] < row["hbm_gb"]
  return row


def compiled_memory(cfg) -> dict:
  """Per-device bytes and FLOPs that XLA reports for the train step on the current devices."""
  s = setup.resolve(cfg, sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  b = jax.ShapeDtypeStruct((s.batch_size, s.seq_len), "int32",
                           sharding=s.batch_shardings["inputs"])
  batch = {"inputs": b, "targets": b, "mask": jax.ShapeDtypeStruct(b.shape, "float32",
                                                                 sharding=b.sharding)}
  lowered = train.make_train_step(s).lower(s.abstract_state(), batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"argument_gb": mem.argument_size_in_bytes / 1e9, "temp_gb": mem.temp_size_in_bytes / 1e9,
          "output_gb": mem.output_size_in_bytes / 1e9, "xla_flops": float(cost.get("flops", 0.0))}


COLUMNS = ("run", "params", "flops_per_token", "mesh", "params_gb", "opt_state_gb",
           "activations_gb", "total_gb", "hbm_gb", "fits", "argument_gb", "temp_gb", "step_s",
           "tokens", "chip_hours")


AOT_COLUMNS = ("run", "program", "argument_gb", "temp_gb", "output_gb", "alias_gb", "needed_gb",
               "hbm_gb", "fits", "model_tflops", "xla_tflops", "xla_gb_accessed", "roofline_ms",
               "bound", "roofline_mfu", "xla_error")


def format_table(rows: list[dict], columns=COLUMNS) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
  cols = [c for c in columns if any(c in r for r in rows)]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def plan_sweep(cfg, slice_name: str, mfu: float = 0.4, tokens: float | None = None,
               compile_: str | None = None) -> list[dict]:
  """One row per run of `cfg.sweep` (or one for a single run), plus a total row."""
  runs = sweep.expand(cfg.get("sweep") or ({},))
  rows = []
  for overrides in runs:
    run_cfg = sweep.configure(cfg, overrides)
    row = {"run": sweep.run_name(overrides) or "run", **plan(run_cfg, slice_name, mfu, tokens)}
    if compile_ == "cpu":
      row.update(compiled_memory(run_cfg))
    rows.append(row)
  if len(rows) > 1:
    rows.append({"run": "total", "tokens": sum(r["tokens"] for r in rows),
                 "chip_hours": sum(r["chip_hours"] for r in rows)})
  return rows


def compile_sweep(cfg, slice_name: str, runs: list[str] | None = None,
                  programs: list[str] | None = None) -> list[dict]:
  """XLA:TPU's or XLA:GPU's rows (`aot.compile_for_slice`) for each run of `cfg.sweep` (or
  those named)."""
  named = {sweep.run_name(o) or "run": o for o in sweep.expand(cfg.get("sweep") or ({},))}
  if unknown := set(runs or ()) - set(named):
    raise ValueError(f"--runs: {sorted(unknown)} not in the sweep's runs {list(named)}")
  rows = []
  for name, overrides in named.items():
    if runs is None or name in runs:
      run_cfg = sweep.configure(cfg, overrides)
      if "measure" not in run_cfg:  # the same refusals as the plan without --compile
        plan(run_cfg, slice_name)
      rows += [{"run": name, **r} for r in aot.compile_for_slice(run_cfg, slice_name, programs)]
  return rows


def main(argv):
  """The plan's command line; a refusal is one line and exit 2 (`cli.refuse`)."""
  del argv
  from absl import flags
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
  if "measure" not in f.config:
    print(format_table(plan_sweep(f.config, f.slice, f.mfu, f.tokens, f.compile)))
  else:
    experiment.validate_experiment(f.config)
  if f.compile in ("tpu", "gpu"):
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
  flags.DEFINE_multi_string("runs", None, "With --compile=tpu|gpu, only this run of the sweep "
                            "(e.g. head.rank=32); repeat for several; default all.")
  flags.DEFINE_list("programs", None, "With --compile=tpu|gpu, only these programs (e.g. "
                    "train_step); default all.")
  flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal, not just its line.")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
