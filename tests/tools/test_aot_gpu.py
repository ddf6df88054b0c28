"""XLA:GPU ahead-of-time compilation with the CUDA plugin and no GPU: H100/H200, fit check."""

import math
import os
import subprocess
import sys

import helpers
import jax
import pytest

from experiments import spamlang
from lmhead_jax.core import model
from lmhead_jax.core.config import HeadConfig, ModelConfig
from lmhead_jax.runs import experiment
from lmhead_jax.tools import aot, chips, costs


ROOT = str(helpers.ROOT)
needs_cuda_plugin = pytest.mark.skipif(
    aot.cuda_plugin() is None, reason="the CUDA plugin is not installed (pip install "
    "'lmhead-jax[gpu-compile]'): the GPU compiler is unavailable")


def run_plan(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "lmhead_jax.plan", "--config=experiments/spamlang.py:smoke",
         *args]
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def compiled_rows(text: str) -> list[dict]:
  """The rows of the printed table of compiled programs."""
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  start = next(i for i, line in enumerate(lines) if "| program |" in line)
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 1:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) != len(header):
      break
    rows.append(dict(zip(header, cells)))
  return rows


def test_gpu_slices():
  kind, chip, gpus = chips.parse_slice("h200-64")
  assert (kind, gpus, chip.platform, chip.hbm_bytes) == ("h200", 64, "gpu", 141e9)
  assert chips.parse_slice("v5p-64")[1].platform == "tpu"
  with pytest.raises(ValueError, match="h200-16"):
    chips.parse_slice("a100-8")


def test_compile_flag_must_match_the_slice():
  proc = run_plan("--slice=h200-8", "--compile=tpu")
  assert proc.returncode != 0
  assert "--compile=tpu needs a TPU slice (v4, v5p, v5e, v6e), got --slice=h200-8" in proc.stderr


@needs_cuda_plugin
def test_target_configs_come_from_the_installed_compiler():
  h200 = aot.gpu_target_config("NVIDIA H200 141GB HBM3e")
  assert "device_memory_size: 151397597184" in h200 and "memory_bandwidth: 4800000000000" in h200
  with pytest.raises(ValueError, match="NVIDIA H100 80GB HBM3"):
    aot.gpu_target_config("NVIDIA H300")


@needs_cuda_plugin
def test_train_programs_on_two_hosts_of_h200():
  """The CLI compiles the train step with every metric, with the bottleneck stats only (range
  map afresh and refined) and without metrics, and the eval step for 16 H200s (2 hosts);
  per-GPU arguments are the fsdp-sharded params, AdamW moments and batch."""
  proc = run_plan("--slice=h200-16", "--compile=gpu", "--config.model.vocab_size=4096",
                  "--config.model.d_model=256", "--config.mesh.fsdp=-1", "--config.mesh.data=1",
                  "--config.train.batch_size=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["program"]: r for r in compiled_rows(proc.stdout)}
  assert set(rows) == {"train_step", "train_step_bottleneck", "train_step_refined",
                       "train_step_refined_realized", "train_step_no_metrics", "eval_step"}
  cfg = spamlang.get_config("smoke")
  cfg.model.update(vocab_size=4096, d_model=256)
  c = ModelConfig.of(cfg.model)
  shapes = jax.eval_shape(lambda k: model.init(k, c, HeadConfig.of(cfg.head, c)),
                          jax.random.key(0))
  param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(shapes))
  seq = int(cfg.data.seq_len)
  batch_bytes = 3 * 16 * seq * 4 / 16
  for name in ("train_step", "train_step_no_metrics"):
    row = rows[name]
    assert float(row["argument_gb"]) * 1e9 == pytest.approx(3 * param_bytes / 16 + batch_bytes,
                                                            rel=0.05), name
    assert row["fits"] == "True" and row["xla_tflops"] == "None"  # no cost analysis on GPU
    model_per_gpu = costs.model_flops_per_token(*experiment.configs(cfg), seq) * 16 * seq / 16
    assert float(row["compute_ms"]) / 1e3 == pytest.approx(
        model_per_gpu / chips.CHIPS["h200"].peak_bf16_flops, rel=0.01)
    # XLA:GPU's HLO has the collectives: over 2 hosts, at a 400 Gb/s NIC per GPU
    assert float(row["coll_ms"]) / 1e3 == pytest.approx(
        float(row["coll_gb"]) * 1e9 / (400e9 / 8), rel=0.01) and float(row["coll_gb"]) > 0
    assert float(row["roofline_ms"]) == pytest.approx(
        max(float(row[k]) for k in ("compute_ms", "hbm_ms", "coll_ms")), rel=0.01)
  # The metrics (QR of W, SVD of its D×D factor, the visible norms) need more temporaries.
  assert float(rows["train_step"]["temp_gb"]) > float(rows["train_step_no_metrics"]["temp_gb"])


@needs_cuda_plugin
def test_does_not_fit_on_h100():
  """A 2.1M × 4096 untied float32 embedding and head with AdamW moments: 207 GB of arguments
  on one 80 GB H100 (XLA:GPU compiles it anyway): the CLI refuses."""
  proc = run_plan("--slice=h100-1", "--compile=gpu", "--config.model.vocab_size=2097152",
                  "--config.model.d_model=4096", "--config.model.n_heads=8",
                  "--config.model.n_kv_heads=8", "--programs=train_step")
  assert proc.returncode != 0
  err = proc.stderr[proc.stderr.index("does not fit on h100-1"):]
  assert "run train_step: needs" in err and "h100-1 has 80.00 GB" in err
  for remedy in ("mesh.fsdp", "model.remat", "train.batch_size", "head.chunk_size"):
    assert remedy in err


@needs_cuda_plugin
def test_paper_eval_step_keeps_activations_batch_sharded():
  """The rank sweep's paper model (r=4096), eval step on 32 H200s (4 hosts). Without the
  model's activation constraints XLA:GPU resharded the residual stream over D and gathered the
  whole batch in every layer: 413 GB of temporaries per GPU; with them, 13.7 GB."""
  cmd = [sys.executable, "-m", "lmhead_jax.plan", "--config=experiments/rank_sweep.py:paper",
         "--slice=h200-32", "--compile=gpu", "--runs=rank=4096", "--programs=eval_step"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = compiled_rows(proc.stdout)
  assert row["program"] == "eval_step" and row["fits"] == "True"
  # 16 sequences of 2048 per GPU: bf16 activations and the f32 logits of a layer, a few GB.
  assert float(row["temp_gb"]) < 20


@needs_cuda_plugin
def test_importing_on_a_cpu_machine_with_the_plugin_prints_nothing():
  """JAX's plugin discovery used to print a cuDNN traceback at the first device use."""
  import os
  import subprocess
  import sys
  from helpers import ROOT
  if os.path.exists("/proc/driver/nvidia/version"):
    pytest.skip("an NVIDIA driver is present: the CUDA backend is meant to start")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  for code in ("import lmhead_jax, jax; print(jax.devices())",
               "import jax, lmhead_jax; print(jax.devices())"):
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert "CpuDevice" in proc.stdout
