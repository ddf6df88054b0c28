"""XLA:TPU ahead-of-time compilation with libtpu (no TPU): topology, per-chip bytes, collectives
against the analytic formula, the roofline, the fit check."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import helpers
import jax
import pytest
from helpers import tiny_config

from experiments import measure_pretrained, rank_sweep
from lmhead_jax.core import model
from lmhead_jax.core.config import FAMILIES, HeadConfig, ModelConfig
from lmhead_jax.runs import experiment, grid
from lmhead_jax.tools import aot, chips, collectives, costs, plan
from lmhead_jax.training import sharding


ROOT = str(helpers.ROOT)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install "
                                  "'lmhead-jax[tpu-compile]'): the TPU compiler is unavailable")


def aligned_config(**model_kw):
  """Every weight dimension a multiple of 128 (TPU tiles), so XLA's bytes carry no padding."""
  cfg = tiny_config(d_model=128, n_heads=1, n_kv_heads=1, d_ff=256, vocab_size=512,
                    max_seq_len=128, **model_kw)
  cfg.data.seq_len = 128
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  return cfg


def compile_rows(cfg, slice_name: str, programs=None) -> list[dict]:
  return plan.compile_sweep(cfg, slice_name, programs=programs)


def test_topology_shapes_match_cloud_tpu():
  # Google Cloud's documented slice shapes (chips): v5p-8 2x2x1, v5p-64 2x4x4, v4-64 2x4x4,
  # v5p-1024 8x8x8, v5e-256 16x16, v6e-64 8x8, v6e-8 2x4, v5e-1 1x1.
  cases = {"v5p-8": (2, 2, 1), "v5p-64": (2, 4, 4), "v4-64": (2, 4, 4), "v5p-1024": (8, 8, 8),
           "v5e-256": (16, 16), "v6e-64": (8, 8), "v6e-8": (2, 4), "v5e-1": (1, 1)}
  for name, dims in cases.items():
    kind, _, n_chips = chips.parse_slice(name)
    assert aot.topology_shape(kind, n_chips) == dims, name
  with pytest.raises(ValueError, match="powers of two"):
    aot.topology_shape("v5e", 24)
  with pytest.raises(ValueError, match="start at 4 chips"):
    aot.topology_shape("v5p", 2)


def test_train_programs_cost_in_order_of_their_metrics():
  """Six train-side programs; a metric step without realized_cosine costs more than none and
  less than every metric (on this CPU, by XLA's counts), also when it refines its range map."""
  s = experiment.resolve(tiny_config(), helpers.one_device_mesh())
  flops = {name: p.lowered.compile().cost_analysis()["flops"]
           for name, p in aot.train_programs(s).items()}
  assert set(flops) == {"train_step", "train_step_bottleneck", "train_step_refined",
                        "train_step_refined_realized", "train_step_no_metrics", "eval_step"}
  assert flops["train_step_no_metrics"] < flops["train_step_bottleneck"] < flops["train_step"]
  assert (flops["train_step_no_metrics"] < flops["train_step_refined"]
          < flops["train_step_refined_realized"])


@needs_libtpu
def test_multi_host_slice_devices():
  devices = aot.topology_devices("v5p-64")
  assert len(devices) == 32 and {d.device_kind for d in devices} == {"TPU v5"}
  assert len({d.process_index for d in devices}) == 8  # 4 chips per host
  assert len(aot.topology_devices("v5e-256")) == 256


