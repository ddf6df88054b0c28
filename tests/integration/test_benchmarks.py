"""The accelerator battery's CPU preset, against independent references.

The default suite runs the bf16 section; hf_parity (tests/test_hf.py checks the same parity) and
the timed sections (train, head: seven XLA:CPU compiles of train steps) run in the slow tests.
"""

import importlib.util
import json
import os
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest

from benchmarks import accelerator, configs, head_loss, range_map
from lmhead_jax.core import bottleneck, heads, model
from lmhead_jax.runs import experiment


ROOT = str(helpers.ROOT)


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
  c, hc = experiment.configs(cfg)
  state = experiment.resolve(cfg).new_state(jax.random.key(cfg.seed))
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


def _numpy_objective(h, w, y, softcap=None, z_loss=0.0, label_smoothing=0.0):
  """float64 mean of loss.Options' objective of z = h Wᵀ, and its (dh, dW) from the formulas."""
  z = h @ w.T
  n, v = z.shape
  s = z if softcap is None else softcap * np.tanh(z / softcap)
  lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
  p = np.exp(s - lse[:, None])
  eps = label_smoothing
  loss = (1 - eps) * (lse - s[np.arange(n), y]) + eps * (lse - s.mean(-1)) + z_loss * lse**2
  ds = p * (1 + 2 * z_loss * lse[:, None]) - (1 - eps) * np.eye(v)[y] - eps / v
  g = (ds if softcap is None else ds * (1 - np.tanh(z / softcap) ** 2)) / n
  return loss.mean(), g @ w, g.T @ h


def test_head_loss_benchmark_variants_match_float64():
  """Every fused CE of benchmarks/head_loss.py (the installed baselines included) gives the
  loss and both gradients of numpy float64; each missing one says why."""
  rng = np.random.default_rng(0)
  v, d, n = 2048, 16, 96  # V a multiple of tokamax_chunked's block: it counts padded lanes
  h, w, y = rng.normal(size=(n, d)), rng.normal(size=(v, d)), rng.integers(0, v, n)
  fns = head_loss.variants(y.astype(np.int32), chunk_size=32, vocab_block=512)
  assert set(fns) | set(head_loss.UNAVAILABLE) == set(head_loss.VARIANTS)
  assert all(head_loss.UNAVAILABLE.values())
  del fns["range_map"]  # not a loss (tests/test_range_map.py)
  earlier = bottleneck.range_map(w + 0.1 * rng.normal(size=w.shape))  # some steps before
  stats = {}
  for name, f in fns.items():
    want = _numpy_objective(h, w, y, **(head_loss.OPTIONS if "options" in name else {}))
    flip = (lambda x: x.T) if name in head_loss.TRANSPOSED else (lambda x: x)
    args = (h.astype(np.float32), flip(w).astype(np.float32))
    value, (dh, dw) = jax.jit(f)(*args + ((earlier,) if name in head_loss.REFINED else ()))
    loss = value[0] if isinstance(value, tuple) else value  # head_loss: (loss, stats)
    stats[name] = value[1] if isinstance(value, tuple) else None
    assert float(loss) == pytest.approx(want[0], rel=1e-6), name
    for got, ref in ((dh, want[1]), (flip(np.asarray(dw)), want[2])):
      np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)
  unrefined = bottleneck.head_loss(h.astype(np.float32), w.astype(np.float32), y,
                                   w_range_map=earlier)[1]
  assert abs(unrefined.visible_norm / stats["head_loss"].visible_norm - 1) > 1e-3
  for name in head_loss.REFINED:  # the refined map's stats are the fresh map's
    fresh = stats[name.replace("_refined", "")]
    np.testing.assert_allclose(stats[name].visible_norm, fresh.visible_norm, rtol=1e-5)
    assert float(stats[name].destroyed_ratio) == pytest.approx(float(fresh.destroyed_ratio),
                                                               rel=1e-5)


def test_head_loss_benchmark_reports_time_memory_and_ratios():
  r = head_loss.run_case(v=2048, d=16, n=256, names=["head_loss", "head_loss_chunked"],
                         repeats=2, warmup=0, chunk_size=32)
  assert set(r["median_ms"]) == set(r["xla_temp_bytes"]) == {"head_loss", "head_loss_chunked"}
  assert r["not_run"] == {} and all(t > 0 for t in r["median_ms"].values())
  temp = r["xla_temp_bytes"]
  assert r["ratios"]["chunked_over_dense_temp"] == pytest.approx(
      temp["head_loss_chunked"] / temp["head_loss"], abs=1e-4)
  assert r["ratios"]["chunked_over_dense_temp"] < 0.5  # 32 of 256 tokens' logits at a time
  assert set(r["ratios"]) == {"chunked_over_dense", "chunked_over_dense_temp"}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: the TPU compiler is unavailable")
def test_head_loss_compiles_for_a_tpu_chip():
  """`--compile`: the chunked CE's matmuls, read off XLA:TPU's HLO per loop trip (4 chunks),
  are exactly the 6·N·D·V limit, where XLA's cost_analysis counts one chunk."""
  out = head_loss.compile_case(8192, 256, 2048, "bfloat16", ["fused_ce_chunked"], 512, "v5p-8")
  row = out["compiled"]["fused_ce_chunked"]
  assert row["matmul_tflops"] * 1e12 == 6 * 2048 * 256 * 8192
  assert row["xla_tflops"] * 1e12 < 6 * 2048 * 256 * 8192 / 2
  assert 0 < row["roofline_mfu"] <= 1 and row["fits"]


def test_range_map_benchmark_counts_the_refinements_two_matmuls():
  """On this CPU: refined = W M' and (W M')ᵀ(W M'), 4·V·D² FLOPs, plus D×D work."""
  out = range_map.compile_both(jax.devices()[:1], 4096, 64)
  assert set(out) == {"afresh", "refined"}
  assert 4 * 4096 * 64**2 <= out["refined"]["gflop"] * 1e9 <= 1.1 * 4 * 4096 * 64**2
  assert all(r["compile_s"] > 0 and r["temp_gb"] >= 0 for r in out.values())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: the TPU compiler is unavailable")
def test_range_map_refined_is_cheaper_than_afresh_on_tpu():
  """XLA:TPU, W [8192, 512] sharded over V on v5p-8's 4 chips: refining skips the Gram path's
  two eigendecompositions, so its D×D work (beyond the V-long matmuls: 4 V D² / 4 chips
  refined, 6 V D² / 4 afresh) is a tenth of theirs or less, and it moves half the bytes or less."""
  from lmhead_jax.tools import aot
  v, d = 8192, 512
  out = range_map.compile_both(aot.topology_devices("v5p-8"), v, d)
  dxd = {k: out[k]["gflop"] * 1e9 - n * v * d**2 / 4 for k, n in (("afresh", 6), ("refined", 4))}
  assert 0 < dxd["refined"] < dxd["afresh"] / 10, dxd
  assert out["refined"]["gb_accessed"] < out["afresh"]["gb_accessed"] / 2
