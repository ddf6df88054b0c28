"""pipeline.global_batch puts each process's rows on the right devices. Called in-process by
tests/multidevice, and run as `python tests/global_batch_check.py PORT PROCESS_ID NUM_PROCESSES`
by test_multiprocess.py."""

import sys

import jax
import numpy as np

from lmhead_jax.data.pipeline import global_batch, make_dataset
from lmhead_jax.data.spamlang import SpamLangSource


def check(nproc):
  """Checks a global batch of 8 rows on 4 devices; returns the first row of each local shard."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  src = SpamLangSource(1000, 6, seed=0)
  expected = next(iter(make_dataset(src, global_batch_size=8, seed=1, process_index=0,
                                    process_count=1)))
  local = next(iter(make_dataset(src, global_batch_size=8, seed=1)))  # jax's process index
  assert local["inputs"].shape == (8 // nproc, 6)
  batch = global_batch(local, sharding)
  for k, v in batch.items():
    assert v.shape == (8, 6) and v.sharding == sharding
    for shard in v.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[k][shard.index])
  return sorted(s.index[0].start for s in batch["inputs"].addressable_shards)


if __name__ == "__main__":
  port, pid, nproc = map(int, sys.argv[1:])
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
  print("ok", pid, check(nproc))