@needs_libtpu
def test_train_eval_programs_bytes_and_roofline():
  cfg = aligned_config()
  (train,) = compile_rows(cfg, "v5p-8", ["train_step"])
  c = ModelConfig.of(cfg.model)
  shapes = jax.eval_shape(lambda k: model.init(k, c, HeadConfig.of(cfg.head, c)),
                          jax.random.key(0))
  param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(shapes))
  # Arguments per chip: params + AdamW mu + nu, each 1/4 (fsdp=4), and the batch (3 arrays).
  batch_bytes = 3 * 8 * 128 * 4 / 4
  assert train["argument_gb"] * 1e9 == pytest.approx(3 * param_bytes / 4 + batch_bytes, rel=0.02)
  assert train["alias_gb"] == pytest.approx(3 * param_bytes / 4 / 1e9, rel=0.02)  # donated
  chip = chips.CHIPS["v5p"]
  model_per_chip = costs.model_flops_per_token(*experiment.configs(cfg), 128) * 8 * 128 / 4
  assert train["model_tflops"] * 1e12 == pytest.approx(model_per_chip)
  # The bound is at least the model FLOPs at peak, the bytes XLA counts at HBM bandwidth, and
  # the bytes its collectives send at the link bandwidth; without overlap, their sum.
  bounds = (model_per_chip / chip.peak_bf16_flops,
            train["xla_gb_accessed"] * 1e9 / chip.hbm_bytes_per_s,
            train["coll_gb"] * 1e9 / chip.ici_bytes_per_s)
  assert train["roofline_ms"] / 1e3 >= max(bounds) and train["coll_gb"] > 0
  assert train["serial_ms"] / 1e3 >= sum(bounds)
  assert train["serial_ms"] == pytest.approx(
      train["compute_ms"] + train["hbm_ms"] + train["coll_ms"])
  for bound in ("roofline", "serial"):
    assert train[f"{bound}_mfu"] == pytest.approx(
        model_per_chip / (chip.peak_bf16_flops * train[f"{bound}_ms"] / 1e3))
  assert 0 < train["serial_mfu"] <= train["roofline_mfu"] <= 1
  assert train["fits"] and train["needed_gb"] < 95


@needs_libtpu
def test_cost_analysis_counts_a_scan_body_once():
  """Why the roofline takes max(model, XLA, HLO matmul) FLOPs: XLA:TPU ignores the layer scan's
  trip count, and `matmuls` counts it: its FLOPs grow with the layers as the model's do (2.013e8
  against 2.016e8 for two layers; before `matmuls` skipped the holes of base-dilated
  convolutions it counted 2.35e8).

  If a libtpu release counts loops, this fails: XLA's FLOPs then become the better figure.
  """
  rows = []
  for layers in (2, 4):
    cfg = aligned_config(n_layers=layers)
    (row,) = compile_rows(cfg, "v5p-8", ["eval_step"])
    rows.append(row)
  assert rows[1]["xla_tflops"] == pytest.approx(rows[0]["xla_tflops"], rel=0.01)
  added = {k: rows[1][k] - rows[0][k] for k in ("matmul_tflops", "model_tflops")}
  assert added["matmul_tflops"] == pytest.approx(added["model_tflops"], rel=0.01)


@needs_libtpu
def test_measure_programs_from_hf_config(tmp_path):
  hf_config = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
               "intermediate_size": 256, "max_position_embeddings": 256, "hidden_act": "silu",
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
  (tmp_path / "tiny-llama").mkdir()
  (tmp_path / "tiny-llama" / "config.json").write_text(json.dumps(hf_config))
  cfg = measure_pretrained.get_config("pretrained")  # declares measure.chunk_len
  cfg.update(checkpoints=str(tmp_path / "tiny-llama"), dtype="bfloat16")
  cfg.data.seq_len = 128
  cfg.measure.update(batch_size=8, chunk_len=64)
  rows = {r["program"]: r for r in compile_rows(cfg, "v5p-8")}
  assert set(rows) == {"tiny-llama/range_map", "tiny-llama/measure_step"}
  # The range map's argument is W (1024×128 bf16), replicated on the default data mesh.
  assert rows["tiny-llama/range_map"]["argument_gb"] * 1e9 == pytest.approx(1024 * 128 * 2)
  assert rows["tiny-llama/range_map"]["output_gb"] * 1e9 == pytest.approx(128 * 128 * 4)
  # Forward FLOPs per token: 2·(2 layers × (4·128² attention + 3·128·256 MLP + 2·128 norms)
  # + V·D head) + 4·layers·heads·head_dim·seq; 8 × 128 tokens over 4 chips.
  per_token = 2 * (2 * (4 * 128**2 + 3 * 128 * 256 + 2 * 128) + 1024 * 128) + 4 * 2 * 128 * 128
  step = rows["tiny-llama/measure_step"]
  assert step["model_tflops"] * 1e12 == pytest.approx(per_token * 8 * 128 / 4)
  assert 0 < step["roofline_mfu"] <= 1
  assert all(r["fits"] for r in rows.values())


