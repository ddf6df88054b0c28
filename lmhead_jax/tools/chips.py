"""Accelerators a plan or compile targets: per-chip specs and slice names.

Specs per chip: bf16 peak, HBM capacity and bandwidth, and the bytes per second a chip can send
to the others, over ICI (NVLink on GPUs) and over the data-center network (DCN; for TPUs, only
between slices). Sources are beside each row of CHIPS. A GPU "slice" counts GPUs, 8 per host
(h200-64: 8 hosts); --compile=gpu compiles with XLA:GPU for that many GPUs of that kind, with no
GPU present (`aot.gpu_devices`).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  tensorcores: int  # per chip; the slice name counts TensorCores for v4 and v5p
  hbm_bytes: float
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # sent per chip over all its ICI (NVLink) links: half the bidirectional
  dcn_bytes_per_s: float | None  # sent per chip over the data-center network (None: unpublished)
  gpu: str = ""  # a GPU's device name, that of XLA:GPU's target config ("": a TPU)

  @property
  def platform(self) -> str:
    return "gpu" if self.gpu else "tpu"

  def link_bytes_per_s(self, devices: int) -> float:
    """Bytes per second a chip sends in collectives over `devices` chips of one slice: ICI on
    a TPU slice; NVLink within a GPU host, the host network (one NIC per GPU) beyond one."""
    if self.gpu and devices > GPUS_PER_HOST:
      return self.dcn_bytes_per_s
    return self.ici_bytes_per_s


GPUS_PER_HOST = 8
GB = 1e9
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB, 1,200 GB/s. ICI: 6 links (3D torus),
    # 400 Gb/s each way per link (glennklockwood.com/garden/processors/TPUv4). DCN: unknown.
    "v4": Chip(2, 32 * 2**30, 275e12, 1200 * GB, 6 * 50 * GB, None),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GB, 2,765 GB/s; "bidirectional ICI
    # bandwidth per chip 1,200 GBps"; "DCN bandwidth per chip 50 Gbps".
    "v5p": Chip(2, 95e9, 459e12, 2765 * GB, 600 * GB, 50e9 / 8),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB, 819 GB/s; "bidirectional ICI (per
    # chip) 400 GBps"; DCN 6.4 Tbps per 256-chip pod.
    "v5e": Chip(1, 16e9, 197e12, 819 * GB, 200 * GB, 6.4e12 / 8 / 256),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB, 1,640 GB/s; "bidirectional ICI (per
    # chip) 800 GBps"; 4 × 200 Gbps NICs per host of 8 chips.
    "v6e": Chip(1, 32e9, 918e12, 1640 * GB, 400 * GB, 4 * 200e9 / 8 / 8),
    # NVIDIA H100/H200 SXM datasheets (dense bf16, no sparsity): 989 TFLOP/s; 80 GB at 3.35
    # TB/s, 141 GB at 4.8 TB/s; NVLink 4, 900 GB/s bidirectional. Network: one 400 Gb/s
    # ConnectX-7 per GPU (DGX/HGX H100 and H200).
    "h100": Chip(1, 80e9, 989e12, 3350 * GB, 450 * GB, 400e9 / 8, gpu="NVIDIA H100 80GB HBM3"),
    "h200": Chip(1, 141e9, 989e12, 4800 * GB, 450 * GB, 400e9 / 8,
                 gpu="NVIDIA H200 141GB HBM3e"),
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
