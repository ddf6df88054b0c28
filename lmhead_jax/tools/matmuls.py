"""Matmul FLOPs of a compiled program read from its HLO text, with loops counted per trip.

XLA's cost_analysis counts a while loop's body once (one layer, one micro-batch, one token
chunk). `flops(compiled.as_text())` walks the same HLO as `collectives` and counts every `dot`
and `convolution` (XLA:TPU writes matmuls as convolutions) as 2 · |output| · |contraction| (÷ a
convolution's feature groups), inside fusions too, times the trips of the loops that hold it. A
convolution's window counts only the taps that land on input elements, not on padding or the
holes of a dilated input: XLA:TPU writes attention's batched matmuls as convolutions whose
batch dims are 16×8 windows over a 16×8-dilated input, one real tap each. Elementwise work is
not counted: this is the MXU's work, the roofline's compute. Not seen: matmuls in custom calls
(XLA:GPU's cuBLAS and cuDNN calls, so GPU rows count ≈ 0) and a convolution's batch groups.
"""

import math
import re

import numpy as np

from lmhead_jax.tools import collectives

_SHAPE = re.compile(r"\[([\d,]*)\]")


def dims(hlo_type: str) -> list[int]:
  """The dimensions of an array type, `f32[512,8192]{1,0}` → [512, 8192]."""
  m = _SHAPE.search(hlo_type)
  return [int(x) for x in m[1].split(",") if x] if m else []


def matmul(module: collectives.Module, ins: collectives.Instruction) -> dict[str, float]:
  """{"flops": …} of one dot or convolution; {} for any other instruction."""
  if ins.opcode not in ("dot", "convolution"):
    return {}
  lhs, rhs = (dims(t) for t in module.operand_types(ins)[:2])
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    contracted = math.prod(lhs[int(i)] for i in m[1].split(",") if i) if m else 1
    return {"flops": 2.0 * math.prod(dims(ins.type)) * contracted}
  # dim_labels=bf_oi->bf: the lhs 'f' is contracted, and the window over the spatial digits
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
  lhs_at, rhs_at, out_at = ({c: k for k, c in enumerate(x)} for x in labels)
  out, spatial = dims(ins.type), [str(i) for i in range(len(labels[0]) - 2)]
  groups = re.search(r"feature_group_count=(\d+)", ins.attrs)
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  taps = math.prod(_taps(window[1] if window else "", int(i), lhs[lhs_at[i]], rhs[rhs_at[i]],
                         out[out_at[i]]) for i in spatial)
  others = math.prod(out) // math.prod(out[out_at[i]] for i in spatial)  # the non-spatial dims
  return {"flops": 2.0 * (others * taps * lhs[lhs_at["f"]] // (int(groups[1]) if groups else 1))}


def _taps(window: str, i: int, n: int, size: int, outs: int) -> int:
  """Σ over the `outs` outputs of spatial dim i of the window taps (`size` of them) that land
  on one of its n input elements (window: `size=… stride=… pad=lo_hi… lhs_dilate=…`)."""
  def field(name, default):
    m = re.search(rf"\b{name}=([-\dx_]+)", window)
    return m[1].split("x")[i] if m else default
  stride, base, dilate = (int(field(k, "1")) for k in ("stride", "lhs_dilate", "rhs_dilate"))
  low = int(field("pad", "0_0").split("_")[0])
  j = np.arange(outs)[:, None] * stride + np.arange(size)[None, :] * dilate - low
  return int(np.sum((j >= 0) & (j <= (n - 1) * base) & (j % base == 0)))


def flops(hlo_text: str) -> float:
  """Matmul FLOPs per device of one run of a compiled program (module docstring)."""
  module = collectives.Module(hlo_text)
  return module.total(module.entry, matmul).get("flops", 0.0)
