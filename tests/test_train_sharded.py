"""The train step on 8 fake CPU devices equals the single-device run, on three meshes, and
with the chunked head."""

from conftest import run_with_devices

CODE = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from lmhead_jax.training import sharding, train

cfg = tiny_config()
rng = np.random.default_rng(0)
shape = (cfg.train.batch_size, cfg.data.seq_len)
batches = [{{"inputs": rng.integers(0, 256, shape).astype(np.int32),
            "targets": rng.integers(0, 256, shape).astype(np.int32),
            "mask": (rng.random(shape) > 0.2).astype(np.float32)}} for _ in range(3)]

def run(mesh, chunk_size=None):
  cfg.head.chunk_size = chunk_size
  state, _ = train.init_state(jax.random.key(0), cfg, mesh)
  step = train.make_train_step(cfg, mesh)
  out = []
  for b in batches:
    state, m = step(state, b)
    out.append({{k: float(v) for k, v in m.items()}})
  return out, state.params["layers"]["attn"]["wq"].sharding.spec

ref, _ = run(sharding.make_mesh(devices=jax.devices()[:1]))
result = {{}}
for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
  got, spec = run(sharding.make_mesh(*shape))
  worst = max(abs(g[k] - r[k]) / max(abs(r[k]), 1e-12) for g, r in zip(got, ref) for k in r)
  result[str(shape)] = {{"worst_rel": worst, "wq_spec": str(spec), "keys": sorted(got[0])}}
got, _ = run(sharding.make_mesh(2, 2, 2), chunk_size=16)
result["chunked (2, 2, 2)"] = {{
    "worst_rel": max(abs(g[k] - r[k]) / max(abs(r[k]), 1e-12) for g, r in zip(got, ref) for k in r)}}
print(json.dumps(result))
"""


def test_sharded_steps_match_single_device():
  import os
  result = run_with_devices(CODE.format(tests=os.path.dirname(__file__)))
  assert set(result) == {"(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "chunked (2, 2, 2)"}
  for mesh, r in result.items():
    assert r["worst_rel"] < 1e-5, (mesh, r)
    assert "keys" not in r or {"bottleneck/destroyed_ratio", "grad_norm"} <= set(r["keys"])
  assert "fsdp" in result["(2, 4, 1)"]["wq_spec"]
  assert "tensor" in result["(2, 2, 2)"]["wq_spec"]
