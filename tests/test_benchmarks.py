"""The accelerator battery's CPU preset, against independent references.

The default suite runs the bf16 section; hf_parity (tests/test_hf.py checks the same parity) and
the timed sections (train, head: seven XLA:CPU compiles of train steps) run in the slow tests.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import accelerator, configs
from lmhead_jax.core import heads, model
from lmhead_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result():
  return accelerator.run("cpu", ["bf16"])


@pytest.mark.slow
def test_battery_timed_sections_and_json(tmp_path):
  out = tmp_path / "battery.json"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--preset=cpu",
                         f"--out={out}"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["preset"] == "cpu" and set(result["section_seconds"]) == {
      "train", "head", "bf16", "hf_parity"}
  on = result["train"]["bottleneck_every_step"]
  assert on["tokens_per_step"] == 2 * 32 and on["tokens_per_sec"] > 0 and on["timed_steps"] == 2
  assert result["train"]["ratios"]["bottleneck_vs_off_throughput"] > 0
  assert result["head"]["ratios"]["chunked_vs_dense_xla_temp_bytes"] < 1  # 32 of 64 tokens
  assert result["peak_bf16_flops_per_device"] is None  # a CPU has no entry: MFU vs matmul peak


@pytest.mark.slow
def test_hf_parity_on_this_device():
  result = accelerator.run("cpu", ["hf_parity"])
  assert set(result["hf_parity"]) == {"gpt2", "gpt_neox", "gpt_neox_odd_rotary", "llama", "olmo2", "qwen3"}
  for family, row in result["hf_parity"].items():
    assert row["logits_max_abs_highest"] < 1e-4, family  # as tests/test_hf.py, float32
    assert row["hidden_max_abs_highest"] < 1e-4, family


def test_bf16_against_float32_and_float64_truth(result):
  """The float32 metrics match numpy float64 on the same batch; bf16 stays close."""
  cfg = configs.get_config("tiny_cpu")
  cfg.model.dtype = "float32"
  c, hc = train.configs(cfg)
  state = train.new_state(jax.random.key(cfg.seed), cfg)
  rng = np.random.default_rng(1)  # the battery's batch
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  inputs = rng.integers(0, c.vocab_size, shape, dtype=np.int32)
  targets = rng.integers(0, c.vocab_size, shape, dtype=np.int32).reshape(-1)
  h = np.asarray(model.hidden(state.params, inputs, c), np.float64).reshape(-1, c.d_model)
  w = np.asarray(heads.matrix(heads.params_of(state.params, hc)), np.float64)
  z = h @ w.T
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = (p - np.eye(c.vocab_size)[targets]) / len(targets)
  u, s, _ = np.linalg.svd(w, full_matrices=False)
  u = u[:, s > s[0] * 1e-5]  # range(W) = range(A), rank r = 32 (W = A B in float32)
  destroyed = np.linalg.norm(g - (g @ u) @ u.T) / np.linalg.norm(g)
  f32, bf16 = result["bf16"]["float32"], result["bf16"]["bfloat16"]
  assert u.shape[1] == 32
  assert f32["destroyed_ratio"] == pytest.approx(destroyed, rel=1e-4)
  assert f32["full_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-4)
  for k in f32:
    assert result["bf16"]["abs_diff"][k] == pytest.approx(abs(bf16[k] - f32[k]))
  assert bf16["destroyed_ratio"] == pytest.approx(destroyed, abs=0.02)
