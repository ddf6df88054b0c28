"""Offline plans: byte counts against jax.eval_shape, refusals, the roofline, --tune, meshes on a
torus."""

import math

import jax
import pytest
from helpers import tiny_config

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.runs import experiment, grid
from lmhead_jax.tools import aot, chips, plan


def test_memory_matches_eval_shape_bytes():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  (row,) = plan.plan_sweep(cfg, "v6e-8")
  c = ModelConfig.of(cfg.model)
  shapes = jax.eval_shape(lambda k: model.init(k, c, HeadConfig.of(cfg.head, c)),
                          jax.random.key(0))
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  assert row["params_gb"] * 1e9 == pytest.approx(total)  # replicated on a pure data mesh
  assert row["opt_state_gb"] == pytest.approx(2 * row["params_gb"])  # AdamW: mu and nu
  cfg.mesh.update(data=1, fsdp=-1)
  # Every leaf here has a non-'layers' dimension divisible by 8: FSDP stores exactly 1/8 of it.
  assert plan.plan_sweep(cfg, "v6e-8")[0]["params_gb"] * 1e9 == pytest.approx(total / 8)


@pytest.mark.slow
def test_paper_rank_sweep_compiles_on_64_fake_devices():
  """The r=4096 paper model (≈2B parameters) lowers and compiles for fsdp=64."""
  import os
  from helpers import run_with_devices
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = run_with_devices(f"""
    import json, sys
    sys.path.insert(0, {root!r})
    from experiments.rank_sweep import get_config
    from lmhead_jax.tools import plan
    from lmhead_jax.runs import experiment, grid
    from lmhead_jax.training import sharding
    cfg = grid.configure(get_config("paper"), {{"head.rank": 4096}})
    # XLA:CPU's compiler dies (SIGFPE) on global arrays of 2^32+ elements, which the 1M-token
    # batch's embeddings are; 8 micro-batches keep every global array below that.
    cfg.train.grad_accum = 8
    s = experiment.resolve(cfg, sharding.make_mesh(1, 64, 1))
    print(json.dumps(plan.compiled_memory(s)))
  """, n_devices=64, timeout=3000)
  from experiments.rank_sweep import get_config
  cfg = grid.configure(get_config("paper"), {"head.rank": 4096})
  cfg.mesh.update(data=1, fsdp=64, tensor=1)
  (row,) = plan.plan_sweep(cfg, "v6e-64")
  # XLA's per-device argument bytes (params + optimizer state + batch) ≈ the plan's estimate.
  assert out["argument_gb"] == pytest.approx(row["params_gb"] + row["opt_state_gb"], rel=0.05)
  assert out["xla_flops"] > 0


@pytest.mark.parametrize("kw,needle", [
    (dict(slice_name="v5p-0"), "unknown slice 'v5p-0'"),
    (dict(mfu=0.0), r"--mfu=0.0 must be in \(0, 1\]"),
    (dict(mfu=float("nan")), r"--mfu=nan must be in \(0, 1\]"),
    (dict(mfu=1.5), r"--mfu=1.5 must be in \(0, 1\]"),
    (dict(tokens=0.0), "--tokens=0.0 must be a positive number"),
    (dict(batch_size=0), "train.batch_size=0 must be an integer >= 1"),
    (dict(seq_len=0), "data.seq_len=0 must be an integer >= 1"),
    (dict(steps=-1), "train.steps=-1 must be an integer >= 1"),
    (dict(batch_size=12, slice_name="v6e-8"), r"train.batch_size=12 \(per micro-batch 12\) is "
     "not divisible by the data-parallel size 8"),
])
def test_plan_refuses_what_a_run_or_the_compile_would_refuse(kw, needle):
  cfg = tiny_config()
  cfg.train.update({k: kw.pop(k) for k in ("batch_size", "steps") if k in kw})
  if "seq_len" in kw:
    cfg.data.seq_len = kw.pop("seq_len")
  with pytest.raises(ValueError, match=needle):
    plan.plan_sweep(cfg, **{"slice_name": "v6e-8", **kw})


