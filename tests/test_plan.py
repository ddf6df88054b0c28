"""Offline plans: slice parsing, byte counts against jax.eval_shape, FLOPs formula."""

import math

import jax
import pytest
from helpers import tiny_config

from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.tools import chips, costs, plan
from lmhead_jax.training import sweep


def test_parse_slice():
  assert chips.parse_slice("v5p-64")[2] == 32  # v5p counts TensorCores, 2 per chip
  assert chips.parse_slice("v6e-64")[2] == 64
  assert chips.parse_slice("v5litepod-16")[2] == 16
  with pytest.raises(ValueError, match="unknown slice 'v9-8'"):
    chips.parse_slice("v9-8")
  with pytest.raises(ValueError, match="not a multiple of 2"):
    chips.parse_slice("v5p-3")


def test_memory_matches_eval_shape_bytes():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  row = plan.plan(cfg, "v6e-8")
  c = ModelConfig.of(cfg.model)
  shapes = jax.eval_shape(lambda k: model.init(k, c, HeadConfig.of(cfg.head, c)),
                          jax.random.key(0))
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  assert row["params_gb"] * 1e9 == pytest.approx(total)  # replicated on a pure data mesh
  assert row["opt_state_gb"] == pytest.approx(2 * row["params_gb"])  # AdamW: mu and nu
  cfg.mesh.update(data=1, fsdp=-1)
  # Every leaf here has a non-'layers' dimension divisible by 8: FSDP stores exactly 1/8 of it.
  assert plan.plan(cfg, "v6e-8")["params_gb"] * 1e9 == pytest.approx(total / 8)


def test_flops_per_token_formula():
  cfg = tiny_config()
  c = ModelConfig.of(cfg.model)
  layer = (c.d_model * (c.n_heads + 2 * c.kv_heads) * c.hd + c.n_heads * c.hd * c.d_model
           + 3 * c.d_model * c.ff + 2 * c.d_model)
  expected = 6 * (c.n_layers * layer + c.vocab_size * c.d_model) + 12 * c.n_layers * c.d_model * 16
  assert costs.model_flops_per_token(cfg) == expected
  cfg.head.update(kind="factorized", rank=4)
  assert costs.model_flops_per_token(cfg) == expected - 6 * (c.vocab_size * c.d_model
                                                              - (c.vocab_size * 4 + 4 * c.d_model))


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
    from lmhead_jax.training import sweep
    cfg = sweep.configure(get_config("paper"), {{"head.rank": 4096}})
    # XLA:CPU's compiler dies (SIGFPE) on global arrays of 2^32+ elements, which the 1M-token
    # batch's embeddings are; 8 micro-batches keep every global array below that.
    cfg.train.grad_accum = 8
    cfg.mesh.update(data=1, fsdp=64, tensor=1)
    print(json.dumps(plan.compiled_memory(cfg)))
  """, n_devices=64, timeout=3000)
  from experiments.rank_sweep import get_config
  row = plan.plan(sweep.configure(get_config("paper"), {"head.rank": 4096}), "v6e-64")
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
                         f"--config={ROOT}/experiments/rank_sweep.py:paper", "--slice=h200-64"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: train.batch_size=512 (per micro-batch 32) is not divisible by the data-parallel "
      "size 64 (mesh data×fsdp); make it a multiple, or change train.grad_accum or the mesh "
      "(--verbose for the traceback)"], proc.stderr[-2000:]
