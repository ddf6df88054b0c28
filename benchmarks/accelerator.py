"""One accelerator battery, one JSON: `python -m benchmarks.accelerator [--preset=...] [--out=...]`.

Sections (keys of the JSON, beside `device`, `date` and `seconds`):
- `train`: the paper rank-sweep model's train step (benchmarks/configs.py:paper_gpu; 6 layers,
  D=4096, V=49,152, r=4096, bf16, 4×2048 tokens): tokens/s, MFU against the chip's bf16 peak
  (`PEAK_BF16`; on CPU, against a measured matmul peak), peak memory, and the throughput of the
  bottleneck metrics on every step against off (`benchmarks.train_step --compare`).
- `head`: the chunked head against the dense head at V=262,144 (configs.py:chunked_gpu),
  throughput and XLA temporary bytes.
- `bf16`: the bottleneck metrics of one batch with the trunk in bfloat16 against float32, same
  parameters and batch (`train.loss_and_grads`): each metric in both and their differences.
- `hf_parity`: the transformers fixtures (tests/fixtures/hf) run on the default device: max |Δ|
  of hidden states and logits against transformers' float32 outputs, at the default matmul
  precision and at "highest" (GPUs default to TF32 for float32 matmuls).

Presets: `auto` (default) is `accelerator` on a GPU/TPU and `cpu` otherwise; `cpu` runs tiny
models in seconds (tested in the default suite), `accelerator` is sized to finish within 8 minutes
on one H200.
"""

import datetime
import json
import pathlib
import time

import jax
import numpy as np

from benchmarks import configs, train_step
from lmhead_jax.core import heads, model
from lmhead_jax.core.config import default_head
from lmhead_jax.data import hf
from lmhead_jax.runs import experiment
from lmhead_jax.training import sharding, train

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
# Dense bf16 peak FLOP/s per device by jax device_kind. NVIDIA H100/H200 SXM datasheets (989.5
# TFLOP/s without sparsity), A100 (312); TPUs: lmhead_jax.plan.CHIPS (Google Cloud TPU pages).
PEAK_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12, "NVIDIA H100": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
             "TPU v4": 275e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
             "TPU v6 lite": 918e12}
PRESETS = {  # (train config, head config, timed steps, warmup steps, matmul size for the peak)
    "cpu": ("tiny_cpu", "chunked_tiny_cpu", 2, 1, 512),
    "accelerator": ("paper_gpu", "chunked_gpu", 10, 2, 8192),
}


def peak_bf16() -> float | None:
  return PEAK_BF16.get(jax.devices()[0].device_kind)


def train_section(cfg, steps: int, warmup: int, matmul_n: int) -> dict:
  rows = train_step.run(cfg, True, steps, warmup, matmul_n)
  out = {r["variant"]: r for r in rows}
  peak = peak_bf16()
  on = out["bottleneck_every_step"]
  if peak and "tokens_per_sec" in on:
    on["mfu_vs_bf16_peak"] = (on["model_flops_per_token"] * on["tokens_per_sec"]
                              / (peak * jax.device_count()))
  return out


def bf16_section(cfg) -> dict:
  """Bottleneck metrics of one batch, trunk in bfloat16 and in float32, same params and batch."""
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  state, _ = train.init_state(jax.random.key(cfg.seed), experiment.resolve(cfg, mesh))
  rng = np.random.default_rng(1)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = jax.device_put(
      {"inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
       "targets": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
       "mask": np.ones(shape, np.float32)}, sharding.batch_sharding(mesh))
  out = {}
  for dtype in ("bfloat16", "float32"):
    c = cfg.copy_and_resolve_references()
    c.model.dtype = dtype
    setup = experiment.resolve(c)
    metrics = jax.jit(lambda p, b, s=setup: train.loss_and_grads(p, b, s)[0])(state.params, batch)
    stats = metrics["stats"].metrics("")
    out[dtype] = {k: float(v) for k, v in stats.items()} | {"loss": float(metrics["loss"])}
  out["abs_diff"] = {k: abs(out["bfloat16"][k] - out["float32"][k]) for k in out["float32"]}
  return out


@jax.jit(static_argnums=(2, 3))
def _forward(params, tokens, cfg, hc):
  h = model.hidden(params, tokens, cfg)
  return h, heads.logits(heads.params_of(params, hc), h, hc)


def hf_parity_section() -> dict:
  """Max |Δ| of our hidden states and logits against transformers', per family."""
  out = {}
  for path in sorted(p for p in FIXTURES.iterdir() if (p / "reference.npz").is_file()):
    cfg, params = hf.load_checkpoint(path, "float32")
    ref = np.load(path / "reference.npz")
    hc = default_head(cfg)
    row = {}
    for precision in ("default", "highest"):
      with jax.default_matmul_precision(precision):
        h, z = _forward(params, ref["tokens"], cfg, hc)
      row[f"hidden_max_abs_{precision}"] = float(np.max(np.abs(np.asarray(h) - ref["hidden"])))
      row[f"logits_max_abs_{precision}"] = float(np.max(np.abs(np.asarray(z) - ref["logits"])))
    out[path.name] = row
  return out


def run(preset: str = "auto", only: list[str] | None = None) -> dict:
  """The battery's JSON; `only` names a subset of the sections."""
  if preset == "auto":
    preset = "cpu" if jax.default_backend() == "cpu" else "accelerator"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} (known: auto, {', '.join(PRESETS)})")
  train_name, head_name, steps, warmup, matmul_n = PRESETS[preset]
  t = time.perf_counter()
  d = jax.devices()[0]
  result = {"preset": preset, "date": datetime.date.today().isoformat(),
            "device": f"{jax.device_count()}× {d.device_kind} ({d.platform})",
            "peak_bf16_flops_per_device": peak_bf16()}
  train_cfg = configs.get_config(train_name)
  sections = {
      "train": lambda: train_section(train_cfg, steps, warmup, matmul_n),
      "head": lambda: {r["variant"]: r for r in train_step.run(configs.get_config(head_name),
                                                               True, steps, warmup, matmul_n)},
      "bf16": lambda: bf16_section(train_cfg),
      "hf_parity": hf_parity_section,
  }
  result["section_seconds"] = {}
  for name in only or sections:
    t0 = time.perf_counter()
    result[name] = sections[name]()
    result["section_seconds"][name] = time.perf_counter() - t0
  result["seconds"] = time.perf_counter() - t
  return result


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  result = run(f.preset, f.sections)
  text = json.dumps(result, indent=1)
  pathlib.Path(f.out).write_text(text)
  print(text)


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("preset", "auto", "auto | cpu | accelerator")
  flags.DEFINE_string("out", "accelerator.json", "Where the JSON goes.")
  flags.DEFINE_list("sections", None, "Only these sections (train, head, bf16, hf_parity).")
  app.run(main)
