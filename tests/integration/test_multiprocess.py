"""Real multi-process runs: `jax.distributed` on localhost, 2 processes × 4 CPU devices."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cpu_env, free_port

OVERRIDES = ["--config.train.steps=5", "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.train.eval_batches=0", "--config.checkpoint.every=0",
             "--config.mesh.data=4", "--config.mesh.fsdp=2"]


def launch(workdir, devices, *flags):
  cmd = [sys.executable, "-m", "experiments.spamlang",
         f"--config={ROOT}/experiments/spamlang.py:smoke", f"--workdir={workdir}",
         *OVERRIDES, *flags]
  return subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_processes_equal_one(tmp_path):
  single = launch(tmp_path / "one", 8)
  port = free_port()
  multi = [launch(tmp_path / "two", 4, f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  for p in [single, *multi]:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert len(one) == len(two) == 5
  for a, b in zip(one, two):
    assert abs(a - b) <= 1e-5 * abs(a), (one, two)


def test_missing_process_fails_fast(tmp_path):
  start = time.time()
  p = launch(tmp_path, 4, f"--coordinator_address=localhost:{free_port()}", "--num_processes=2",
             "--process_id=0", "--distributed_timeout=5")
  _, err = p.communicate(timeout=120)
  assert p.returncode != 0
  assert time.time() - start < 60
  assert "not all 2 processes joined" in err


@pytest.mark.slow  # test_two_processes_equal_one covers it end to end
def test_global_batch_across_processes():
  """2 processes × 2 devices (tests/multidevice checks 1 process × 4)."""
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "tests/global_batch_check.py", str(port), str(p), "2"],
                            cwd=ROOT, env=cpu_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = [[0, 2], [4, 6]]
  assert [o.split("\n")[0] for o, _ in outs] == [f"ok {p} {rows[p]}" for p in range(2)]
