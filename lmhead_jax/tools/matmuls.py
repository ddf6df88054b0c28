"""Matmul FLOPs of a compiled program read from its HLO text, with loops counted per trip.

XLA's cost_analysis counts a while loop's body once (one layer, one micro-batch, one token
chunk). `flops(compiled.as_text())` walks the same HLO as `collectives` and counts every `dot`
and `convolution` (XLA:TPU writes matmuls as convolutions) as 2 · |output| · |contraction| (×
the kernel's window for a true convolution, ÷ its feature groups), inside fusions too, times the
trips of the loops that hold it. Elementwise work is not counted: this is the MXU's work, the
roofline's compute. Not seen: matmuls in custom calls (XLA:GPU's cuBLAS and cuDNN calls, so GPU
rows count ≈ 0) and a convolution's batch groups.
"""

import math
import re

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
  else:  # dim_labels=bf_oi->bf: the lhs 'f' is contracted, and the rhs's spatial digits
    lhs_labels, rhs_labels, _ = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
    window = math.prod(n for label, n in zip(rhs_labels, rhs) if label.isdigit())
    groups = re.search(r"feature_group_count=(\d+)", ins.attrs)
    contracted = lhs[lhs_labels.index("f")] * window // (int(groups[1]) if groups else 1)
  return {"flops": 2.0 * math.prod(dims(ins.type)) * contracted}


def flops(hlo_text: str) -> float:
  """Matmul FLOPs per device of one run of a compiled program (module docstring)."""
  module = collectives.Module(hlo_text)
  return module.total(module.entry, matmul).get("flops", 0.0)
