"""The range map of W afresh against refined from an earlier one, by the compiler's counts.

  python -m benchmarks.range_map [--vocab=49152] [--d_model=512,1024,4096] [--compile=v5p-8]

W float32[V, D] sharded over V on every device of the slice (`--compile`: libtpu's or the CUDA
plugin's compiler, no device needed; default: this machine's devices), the map replicated.
Per D, one JSON line: for `afresh` (`bottleneck.range_map`, as lowered for that platform: the
Gram path on TPU) and `refined` (`bottleneck.refine_range_map`), XLA's FLOPs and bytes accessed
per device (loop bodies once: lower bounds), its temporaries and the compile seconds.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lmhead_jax.core import bottleneck


def compile_both(devices, v: int, d: int) -> dict:
  mesh = jax.sharding.Mesh(devices, ("v",))
  w = jax.ShapeDtypeStruct((v, d), jnp.float32, sharding=NamedSharding(mesh, P("v", None)))
  m = jax.ShapeDtypeStruct((d, min(v, d)), jnp.float32, sharding=NamedSharding(mesh, P()))
  programs = {"afresh": (bottleneck.range_map, (w,)),
              "refined": (bottleneck.refine_range_map, (w, m))}
  out = {}
  for name, (fn, args) in programs.items():
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    out[name] = {"gflop": round(cost["flops"] / 1e9, 2),
                 "gb_accessed": round(cost["bytes accessed"] / 1e9, 3),
                 "temp_gb": round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 3),
                 "compile_s": round(time.perf_counter() - t, 1)}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vocab", type=int, default=49152, help="V (the rank sweep's)")
  parser.add_argument("--d_model", default="512,1024,4096", help="comma-separated D")
  parser.add_argument("--compile", metavar="SLICE", default=None,
                      help="compile for this slice's chips (e.g. v5p-8) instead of this machine's")
  args = parser.parse_args(argv)
  if args.compile:
    from lmhead_jax.tools import aot
    devices, where = aot.topology_devices(args.compile), args.compile
  else:
    devices, where = jax.devices(), jax.devices()[0].device_kind
  for d in map(int, args.d_model.split(",")):
    print(json.dumps({"V": args.vocab, "D": d, "devices": len(devices), "on": where,
                      **compile_both(devices, args.vocab, d)}), flush=True)


if __name__ == "__main__":
  main()