def big_eval_rows(vocab_size: int) -> list[dict]:
  """The eval step of a 1-layer, D=2048 model with 2·V·D float32 parameters, replicated, v5e-4."""
  cfg = tiny_config(vocab_size=vocab_size, d_model=2048, n_layers=1)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  return [r | {"run": "big"} for r in compile_rows(cfg, "v5e-4", ["eval_step"])]


def assert_remedies(msg: str):
  assert msg.startswith("does not fit on v5e-4")
  for remedy in ("mesh.fsdp", "model.remat", "train.batch_size", "head.chunk_size"):
    assert remedy in msg


@needs_libtpu
def test_does_not_fit_over_the_documented_hbm():
  """16.06 GB of parameters: XLA (15.75 GiB usable) compiles it, the 16 GB table rejects it."""
  (row,) = rows = big_eval_rows(980_000)
  assert row["argument_gb"] * 1e9 == pytest.approx(2 * 980_000 * 2048 * 4, rel=0.01)
  assert not row["fits"] and row["needed_gb"] > row["hbm_gb"] == 16
  with pytest.raises(aot.DoesNotFit) as e:
    aot.check_fits(rows, "v5e-4")
  assert "big eval_step: needs 16." in str(e.value) and "v5e-4 has 16.00 GB" in str(e.value)
  assert_remedies(str(e.value))


@needs_libtpu
def test_does_not_fit_when_xla_runs_out_of_hbm():
  """17.2 GB of parameters: XLA:TPU refuses to compile; its bytes needed and available show."""
  (row,) = rows = big_eval_rows(1 << 20)
  assert not row["fits"] and "CompileTimeHbmOom" in row["xla_error"]
  with pytest.raises(aot.DoesNotFit) as e:
    aot.check_fits(rows, "v5e-4")
  needed, available = map(float, re.search(
      r"big eval_step: .*\((\d+\.\d+)G\) exceeds available HBM \((\d+\.\d+)G\)",
      str(e.value)).groups())
  assert needed > 2 * (1 << 20) * 2048 * 4 / 2**30 > available
  assert_remedies(str(e.value))


@needs_libtpu
@pytest.mark.slow
def test_cli_exits_when_xla_runs_out_of_hbm():
  """XLA:TPU itself refuses the train step (temporaries > HBM): the CLI exits non-zero."""
  cmd = [sys.executable, "-m", "lmhead_jax.plan", "--config=experiments/spamlang.py:smoke",
         "--config.model.vocab_size=1048576", "--config.model.d_model=1024",
         "--config.model.n_heads=8", "--config.model.n_kv_heads=8", "--slice=v5e-4",
         "--compile=tpu", "--programs=train_step,eval_step"]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  err = proc.stderr[proc.stderr.index("does not fit on v5e-4"):]
  assert "run train_step:" in err and "eval_step" not in err  # eval fits
  assert "CompileTimeHbmOom" in err
  assert_remedies(err)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_train_step_fits_a_v5p_slice(family):
  """Each family's train step (metrics on) on v5p-16 (8 chips, 2 hosts), FSDP over all.

  Sized for this test's compile time: XLA:TPU takes minutes to compile the range map's
  eigendecompositions for a large D (docs/PERFORMANCE.md).
  """
  cfg = tiny_config(family=family, vocab_size=4096, d_model=256, n_layers=2, n_heads=4,
                    n_kv_heads=4 if family in ("gpt2", "gpt_neox") else 2, d_ff=1024,
                    max_seq_len=512, dtype="bfloat16", remat=True)
  cfg.data.seq_len = 512
  cfg.train.batch_size = 16
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  (row,) = compile_rows(cfg, "v5p-16", ["train_step"])
  assert row["fits"] and 0 < row["needed_gb"] < chips.CHIPS["v5p"].hbm_bytes / 1e9


