"""Accelerators a plan or compile targets: per-chip specs and slice names.

Specs (per chip; bf16 peak, HBM capacity, HBM bandwidth), from Google Cloud's TPU pages
(cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, "key specifications"): v4 275 TFLOP/s, 32 GiB,
1,200 GB/s; v5e 197 TFLOP/s, 16 GB, 819 GB/s; v5p 459 TFLOP/s, 95 GB, 2,765 GB/s; v6e 918
TFLOP/s, 32 GB, 1,640 GB/s. GPUs (SXM, NVIDIA's H100 and H200 datasheets; dense bf16, without
sparsity): h100 989 TFLOP/s, 80 GB, 3,350 GB/s; h200 989 TFLOP/s, 141 GB, 4,800 GB/s. A GPU
"slice" counts GPUs, 8 per host (h200-64: 8 hosts); --compile=gpu compiles with XLA:GPU for that
many GPUs of that kind, with no GPU present (`aot.gpu_devices`).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  tensorcores: int  # per chip; the slice name counts TensorCores for v4 and v5p
  hbm_bytes: float
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  gpu: str = ""  # a GPU's device name, that of XLA:GPU's target config ("": a TPU)

  @property
  def platform(self) -> str:
    return "gpu" if self.gpu else "tpu"


CHIPS = {  # sources in the module docstring
    "v4": Chip(2, 32 * 2**30, 275e12, 1200e9),
    "v5p": Chip(2, 95e9, 459e12, 2765e9),
    "v5e": Chip(1, 16e9, 197e12, 819e9),
    "v6e": Chip(1, 32e9, 918e12, 1640e9),
    "h100": Chip(1, 80e9, 989e12, 3350e9, gpu="NVIDIA H100 80GB HBM3"),
    "h200": Chip(1, 141e9, 989e12, 4800e9, gpu="NVIDIA H200 141GB HBM3e"),
}


def parse_slice(name: str) -> tuple[str, Chip, int]:
  """'v5p-64' -> ('v5p', chip, devices); one JAX device per chip (TPU) or per GPU."""
  kind, _, n = name.replace("v5litepod", "v5e").partition("-")
  if kind not in CHIPS or not n.isdigit() or int(n) < 1:
    raise ValueError(f"unknown slice {name!r}: expected <{'|'.join(CHIPS)}>-<TPU cores or GPUs>, "
                     "e.g. v5p-64 or h200-16")
  chip = CHIPS[kind]
  if int(n) % chip.tensorcores:
    raise ValueError(f"slice {name!r}: {n} is not a multiple of {chip.tensorcores} cores per chip")
  return kind, chip, int(n) // chip.tensorcores
