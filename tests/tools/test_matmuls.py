"""Matmul FLOPs from HLO text: dots and convolutions, in fusions and loops, against the analytic
count, on programs compiled by XLA:CPU and on XLA:TPU's convolution form."""

import jax
import jax.numpy as jnp
import numpy as np

from lmhead_jax.tools import matmuls


def test_a_dot_in_a_loop_counts_once_per_trip():
  """5 trips of x @ a (8×16 · 16×32) and one b @ c (4×6 · 6×3) outside: XLA's cost_analysis
  counts the loop's dot once, the walk counts it 5 times."""
  def f(x, a, b, c):
    y, _ = jax.lax.scan(lambda y, _: (jnp.tanh(y @ a) @ a.T, None), x, length=5)
    return y, b @ c
  args = [np.ones(s, np.float32) for s in ((8, 16), (16, 32), (4, 6), (6, 3))]
  compiled = jax.jit(f).lower(*args).compile()
  want = 5 * 2 * (2 * 8 * 16 * 32) + 2 * 4 * 6 * 3
  assert matmuls.flops(compiled.as_text()) == want
  assert compiled.cost_analysis()["flops"] < want  # the reason for the walk


def test_a_convolution_counts_the_taps_on_its_input():
  """NHWC 1×10×10×3 by a 3×3×3×8 kernel, 'SAME': per spatial dim 10 outputs × 3 taps, less the
  2 that fall on the padding, so 2 · 8 · 3 · 28²."""
  x, k = np.ones((1, 10, 10, 3), np.float32), np.ones((3, 3, 3, 8), np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  text = jax.jit(conv).lower(x, k).compile().as_text()
  assert matmuls.flops(text) == 2 * 8 * 3 * 28 * 28
  # 3 feature groups: each of the 6 output channels reads 2 of the 6 input channels
  x, k = np.ones((1, 10, 10, 6), np.float32), np.ones((3, 3, 2, 6), np.float32)
  grouped = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
  text = jax.jit(grouped).lower(x, k).compile().as_text()
  assert matmuls.flops(text) == 2 * 6 * 2 * 28 * 28
  # 'VALID' with a stride and a dilated kernel: every tap lands on the input
  strided = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 2), "VALID", rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, k = np.ones((1, 10, 10, 3), np.float32), np.ones((3, 3, 3, 8), np.float32)
  text = jax.jit(strided).lower(x, k).compile().as_text()
  assert matmuls.flops(text) == 2 * (3 * 3 * 8) * 3 * 9  # 3×3 outputs of 8, 3·9 taps each


TPU_CONVOLUTION = """HloModule jit_f, num_partitions=1

%fused (p0: bf16[512,256], p1: bf16[8192,256]) -> f32[512,8192] {
  %p0 = bf16[512,256]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[8192,256]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.5 = f32[512,8192]{1,0:T(8,128)} convolution(%p0, %p1), dim_labels=bf_oi->bf
}

ENTRY %main (h: bf16[512,256], w: bf16[8192,256]) -> f32[512,8192] {
  %h = bf16[512,256]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[8192,256]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %fusion = f32[512,8192]{1,0:T(8,128)} fusion(%h, %w), kind=kOutput, calls=%fused
}
"""


def test_xla_tpus_matmul_as_a_convolution_in_a_fusion():
  """h Wᵀ as XLA:TPU prints it: a dot-like convolution (no spatial dims) inside a fusion."""
  assert matmuls.dims("f32[512,8192]{1,0:T(8,128)}") == [512, 8192]
  assert matmuls.flops(TPU_CONVOLUTION) == 2 * 512 * 8192 * 256


TPU_ATTENTION = """HloModule jit_f, num_partitions=1

ENTRY %main (q: bf16[16,2048,8,4,128], k: bf16[16,2048,8,128,1]) -> f32[16,8,2048,4,2048] {
  %q = bf16[16,2048,8,4,128]{4,3,2,1,0:T(8,128)(2,1)} parameter(0)
  %k = bf16[16,2048,8,128,1]{4,3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution-base-dilated.36 = f32[16,8,2048,4,2048]{2,4,3,1,0:T(8,128)} convolution(%q, %k), window={size=16x8x1 stride=15x7x1 lhs_dilate=16x8x1}, dim_labels=0b12f_0o1i2->01b2f
}
"""


def test_xla_tpus_attention_scores_as_a_base_dilated_convolution():
  """Q Kᵀ of 16 sequences × 8 kv heads × 4 query heads each, T = S = 2048, head 128, as XLA:TPU
  writes it (the rank sweep's paper step): the batch dims are 16×8 windows over a 16×8-dilated
  input with one real tap each, so 2·B·N·T·S·H, not 128× that."""
  assert matmuls.flops(TPU_ATTENTION) == 2 * 16 * 8 * 4 * 2048 * 2048 * 128


NEGATIVE_PAD = """HloModule jit_f, num_partitions=1

ENTRY %main (x: f32[1,10,1], k: f32[3,1,1]) -> f32[1,8,1] {
  %x = f32[1,10,1]{2,1,0} parameter(0)
  %k = f32[3,1,1]{2,1,0} parameter(1)
  ROOT %c = f32[1,8,1]{2,1,0} convolution(%x, %k), window={size=3 pad=-1_1}, dim_labels=b0f_0io->b0f
}
"""


def test_a_negative_pad_crops_the_input():
  """pad=-1_1 drops the first of 10 inputs and adds a zero: output o reads inputs o+1..o+3, of
  which only the last output's third tap is padding, so 8·3 − 1 = 23 taps."""
  assert matmuls.flops(NEGATIVE_PAD) == 2 * 23
  two_dims = NEGATIVE_PAD.replace("f32[1,10,1]", "f32[1,10,10,1]").replace(
      "f32[3,1,1]", "f32[3,3,1,1]").replace("f32[1,8,1]", "f32[1,8,8,1]").replace(
      "{2,1,0}", "{3,2,1,0}").replace("size=3 pad=-1_1", "size=3x3 pad=-1_1x0_0").replace(
      "b0f_0io->b0f", "b01f_01io->b01f")
  assert matmuls.flops(two_dims) == 2 * 23 * 24  # 8 outputs × 3 taps, all on the input
