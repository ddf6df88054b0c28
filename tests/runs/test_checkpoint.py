"""Checkpointer on real orbax checkpoints: shape checks, checksums, fallback, failed saves."""

import contextlib
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import helpers
from helpers import tiny_config

from lmhead_jax.runs import checkpoint, experiment
from lmhead_jax.training import sharding

ROOT = str(helpers.ROOT)


def state_of(cfg, seed=0):
  """(state, abstract state with shardings) of a fresh run of `cfg` (eager: no compile)."""
  setup = experiment.resolve(cfg, sharding.make_mesh())
  state = setup.new_state(jax.random.key(seed))
  return state, sharding.abstract_like(state, setup.state_shardings)


def flat(state) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state))}


def flip_bytes(step_dir):
  """Flips 4 bytes in the middle of the largest data file of a saved state."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  f = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(f.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
  f.write_bytes(bytes(data))


@pytest.mark.parametrize("old,new,path", [
    (dict(), dict(mlp_act="gelu"), "params.layers.mlp.w_gate"),
    (dict(pos="learned"), dict(pos="learned", max_seq_len=32), "params.pos_embed"),
    (dict(optimizer="sgd"), dict(optimizer="sgd", momentum=0.0), "opt_state"),
])
def test_other_architecture_is_a_mismatch_naming_the_arrays(tmp_path, old, new, path):
  def cfg_of(kw):
    kw = dict(kw)
    cfg = tiny_config(**{k: v for k, v in kw.items() if k not in ("optimizer", "momentum")})
    cfg.optimizer.update(name=kw.get("optimizer", "adamw"), momentum=kw.get("momentum", 0.9))
    return cfg
  state, _ = state_of(cfg_of(old))
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=2)
  ckpt.save(1, state, force=True)
  ckpt.wait()
  with pytest.raises(checkpoint.StateMismatch, match=rf"step 1 .*{path}"):
    ckpt.restore_latest(state_of(cfg_of(new))[1])
  ckpt.close()
  assert (tmp_path / "1").is_dir()  # refused, not treated as corrupt


def test_flipped_bytes_fall_back_and_the_step_is_replaced(tmp_path, caplog):
  cfg = tiny_config()
  (a, abstract), (b, _) = state_of(cfg, 0), state_of(cfg, 1)
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  ckpt.save(1, a, force=True)
  ckpt.save(2, b, force=True)
  ckpt.close()
  flip_bytes(tmp_path / "2")
  # Ground truth: orbax itself restores the flipped step without complaint, with other values.
  raw = ocp.StandardCheckpointer().restore(tmp_path / "2" / "state", abstract)
  assert any(not np.array_equal(x, flat(b)[k]) for k, x in flat(raw).items())

  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  state, step = ckpt.restore_latest(abstract)
  assert step == 1 and all(np.array_equal(x, flat(a)[k]) for k, x in flat(state).items())
  assert "step 2" in caplog.text and "checksum mismatch" in caplog.text
  ckpt.save(2, b, force=True)  # the same step saved again replaces the corrupt one
  ckpt.close()
  caplog.clear()
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  state, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 2 and all(np.array_equal(x, flat(b)[k]) for k, x in flat(state).items())
  assert "corrupt" not in caplog.text


def test_no_restorable_checkpoint_is_an_error(tmp_path):
  state, abstract = state_of(tiny_config())
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  for step in (1, 2):
    ckpt.save(step, state, force=True)
  ckpt.close()
  for f in tmp_path.rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  with pytest.raises(checkpoint.CheckpointError, match=r"steps \[1, 2\].*none can be restored"):
    ckpt.restore_latest(abstract)
  ckpt.close()


def test_nonfinite_state_is_never_saved(tmp_path):
  state, _ = state_of(tiny_config())
  params = jax.tree.map(np.array, jax.device_get(state.params))
  params["head"]["w_VxD"][3, 1] = np.inf
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
  with pytest.raises(FloatingPointError, match=r"step 1 .*params\.head\.w_VxD"):
    ckpt.save(1, state.replace(params=params))
  ckpt.close()
  assert ckpt.steps() == []


@contextlib.contextmanager
def unwritable(path):
  """`path` refuses new entries: chmod for a user, the immutable flag for root."""
  if os.geteuid() == 0:
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
      pytest.skip("root, and chattr +i is not available")
    undo = ["chattr", "-i", str(path)]
  else:
    os.chmod(path, 0o555)
    undo = ["chmod", "755", str(path)]
  try:
    yield
  finally:
    subprocess.run(undo, check=True)


def test_failed_save_raises_at_once_naming_the_path(tmp_path):
  """A real process: orbax's background thread used to keep it alive for 300 s."""
  code = f"""
import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import jax
from helpers import tiny_config
from lmhead_jax.runs import checkpoint, experiment
from lmhead_jax.training import sharding, train
setup = experiment.resolve(tiny_config(), sharding.make_mesh())
state, _ = train.init_state(jax.random.key(0), setup)
ckpt = checkpoint.Checkpointer({str(tmp_path)!r}, every=1, keep=2)
try:
  ckpt.save(1, state)
finally:
  ckpt.close()
"""
  with unwritable(tmp_path):
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert proc.returncode != 0
  assert time.time() - t < 60
  assert f"cannot save checkpoint step 1 in {tmp_path}" in proc.stderr


def test_checksum_covers_the_iterator_state_and_the_step_number(tmp_path, caplog):
  import grain
  import shutil
  state, abstract = state_of(tiny_config())
  data_iter = iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=5)
  for step in (1, 2):
    next(data_iter)
    ckpt.save(step, state, data_iter, force=True)
  ckpt.close()
  # One changed value in step 2's iterator state (next_index 2 -> 3), and step 2 copied as 5.
  data_file = tmp_path / "2" / "data" / "process_0-of-1.json"
  assert '"next_index": 2' in data_file.read_text()
  shutil.copytree(tmp_path / "2", tmp_path / "5")
  data_file.write_text(data_file.read_text().replace('"next_index": 2', '"next_index": 3'))
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=5)
  restored, step = ckpt.restore_latest(abstract, data_iter)
  ckpt.close()
  assert step == 1 and data_iter.get_state() == {"next_index": 1}
  assert "step 5" in caplog.text and "records step 2" in caplog.text
  assert "step 2" in caplog.text and "data-iterator state" in caplog.text


def test_every_corrupt_step_is_one_short_line(tmp_path):
  state, abstract = state_of(tiny_config())
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  ckpt.save(1, state, force=True)
  ckpt.close()
  for f in tmp_path.rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=3)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert "\n" not in str(e.value) and len(str(e.value)) < 600, str(e.value)
