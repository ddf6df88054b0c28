"""The runner on real files: exact resume, signals, corrupt checkpoints, bad configs."""

import json
import os
import signal
import subprocess
import sys
import shutil
import time

import jax
import numpy as np
import pytest
import helpers
from helpers import tiny_config

from lmhead_jax.data.tokens import write_token_dir
from lmhead_jax.runs import checkpoint, experiment, runner
from lmhead_jax.training import sharding, train

ROOT = str(helpers.ROOT)


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


@pytest.mark.slow  # test_checkpoint's flipped-bytes test checks the fallback without a runner
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
  assert "step 6" in caplog.text and "is corrupt" in caplog.text


def restore(cfg, ckpt_dir):
  """(state, step) of the newest loadable checkpoint, as the runner would restore it."""
  state, shardings = train.init_state(jax.random.key(0), experiment.resolve(cfg, sharding.make_mesh()))
  ckpt = checkpoint.Checkpointer(ckpt_dir, every=0, keep=5)
  try:
    return ckpt.restore_latest(sharding.abstract_like(state, shardings))
  finally:
    ckpt.close()


def fast_config(steps, every=0, **model):
  """spam_config without bottleneck metrics or evals: one train step to compile."""
  cfg = spam_config(steps, every, bottleneck_every=0)
  cfg.train.eval_batches = 0
  cfg.model.update(model)
  return cfg


def test_workdir_with_other_architecture_is_refused_before_training(tmp_path):
  runner.run(fast_config(2, every=2), tmp_path)
  before = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(ValueError, match=r"params\.layers\.mlp\.w_gate.*model\.mlp_act: 'swiglu' -> 'gelu'"):
    runner.run(fast_config(4, every=2, mlp_act="gelu"), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == before
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_resume_with_changes_warns_records_history_and_refuses_a_moved_data_stream(
    tmp_path, caplog):
  runner.run(fast_config(2, every=2), tmp_path)
  cfg = fast_config(3, every=2)
  cfg.optimizer.learning_rate = 3e-4
  runner.run(cfg, tmp_path)
  assert "optimizer.learning_rate: 0.001 -> 0.0003" in caplog.text
  assert "train.steps: 2 -> 3" in caplog.text
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["optimizer"]["learning_rate"] == 3e-4
  first, second = saved["history"]
  assert first["step"] == 0 and "changed" not in first
  assert second["step"] == 2
  assert second["changed"] == {"optimizer.learning_rate": [1e-3, 3e-4], "train.steps": [2, 3]}
  env = second["environment"]
  for key in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "python", "backend",
              "device_kind", "git_commit"):
    assert env[key], key
  cfg.train.update(steps=4, batch_size=16)
  with pytest.raises(ValueError, match=r"train\.batch_size changed .*data-iterator position"):
    runner.run(cfg, tmp_path)
  assert max(losses(tmp_path)) == 3


