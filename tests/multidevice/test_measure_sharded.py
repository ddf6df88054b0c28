"""A sharded measurement of a real checkpoint against transformers' logits."""

import jax
import numpy as np

from helpers import FIXTURES, reference_stats
from lmhead_jax.runs import measurement
from lmhead_jax.analysis import measure
from lmhead_jax.training import sharding


def test_checkpoint_on_eight_devices():
  """A sharded (data 4 × fsdp 2) measurement of the llama fixture, against transformers' logits
  (each reference sequence 4 times: the Frobenius ratios do not change)."""
  cfg = measurement.base_config()
  cfg.checkpoints = str(FIXTURES / "llama")
  mesh = sharding.make_mesh(data=4, fsdp=2)
  s = next(measurement.load(cfg, "/nonexistent", mesh))
  tokens = np.repeat(np.load(FIXTURES / "llama" / "reference.npz")["tokens"], 4, axis=0)
  class Src:
    seq_len = 15
    def __len__(self): return 8
    def __getitem__(self, i):
      return {"inputs": tokens[i, :-1], "targets": tokens[i, 1:],
              "mask": np.ones(15, np.float32)}
  r = measure.measure(s, Src(), mesh, batch_size=8, num_sequences=8, chunk_len=5)
  assert len(jax.devices()) == 8 and "fsdp" in str(s.params["head"]["w_VxD"].sharding.spec)
  want_cos, want_loss = reference_stats("llama")
  np.testing.assert_allclose(r["visible_cosine"]["mean"], want_cos, rtol=1e-4)
  np.testing.assert_allclose(r["loss"]["mean"], want_loss, rtol=1e-4)
