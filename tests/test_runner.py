"""The runner on real files: exact resume, signals, corrupt checkpoints, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from conftest import tiny_config

from lmhead_jax import checkpoint, runner, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spam_config(steps, every=0, **train_kw):
  cfg = tiny_config()
  cfg.train.update(steps=steps, log_every=1, eval_every=0, eval_batches=1, **train_kw)
  cfg.checkpoint.update(every=every, keep=5)
  return cfg


def losses(workdir):
  """step -> loss, the last record of each step winning (as on resume)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r["loss"]
  return out


def test_resume_is_bitwise_exact(tmp_path):
  k = 4
  runner.run(spam_config(2 * k, every=k), tmp_path / "straight")
  runner.run(spam_config(k, every=k), tmp_path / "resumed")
  runner.run(spam_config(2 * k, every=k), tmp_path / "resumed")
  a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(b) == list(range(1, 2 * k + 1))
  for step in range(k + 1, 2 * k + 1):
    assert a[step] == b[step], (step, a[step], b[step])
  summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
  assert summary["steps"] == 2 * k and "bottleneck/destroyed_ratio" in summary


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  cfg = spam_config(6, every=3)
  runner.run(cfg, tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  for f in (ckpt_dir / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  restored_state, step = restore(cfg, ckpt_dir)
  assert step == 3
  assert int(restored_state.step) == 3
  assert "cannot be restored" in caplog.text


def restore(cfg, ckpt_dir):
  """(state, step) of the newest loadable checkpoint, as the runner would restore it."""
  state, shardings = train.init_state(jax.random.key(0), cfg, sharding.make_mesh())
  ckpt = checkpoint.Checkpointer(ckpt_dir, every=0, keep=5)
  try:
    return ckpt.restore_latest(checkpoint.abstract_like(state, shardings))
  finally:
    ckpt.close()


def test_workdir_with_other_shapes_is_refused(tmp_path):
  runner.run(spam_config(2), tmp_path)
  cfg = spam_config(2)
  cfg.model.d_model = 64
  with pytest.raises(ValueError, match="model.d_model=32.*model.d_model=64"):
    runner.run(cfg, tmp_path)


def test_nonfinite_stops_with_step_and_metric(tmp_path):
  cfg = spam_config(5, every=1)
  cfg.optimizer.learning_rate = float("nan")
  with pytest.raises(FloatingPointError, match="non-finite loss, grad_norm at step 2"):
    runner.run(cfg, tmp_path)
  assert losses(tmp_path)[1] > 0  # step 1's metrics were written before the stop


def cli(workdir, *overrides, env=None, **kw):
  cmd = [sys.executable, "-m", "experiments.spamlang",
         f"--config={ROOT}/experiments/spamlang.py:smoke", f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, **(env or {})), **kw)


@pytest.mark.parametrize("override,needle", [("--config.model.d_modell=3", "d_modell"),
                                             ("--config.train.steps=abc", "train.steps")])
def test_bad_override_names_the_key(tmp_path, override, needle):
  out, err = cli(tmp_path, override).communicate(timeout=120)
  assert needle in err


def test_sigterm_leaves_checkpoint_at_last_step(tmp_path):
  proc = cli(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1",
             "--config.checkpoint.every=1000")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  last = max(losses(tmp_path))
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", every=0, keep=3)
  assert ckpt.steps()[-1] == last
  ckpt.close()


def test_sigkill_during_async_save_restores_previous(tmp_path, caplog):
  # Big enough that every save is still in flight when the next step is done.
  over = ["--config.model.vocab_size=16384", "--config.model.d_model=128",
          "--config.train.steps=100000", "--config.checkpoint.every=1",
          "--config.checkpoint.keep=2", "--config.train.bottleneck_every=0"]
  proc = cli(tmp_path, *over)
  ckpt_dir = tmp_path / "checkpoints"
  deadline, caught = time.time() + 180, False
  while time.time() < deadline:
    names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.exists() else []
    if any("tmp" in n for n in names) and any(n.isdigit() for n in names):
      proc.kill()
      caught = True
      break
    time.sleep(0.001)
  proc.communicate(timeout=60)
  assert caught, "no save was ever seen in flight"
  names = [p.name for p in ckpt_dir.iterdir()]
  if not any("tmp" in n for n in names):
    pytest.skip(f"the in-flight save finished before SIGKILL landed: {names}")
  complete = sorted(int(n) for n in names if n.isdigit())
  sys.path.insert(0, ROOT)
  from experiments.spamlang import get_config
  cfg = get_config("smoke")
  cfg.model.update(vocab_size=16384, d_model=128)
  _, step = restore(cfg, ckpt_dir)
  assert step == complete[-1]
  assert "incomplete checkpoint" in caplog.text


def test_eval_off_the_log_grid_is_logged_and_finished_run_resumes_to_summary(tmp_path):
  cfg = spam_config(4, every=4)
  cfg.train.update(log_every=4, eval_every=3, eval_batches=1)
  runner.run(cfg, tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert "eval/loss" in records[3]
  again = runner.run(cfg, tmp_path)  # nothing left to train
  assert again["loss"] == records[4]["loss"]


def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runner.run(spam_config(2, every=1), "runs/rel")
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()