def test_a_long_compile_reports_progress(capsys):
  import time
  with aot.progress("compiling x for v5p-8", every_s=0.05):
    time.sleep(0.3)
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == "compiling x for v5p-8: started" and lines[-1].startswith(
      "compiling x for v5p-8: done in")
  assert sum("s so far" in line for line in lines) >= 3


@needs_libtpu
def test_libtpu_topology_prints_no_start_up_warnings():
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  code = "from lmhead_jax.tools import aot; print(len(aot.topology_devices('v5p-64')))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "32"
  assert proc.stderr == "", proc.stderr[-3000:]


def medium_config(**model_kw):
  """2 layers of D=512 (4 heads of 128), d_ff=2048, V=4096, bf16; 16 sequences of 256."""
  cfg = tiny_config(vocab_size=4096, d_model=512, n_layers=2, n_heads=4, n_kv_heads=4,
                    d_ff=2048, max_seq_len=256, dtype="bfloat16", **model_kw)
  cfg.data.seq_len = 256
  cfg.train.batch_size = 16
  return cfg


@needs_libtpu
@pytest.mark.parametrize("mesh,remat", [
    ((1, 8, 1), False), pytest.param((2, 4, 1), False, marks=pytest.mark.slow),
    pytest.param((1, 2, 4), True, marks=pytest.mark.slow)])
def test_collectives_match_the_formula(mesh, remat):
  """XLA:TPU's collectives of the plain train step on v5p-16 (8 chips), per kind, against
  `costs.collective_bytes`: at this size XLA all-reduces the layers' gradients (no windowed
  einsums); only the scalar reductions (loss, norms) are missing from the formula."""
  cfg = medium_config(remat=remat)
  cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  (row,) = compile_rows(cfg, "v5p-16", ["train_step_no_metrics"])
  c, hc = experiment.configs(cfg)
  formula = costs.collective_bytes(c, hc, dict(zip(("data", "fsdp", "tensor"), mesh)), 16, 1,
                                   256, grad_sync="all-reduce")
  total = sum(formula.values())
  assert row["coll_gb"] * 1e9 == pytest.approx(total, rel=0.02)
  for kind in collectives.KINDS:
    assert abs(row[f"{kind}_gb"] * 1e9 - formula[kind]) <= 0.02 * total, kind


@needs_libtpu
@pytest.mark.slow
def test_paper_collectives_match_the_formula():
  """The rank sweep's r=32 step on v5p-64, FSDP over 32 chips, one micro-batch: XLA:TPU's
  windowed einsums gather the weights and reduce-scatter their gradients as collective-permutes
  in loops unrolled by 2; the chunked head moves h and ∂L/∂h, not W. Within 10% of the formula
  (a windowed einsum sends all n shards, not n − 1; the attention's projections move some
  activations)."""
  cfg = grid.configure(rank_sweep.get_config("paper"), {"head.rank": 32})
  cfg.train.grad_accum = 1
  cfg.mesh.update(data=1, fsdp=32, tensor=1)
  (row,) = compile_rows(cfg, "v5p-64", ["train_step_no_metrics"])
  formula = costs.collective_bytes(*experiment.configs(cfg), {"data": 1, "fsdp": 32, "tensor": 1},
                                   512, 1, 2048)
  assert row["coll_gb"] * 1e9 == pytest.approx(sum(formula.values()), rel=0.1)
  assert row["collective-permute_gb"] > row["all-gather_gb"] > 0


@needs_libtpu
def test_meshes_that_map_onto_the_torus():
  """v5p-64 is a 2x4x4 torus: jax.make_mesh builds a mesh axis only from whole physical axes."""
  devices = aot.topology_devices("v5p-64")
  for data, tensor in [(d, t) for d in (1, 2, 4, 8, 16, 32) for t in (1, 2, 4, 8) if d * t <= 32]:
    sizes = (data, 32 // (data * tensor), tensor)
    try:
      sharding.make_mesh(*sizes, devices=devices)
      built = True
    except NotImplementedError:
      built = False
    assert aot.maps_onto_slice("v5p-64", sizes) == built, sizes