def test_plan_command_refuses_in_one_line():
  import subprocess
  import sys
  from helpers import ROOT
  proc = subprocess.run([sys.executable, "-m", "lmhead_jax.plan",
                         f"--config={ROOT}/experiments/rank_sweep.py:paper", "--slice=h200-64",
                         "--config.train.grad_accum=16"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: train.batch_size=512 (per micro-batch 32) is not divisible by the data-parallel "
      "size 64 (mesh data×fsdp); make it a multiple, or change train.grad_accum or the mesh "
      "(--verbose for the traceback)"], proc.stderr[-2000:]


def test_roofline_bounds_and_mfu():
  chip = chips.CHIPS["v5p"]
  row = aot.roofline(459e12, 2 * 2765e9, 600e9 / 2, 0.5 * 459e12, chip, 32)
  assert row["compute_ms"] == pytest.approx(1e3) and row["hbm_ms"] == pytest.approx(2e3)
  assert row["coll_ms"] == pytest.approx(500)
  assert row["bound"] == "hbm" and row["roofline_ms"] == pytest.approx(2e3)
  assert row["serial_ms"] == pytest.approx(3.5e3)
  assert row["roofline_mfu"] == pytest.approx(0.25)
  assert row["serial_mfu"] == pytest.approx(0.5 / 3.5)


def test_tune_ranks_every_layout_that_splits_the_batch():
  cfg = tiny_config(dtype="bfloat16")
  cfg.train.batch_size = 8
  s = experiment.resolve(cfg)
  layouts = list(plan.candidates(s, 4))
  # meshes (data, tensor) with data·tensor | 4; grad_accum with 8/accum divisible by data·fsdp
  expected = {(m["data"], m["fsdp"], m["tensor"], k, r)
              for m in ({"data": d, "fsdp": 4 // (d * t), "tensor": t}
                        for d in (1, 2, 4) for t in (1, 2, 4) if 4 % (d * t) == 0)
              for k in (1, 2, 4, 8) if (8 // k) % (m["data"] * m["fsdp"]) == 0
              for r in (False, True)}
  assert {(m["data"], m["fsdp"], m["tensor"], k, r) for m, k, r in layouts} == expected
  ranked = plan.tune(s, "v5p-8")
  assert len(ranked) == len(expected)
  times = [row["est_serial_ms"] for _, row, _ in ranked]
  assert times == sorted(times) and all(row["est_fits"] for _, row, _ in ranked)
  for mesh_shape, row, v in ranked:  # the no-overlap time is the sum of the three terms
    assert row["est_serial_ms"] == pytest.approx(
        row["est_compute_ms"] + row["est_hbm_ms"] + row["est_coll_ms"])
    assert row["grad_accum"] == v.grad_accum and row["remat"] == v.model.remat


def test_tune_marks_the_preset_and_needs_one_run():
  cfg = tiny_config(dtype="bfloat16")
  cfg.mesh.update(data=1, fsdp=4, tensor=1)
  rows = plan.tune_sweep(cfg, "v5p-8", show=1, remat=False)
  assert rows[0]["rank"] == 1 and rows[-1]["preset"] == "<-"
  assert rows[-1]["mesh"] == "data=1xfsdp=4xtensor=1" and rows[-1]["grad_accum"] == 1
  assert all(not r["remat"] for r in rows)
  swept = tiny_config()
  swept.sweep = ({"model.d_model": (32, 64)},)
  with pytest.raises(ValueError, match="--tune needs one run"):
    plan.tune_sweep(swept, "v5p-8")
  with pytest.raises(ValueError, match="--tune_show=0 must be >= 1"):
    plan.tune_sweep(cfg, "v5p-8", show=0)
  with pytest.raises(ValueError, match="--tune_compile=-1 must be >= 0"):
    plan.tune_sweep(cfg, "v5p-8", compile_best=-1)


def test_slices_take_meshes_of_whole_torus_axes():
  assert aot.maps_onto_slice("v5p-64", (4, 4, 2)) and aot.maps_onto_slice("v5p-64", (1, 32, 1))
  assert not aot.maps_onto_slice("v5p-64", (2, 8, 2))  # 2x4x4: 8 = 2·4 leaves 4 for the last 2
  assert aot.maps_onto_slice("h200-64", (2, 8, 4))  # GPUs: any


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_a_spectrum_config_plans_its_gram_step(method):
  """gradient_spectrum's Gram path adds its accumulation step: C (V×V float64, the donated
  argument and the output) += GᵀG of one batch; the randomized path has none."""
  from experiments import gradient_spectrum
  from lmhead_jax.training import sharding
  cfg = gradient_spectrum.get_config("cpu")
  cfg.model.update(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32)
  cfg.data.seq_len, cfg.measure.batch_size, cfg.spectrum.method = 32, 4, method
  programs = plan.programs_of(cfg, sharding.make_mesh())
  assert ("model/gram_update" in programs) == (method == "gram")
  if method == "gram":
    memory = programs["model/gram_update"].lowered.compile().memory_analysis()
    assert memory.output_size_in_bytes == 256 * 256 * 8
    assert memory.alias_size_in_bytes == 256 * 256 * 8  # C is donated
