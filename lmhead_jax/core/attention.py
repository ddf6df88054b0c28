"""Causal grouped-query attention by the implementation `model.attention` names:

- `xla`: `jax.nn.dot_product_attention`'s XLA path, which materializes the [B, H, L, L] scores;
- `flash`: tokamax's Pallas flash kernel for TPU (Mosaic, SplashAttention), TPU only; the
  sequence is padded at its end to the kernel's 128-row blocks, which causality makes exact;
- `cudnn`: cuDNN's fused flash attention via `jax.nn.dot_product_attention`, GPU, bf16 or f16;
- `auto`: flash on TPU, cudnn on GPU in bfloat16, xla otherwise (CPU included).

The platform is that of the mesh in context (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`),
else JAX's default backend, so that `plan --compile=tpu` on a CPU host gets the TPU kernel. XLA
cannot partition a kernel's custom call: on a mesh the kernel runs per shard in `jax.shard_map`,
the batch split over the batch axes, and the heads over `tensor` where it divides both counts.
Both kernels define a VJP only (`jax.custom_vjp`): forward mode (`jax.jvp`) through them fails.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmhead_jax.core.params import BATCH_AXES, TENSOR_AXIS

KINDS = ("xla", "flash", "cudnn", "auto")
FLASH_BLOCK = 128  # the sequence length of tokamax's TPU kernel is a multiple of this
# tokamax's fused backward keeps L / block partial float32 copies of dq (splash's
# dq_reduction_steps is not exposed): the largest of these blocks that divides L is taken, so
# L = 8192 keeps 8 copies, not the 64 of its default 128-row blocks (docs/PERFORMANCE.md).
BACKWARD_BLOCKS = (1024, 512, 256, 128)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': that of the mesh in context's devices, else JAX's default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def resolve(kind: str, on: str, dtype) -> str:
  """The implementation that `kind` runs as on platform `on` for inputs of `dtype`; a
  ValueError naming model.attention where it cannot run."""
  dtype = jnp.dtype(dtype)
  if kind not in KINDS:
    raise ValueError(f"model.attention={kind!r} is not one of {KINDS}")
  if kind == "auto":
    if on == "tpu":
      return "flash"
    return "cudnn" if on == "gpu" and dtype == jnp.bfloat16 else "xla"
  if kind == "flash" and on != "tpu":
    raise ValueError(f"model.attention='flash' (tokamax's TPU kernel) runs on TPU, not on {on}; "
                     "use 'cudnn' on GPU, or 'xla' / 'auto'")
  if kind == "cudnn" and (on != "gpu" or dtype not in (jnp.bfloat16, jnp.float16)):
    raise ValueError(f"model.attention='cudnn' runs on GPU in bfloat16 or float16, not on {on} "
                     f"in {dtype.name}; use 'xla' or 'auto'")
  return kind


def causal_attention(q_BxLxHxE: jax.Array, k_BxLxKxE: jax.Array, v_BxLxKxE: jax.Array,
                     kind: str, scale: float) -> jax.Array:
  """softmax(scale · q kᵀ, causal) v as [B, L, H, E]; query head h reads kv head h // (H/K)."""
  kind = resolve(kind, platform(), q_BxLxHxE.dtype)
  if kind == "xla":
    return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, is_causal=True,
                                        scale=scale)
  kernel = functools.partial(_flash if kind == "flash" else _cudnn, scale=scale)
  return _per_shard(kernel, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE)


def _per_shard(kernel, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE):
  """`kernel` on each device's shard of the mesh in context (on the whole arrays without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE)
  batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
  t = mesh.shape.get(TENSOR_AXIS, 1)
  heads = TENSOR_AXIS if t > 1 and q_BxLxHxE.shape[2] % t == k_BxLxKxE.shape[2] % t == 0 else None
  spec = P(batch, None, heads, None)
  return jax.shard_map(kernel, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE)


def _cudnn(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale):
  return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, is_causal=True,
                                      scale=scale, implementation="cudnn")


def _flash(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, scale):
  """tokamax's TPU flash kernel; the sequence padded at its end to whole blocks."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("model.attention='flash' (and 'auto' on TPU) needs tokamax: pip install "
                      "'lmhead-jax[flash]', or set model.attention='xla'") from None
  length = q_BxLxHxE.shape[1]
  pad = -length % FLASH_BLOCK
  if pad:  # padded keys come after every real query; padded queries are dropped
    q_BxLxHxE, k_BxLxKxE, v_BxLxKxE = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                       for x in (q_BxLxHxE, k_BxLxKxE, v_BxLxKxE))
  block = next(b for b in BACKWARD_BLOCKS if (length + pad) % b == 0)
  o_BxLxHxE = tokamax.dot_product_attention(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, is_causal=True,
                                            scale=scale, implementation=(_tpu_kernel(block),))
  return o_BxLxHxE[:, :length]


@functools.cache
def _tpu_kernel(block: int):
  """tokamax's TPU flash op, its backward tiled in `block`-row blocks, both without their check
  that this host is a TPU (`platform` chose it; `plan --compile=tpu` runs on a CPU host)."""
  import tokamax  # pylint: disable=import-outside-toplevel
  op = tokamax.ops.tpu.FlashAttention(bypass_device_check=True)
  tiles = op.vjp.config_cls(block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=min(block, 512))
  return op.replace(vjp=op.vjp.replace(bypass_device_check=True, config=tiles))
