"""Benchmark presets (ConfigDicts for benchmarks.train_step); sizes are the issue's targets.

  bottleneck_cpu  D=256, 4 layers, V=32k: cost of the bottleneck metrics on every step
  chunked_cpu     D=256, 1 layer, V=262,144, 8,192 tokens/step, chunked head (chunk 1024)
  chunked_fits_cpu  the same at 2,048 tokens/step, where the dense head still fits in memory
  mfu_cpu         D=512, 8 layers, V=32k, 8,192 tokens/step
  paper_gpu       the rank-sweep paper model: 6 layers, D=4096, V=49,152, r=4096, bf16, seq 2048
  chunked_gpu     D=2048, 2 layers, V=262,144, bf16, 8×2048 tokens/step, chunked head (chunk 4096)
  tiny_cpu, chunked_tiny_cpu  seconds-long stand-ins of paper_gpu and chunked_gpu for
                  benchmarks.accelerator's tests (D=64, V=512; D=32, V=2,048; 64 tokens)
"""

from lmhead_jax.runs.experiment import base_config


def get_config(preset: str = "bottleneck_cpu"):
  cfg = base_config()
  cfg.optimizer.update(name="adamw", learning_rate=1e-4)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  presets = {
      "bottleneck_cpu": (dict(vocab_size=32768, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                              d_ff=1024), 64, 128),
      "chunked_cpu": (dict(vocab_size=262144, d_model=256, n_layers=1, n_heads=4, n_kv_heads=4,
                           d_ff=1024), 32, 256),
      "chunked_fits_cpu": (dict(vocab_size=262144, d_model=256, n_layers=1, n_heads=4,
                                n_kv_heads=4, d_ff=1024), 8, 256),
      "mfu_cpu": (dict(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                       d_ff=2048), 32, 256),
      "paper_gpu": (dict(vocab_size=49152, d_model=4096, n_layers=6, n_heads=32, n_kv_heads=8,
                         d_ff=18432, dtype="bfloat16", remat=True), 4, 2048),
      "chunked_gpu": (dict(vocab_size=262144, d_model=2048, n_layers=2, n_heads=16,
                           n_kv_heads=8, d_ff=8192, dtype="bfloat16"), 8, 2048),
      "tiny_cpu": (dict(vocab_size=512, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                        d_ff=64, remat=True), 2, 32),
      "chunked_tiny_cpu": (dict(vocab_size=2048, d_model=32, n_layers=1, n_heads=2,
                                n_kv_heads=2, d_ff=64), 2, 32),
  }
  if preset not in presets:
    raise ValueError(f"unknown preset {preset!r} (known: {', '.join(presets)})")
  model, batch, seq = presets[preset]
  cfg.model.update(max_seq_len=max(seq, 2048), **model)
  cfg.train.update(batch_size=batch)
  cfg.data.seq_len = seq
  if preset.startswith("chunked"):
    cfg.head.chunk_size = {"chunked_gpu": 4096, "chunked_tiny_cpu": 32}.get(preset, 1024)
  if preset == "paper_gpu":
    cfg.head.update(kind="factorized", rank=4096)
  if preset == "tiny_cpu":
    cfg.head.update(kind="factorized", rank=32)
  return cfg