def test_unrestorable_workdir_never_restarts_from_step_0(tmp_path):
  runner.run(fast_config(2, every=1), tmp_path)
  records = (tmp_path / "metrics.jsonl").read_text()
  for f in (tmp_path / "checkpoints").rglob("*"):
    if f.is_file() and "state" in f.parts:
      f.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=r"steps \[1, 2\].*new --workdir"):
    runner.run(fast_config(4, every=1), tmp_path)
  shutil.rmtree(tmp_path / "checkpoints")
  with pytest.raises(RuntimeError, match=r"metrics.jsonl holds 2 records up to step 2.*--workdir"):
    runner.run(fast_config(4, every=1), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == records


def test_second_run_on_a_workdir_is_refused_and_a_killed_holder_frees_it(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "from lmhead_jax.runs import runner; from etils import epath; "
       f"runner._lock(epath.Path({str(tmp_path)!r})); print('locked', flush=True); "
       "import time; time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(RuntimeError, match=rf"in use by another run \(host .* pid {holder.pid}\)"):
    runner.run(fast_config(2), tmp_path)
  holder.kill()
  holder.wait(timeout=60)
  os.close(runner._lock(tmp_path))


# A non-finite learning rate is refused by the config checks: a huge one overflows instead.
@pytest.mark.parametrize("over,needle", [
    (dict(learning_rate=1e20, warmup_steps=4), "non-finite update_norm at step 2"),
])
def test_nonfinite_step_is_never_saved(tmp_path, over, needle):
  cfg = fast_config(8, every=1)
  cfg.checkpoint.keep = 2
  cfg.optimizer.update(over)
  with pytest.raises(FloatingPointError, match=needle) as e:
    runner.run(cfg, tmp_path)
  bad = int(str(e.value).split(" at step ")[1].split()[0])
  kept = checkpoint.Checkpointer(tmp_path / "checkpoints", every=0, keep=2).steps()
  assert kept and max(kept) == bad - 1 and f"last checkpoint kept: [{bad - 1}]" in str(e.value)
  assert max(losses(tmp_path)) == bad - 1
  state, step = restore(cfg, tmp_path / "checkpoints")  # verified against its checksum
  assert step == bad - 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_bad_eval_setup_is_refused_before_step_1(tmp_path):
  cfg = fast_config(2)
  cfg.train.update(eval_every=1, eval_batches=0)
  with pytest.raises(ValueError, match="train.eval_batches=0 must be >= 1"):
    runner.run(cfg, tmp_path / "a")
  write_token_dir(tmp_path / "tok", [np.arange(4096) % 256], vocab_size=256, tokenizer="none")
  cfg = fast_config(2)
  cfg.data.update(kind="tokens", path=str(tmp_path / "tok"), eval_path=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match=f"data.eval_path='{tmp_path / 'nope'}' is not a token directory"):
    runner.run(cfg, tmp_path / "b")
  assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
  code = f"""
import os, signal, sys
sys.path[:0] = [{os.path.join(ROOT, "tests")!r}, {os.path.join(ROOT, "tests", "runs")!r}]
import test_runner
from lmhead_jax.runs import runner
from lmhead_jax.training import train
init_state = train.init_state
def init_and_sigterm(*a, **k):
  os.kill(os.getpid(), signal.SIGTERM)
  return init_state(*a, **k)
train.init_state = init_and_sigterm
runner.run(test_runner.fast_config(2), {str(tmp_path)!r})
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "SIGTERM during start-up" in proc.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_leaves_checkpoint_at_last_step(tmp_path, sig):
  proc = cli(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1",
             "--config.checkpoint.every=1000")
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
    time.sleep(0.2)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert f"{sig.name}: saved step" in err and "KeyboardInterrupt" not in err
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


@pytest.mark.slow
def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runner.run(spam_config(2, every=1), "runs/rel")
  assert (tmp_path / "runs" / "rel" / "checkpoints" / "2").is_dir()


def test_final_save_that_fails_writes_no_summary_and_the_repeat_starts_over(tmp_path):
  """A real process whose files may not outgrow 16 KB: the final async save fails."""
  code = f"""
import resource, signal, sys
sys.path[:0] = [{os.path.join(ROOT, "tests")!r}, {os.path.join(ROOT, "tests", "runs")!r}]
import test_runner
from lmhead_jax.runs import runner
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
runner.run(test_runner.fast_config(2), {str(tmp_path)!r})
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert "checkpoint step 2" in proc.stderr and "failed to save" in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "summary.json").exists()
  assert max(losses(tmp_path)) == 2
  # No checkpoint ever committed: the repeat starts over, the old records set aside.
  summary = runner.run(fast_config(2), tmp_path)
  assert summary["steps"] == 2 and (tmp_path / "summary.json").exists()
  aside = list(tmp_path.glob("metrics.jsonl.before-restart-*"))
  assert len(aside) == 1 and len(aside[0].read_text().splitlines()) == 2
  assert sorted(losses(tmp_path)) == [1, 2] and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_fewer_steps_than_the_checkpoint_is_refused_and_keeps_it(tmp_path):
  runner.run(fast_config(4, every=2), tmp_path)
  with pytest.raises(ValueError, match=r"checkpoint is at step 4, beyond train.steps=2"):
    runner.run(fast_config(2, every=2), tmp_path)
  assert checkpoint.Checkpointer(tmp_path / "checkpoints", every=0, keep=5).steps() == [2, 4]
  assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4


def test_resume_refuses_missing_config_and_changed_token_data(tmp_path):
  tok = tmp_path / "tok"
  write_token_dir(tok, [np.arange(4096) % 256], vocab_size=256, tokenizer="none")
  cfg = fast_config(2, every=2)
  cfg.data.update(kind="tokens", path=str(tok))
  runner.run(cfg, tmp_path / "w")
  cfg.train.steps = 4
  write_token_dir(tok, [(np.arange(4096) * 7) % 256], vocab_size=256, tokenizer="none")
  with pytest.raises(ValueError, match=r"token data of data.path changed"):
    runner.run(cfg, tmp_path / "w")
  (tmp_path / "w" / "config.json").unlink()
  with pytest.raises(ValueError, match=r"holds checkpoints \(steps \[2\]\) but no config.json"):
    runner.run(cfg, tmp_path / "w")


@pytest.mark.parametrize("text,needle", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "is not a run's config"),
    ('{"seed": 0, "history": "oops"}', "is not a run's config"),
])
def test_garbage_config_json_is_refused_naming_the_file(tmp_path, text, needle):
  runner.run(fast_config(2, every=2), tmp_path)
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} {needle}"):
    runner.run(fast_config(4, every=2), tmp_path)


@pytest.mark.parametrize("name,lr,action,needle", [
    ("adamw", 10.0, "stop", r"step 4: loss \S+ has been above train.divergence_factor=3"),
    ("sgd", 1000.0, "stop", r"step 4: loss 5.545\d* has sat at ln\(model.vocab_size=256\)"),
    ("adamw", 10.0, "warn", None),
])
def test_divergence_without_nan_is_flagged(tmp_path, caplog, name, lr, action, needle):
  cfg = fast_config(6, every=2)
  cfg.optimizer.update(name=name, learning_rate=lr)
  cfg.train.update(divergence_patience=3, divergence_action=action)
  if action == "stop":
    with pytest.raises(FloatingPointError, match=r"diverging \(train.divergence_action='stop'\): "
                       + needle):
      runner.run(cfg, tmp_path)
    assert max(losses(tmp_path)) == 3 and not (tmp_path / "summary.json").exists()
  else:
    assert runner.run(cfg, tmp_path)["steps"] == 6
    assert caplog.text.count("diverging: step 4: loss") == 1  # once per episode


def test_realized_cosine_has_its_own_cadence(tmp_path):
  cfg = spam_config(5)
  cfg.train.realized_cosine_every = 2
  runner.run(cfg, tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert [s for s in sorted(records) if "bottleneck/realized_cosine" in records[s]] == [2, 4, 5]
  assert all("bottleneck/destroyed_ratio" in r for r in records.values())


def test_metric_steps_refine_the_last_range_map(tmp_path):
  """The first metric step computes W's range map afresh (drift 0); the next ones refine the
  map of the one before the last (the runner reads a step's metrics while the next one runs)."""
  runner.run(spam_config(5), tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  drift = [records[s]["bottleneck/range_map_drift"] for s in sorted(records)]
  assert drift[:2] == [0.0, 0.0] and all(d > 0 for d in drift[2:]), drift
  assert {records[s]["bottleneck/head_rank"] for s in records} == {32.0}
