"""gpu/ scripts: shellcheck, --help and --dry-run wherever they stand, bad input, and a real
submission to a fake `sbatch` that runs the batch script with a fake `srun` (one task per node);
the local config check with the fake experiment and with the real ones."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (ROOT, TRICKY, assert_shellcheck_clean, fake_calls, run_script,
                     write_exe, write_fake_experiment)

GPU = ROOT / "gpu"

FAKE_SBATCH = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps(args) + "\\n")
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
script = next(i for i, a in enumerate(args) if not a.startswith("--"))
env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=opts["nodes"],
           SLURM_JOB_NODELIST="node[1-9]", SLURM_GPUS_ON_NODE=opts["gpus-per-node"],
           SLURM_CPUS_ON_NODE="16")
env.update(kv.split("=", 1) for kv in opts["export"].split(",")[1:])
with open(opts["output"].replace("%x", opts["job-name"]).replace("%j", "4242"), "w") as out:
  subprocess.run(["bash", *args[script:]], cwd=opts["chdir"], env=env, stdout=out, stderr=out)
print("4242;cluster1")
"""

FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
program = next(i for i, a in enumerate(args) if not a.startswith("--"))
json.dump(args[:program], open(os.path.join(os.environ["FAKE_OUT"], "srun.json"), "w"))
n = int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = [subprocess.Popen(args[program:], env=dict(os.environ, SLURM_PROCID=str(i), SLURM_NTASKS=str(n),
                                                   SLURM_LOCALID="0", SLURM_STEP_NODELIST="node[1-9]"))
         for i in range(n)]
sys.exit(max(t.wait() for t in tasks))
"""

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
if "--print_config" in sys.argv:  # submit.sh's check: this python runs it
  os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "devices": os.environ["JAX_LOCAL_DEVICE_IDS"]}},
          open(os.path.join(os.environ["FAKE_OUT"], f"task{{os.environ['SLURM_PROCID']}}.json"), "w"))
"""


@pytest.fixture
def env(tmp_path):
  """A fake sbatch and srun on PATH, a fake experiments dir and a fake venv."""
  write_exe(tmp_path / "bin" / "sbatch", FAKE_SBATCH)
  write_exe(tmp_path / "bin" / "srun", FAKE_SRUN)
  write_exe(tmp_path / "venv" / "bin" / "python", FAKE_PYTHON)
  write_fake_experiment(tmp_path / "experiments")
  (tmp_path / "out").mkdir()
  keep = {k: v for k, v in os.environ.items() if not k.startswith(("LMHEAD_", "SLURM_", "JAX_"))}
  return dict(keep, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
              FAKE_CALLS=str(tmp_path / "calls.jsonl"), FAKE_OUT=str(tmp_path / "out"),
              FAKE_CHECK=str(tmp_path / "check.json"),
              LMHEAD_EXPERIMENTS_DIR=str(tmp_path / "experiments"),
              LMHEAD_VENV=str(tmp_path / "venv"))


def submit(env, *args, check=True):
  return run_script(GPU / "submit.sh", *args, env=env, check=check,
                    cwd=Path(env["FAKE_OUT"]).parent)


def sbatch_argv(env, tmp, *, nodes=1, gpus=8, extra=()):
  return ["sbatch", "--parsable", f"--chdir={ROOT}", "--job-name=toy-cpu", f"--nodes={nodes}",
          f"--gpus-per-node={gpus}", f"--output={ROOT}/slurm_logs/%x-%j.out",
          f"--export=ALL,LMHEAD_VENV={env['LMHEAD_VENV']}", *extra, str(GPU / "job.sbatch")]


def test_shellcheck_is_clean():
  assert_shellcheck_clean(GPU / "submit.sh", GPU / "job.sbatch",
                          ROOT / "scripts" / "experiment_args.sh")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--nodes=2", "toy", "cpu", "/w", "--help"],
                                  ["toy", "cpu", "/w", "--config.a=1", "-h", "--dry-run"],
                                  ["--bogus", "--help"]])
def test_help_anywhere(env, args):
  proc = submit(env, *args)
  assert proc.stdout.startswith("Usage: gpu/submit.sh [options] EXPERIMENT PRESET WORKDIR")
  assert "--dry-run" in proc.stdout and "#SBATCH" not in proc.stdout and not proc.stderr
  assert fake_calls(env) == []


def test_dry_run_anywhere(env, tmp_path):
  want = [*sbatch_argv(env, tmp_path), "toy", "cpu", "/abs/w", TRICKY, "--config.a=1"]
  for args in (["--dry-run", "toy", "cpu", "/abs/w", TRICKY, "--config.a=1"],
               ["toy", "cpu", "/abs/w", TRICKY, "--dry-run", "--config.a=1"],
               ["toy", "cpu", "/abs/w", TRICKY, "--config.a=1", "--dry-run"]):
    [line] = submit(env, *args).stdout.splitlines()
    assert shlex.split(line) == want
  assert fake_calls(env) == []


def test_dry_run_options(env, tmp_path):
  proc = submit(env, "--dry-run", "--nodes", "4", "--gpus-per-node=2", "--time=1:00:00",
                "--partition=gpu", "--account=me", "--job-name=s1", "--sbatch=--qos=high",
                "--sbatch", "--exclude=n7", "--logs=logs", "--venv", "venv", "--", "toy", "cpu",
                "rel/w")
  [argv] = [shlex.split(line) for line in proc.stdout.splitlines()]
  want = sbatch_argv(env, tmp_path, nodes=4, gpus=2,
                     extra=["--time=1:00:00", "--partition=gpu", "--account=me", "--qos=high",
                            "--exclude=n7"])
  want[3], want[6] = "--job-name=s1", f"--output={tmp_path}/logs/%x-%j.out"
  assert argv == [*want, "toy", "cpu", f"{tmp_path}/rel/w"]  # relative paths: from the caller's dir
  assert fake_calls(env) == [] and not (tmp_path / "logs").exists()
  # after WORKDIR, option names are overrides for the experiment
  assert shlex.split(submit(env, "toy", "cpu", "/w", "--nodes", "--dry-run").stdout)[-1] == "--nodes"


@pytest.mark.parametrize("args,message", [
    ([], "expected EXPERIMENT PRESET WORKDIR"),
    (["toy", "cpu"], "got 2 argument(s)"),
    (["nope", "cpu", "/w"], "unknown experiment 'nope': no file"),
    (["../toy", "cpu", "/w"], "unknown experiment '../toy'"),
    (["toy", "a b", "/w"], "bad PRESET 'a b'"),
    (["toy", "cpu", ""], "empty WORKDIR"),
    (["--nodes=0", "toy", "cpu", "/w"], "bad --nodes '0'"),
    (["--gpus-per-node=x", "toy", "cpu", "/w"], "bad --gpus-per-node 'x'"),
    (["--job-name=a/b", "toy", "cpu", "/w"], "bad --job-name 'a/b'"),
    (["--bogus=1", "toy", "cpu", "/w"], "unknown option --bogus"),
    (["--bogus", "toy", "cpu", "/w"], "unknown option --bogus"),
    (["--venv=/nowhere", "toy", "cpu", "/w"], "no /nowhere/bin/python"),
    (["--venv=/a,b", "toy", "cpu", "/w"], "comma"),
    (["--time"], "option --time needs a value")])
def test_bad_input(env, args, message):
  for dry in ([], ["--dry-run"]):
    proc = submit(env, *dry, *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    assert not proc.stdout
  assert "(known: toy)" in submit(env, "nope", "cpu", "/w", check=False).stderr
  assert fake_calls(env) == []


def test_checks_the_config_here_first(env, tmp_path):
  submit(env, "--dry-run", "toy", "cpu", "/abs/w", TRICKY, "--config.a=1")
  assert json.loads((tmp_path / "check.json").read_text()) == {
      "argv": ["--config=experiments/toy.py:cpu", "--print_config", TRICKY, "--config.a=1"],
      "cwd": str(tmp_path)}
  for dry in (["--dry-run"], []):
    proc = submit(env, *dry, "toy", "gpu", "/abs/w", check=False)
    assert proc.returncode == 1 and not proc.stdout and fake_calls(env) == []
    assert "submit.sh: error: config of toy gpu refused" in proc.stderr
    assert proc.stderr.endswith(": unknown preset (known: cpu)\n")
  (tmp_path / "check.json").unlink()
  proc = submit(env, "--dry-run", "--no-check", "toy", "gpu", "/abs/w")
  assert "--no-check: the config of toy gpu was not checked here" in proc.stderr
  assert shlex.split(proc.stdout)[-3:] == ["toy", "gpu", "/abs/w"]
  assert not (tmp_path / "check.json").exists()


def real_env(env, tmp_path, *python_flags):
  """`env` for the checkout's experiments with a venv whose python is this one (with flags)."""
  env = {k: v for k, v in env.items() if k != "LMHEAD_EXPERIMENTS_DIR"}
  venv = tmp_path / "real_venv"
  python = shlex.join([sys.executable, *python_flags])
  write_exe(venv / "bin" / "python", f'#!/bin/sh\nexec {python} "$@"\n')
  return dict(env, LMHEAD_VENV=str(venv))


@pytest.mark.parametrize("args,message", [
    (["nosuchpreset", "/x"], "unknown preset 'nosuchpreset' for experiments/rank_sweep.py"),
    (["paper", "/x", "--config.train.stepz=1"], "'stepz' Did you mean \"steps\""),
    (["paper", "/x", "--config.train.steps=0"], "train.steps=0 must be an integer >= 1")])
def test_refuses_a_bad_real_config_before_sbatch(env, tmp_path, args, message):
  proc = submit(real_env(env, tmp_path), "rank_sweep", *args, check=False)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr
  assert "config of rank_sweep" in proc.stderr and not proc.stdout and fake_calls(env) == []


def test_passes_a_good_real_config(env, tmp_path):
  proc = submit(real_env(env, tmp_path), "--dry-run", "rank_sweep", "paper", "/x",
                "--config.train.steps=1")
  assert shlex.split(proc.stdout)[-4:] == ["rank_sweep", "paper", "/x", "--config.train.steps=1"]


def test_refuses_a_venv_without_the_project(env, tmp_path):
  env = real_env(env, tmp_path, "-S")  # no site-packages: no jax, no numpy, no lmhead_jax installed
  proc = submit(env, "rank_sweep", "paper", "/x", check=False)
  assert proc.returncode == 1 and not proc.stdout and fake_calls(env) == []
  assert "run experiments.rank_sweep here (ModuleNotFoundError: No module named" in proc.stderr
  assert f'pip install -e ".[cuda]" in {tmp_path}/real_venv' in proc.stderr
  proc = submit(env, "--dry-run", "--no-check", "rank_sweep", "paper", "/x")
  assert "not checked here" in proc.stderr and proc.stdout.startswith("sbatch ")


def test_submit_runs_one_task_per_node(env, tmp_path):
  logs, out = tmp_path / "logs", tmp_path / "out"
  proc = submit(env, "--nodes=3", "--gpus-per-node=4", f"--logs={logs}", "toy", "cpu", "/abs/w",
                TRICKY, "--config.a=1")
  [call] = fake_calls(env)
  assert call[0] == "--parsable" and f"--output={logs}/%x-%j.out" in call
  assert proc.stdout == f"lmhead: submitted job 4242 (3 node(s) × 4 GPUs): squeue -j 4242; log " \
                        f"{logs}/toy-cpu-4242.out\n"
  log = (logs / "toy-cpu-4242.out").read_text()
  assert log.startswith("lmhead: job 4242 on 3 node(s) node[1-9], GPUs 0,1,2,3 of each"), log
  srun = json.loads((out / "srun.json").read_text())
  assert srun == ["--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
  for i in range(3):
    task = json.loads((out / f"task{i}.json").read_text())
    assert task == {"argv": ["-m", "experiments.toy", "--config=experiments/toy.py:cpu",
                             "--workdir=/abs/w", TRICKY, "--config.a=1"],
                    "cwd": str(ROOT), "devices": "0,1,2,3"}
  assert not (out / "task3.json").exists()


def test_batch_script_policy(tmp_path):
  """One task per node with 8 GPUs, whole nodes, SIGTERM 120 s before the time limit."""
  header = [line.split()[1] for line in (GPU / "job.sbatch").read_text().splitlines()
            if line.startswith("#SBATCH")]
  assert {"--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--signal=TERM@120"} <= set(header)
  proc = subprocess.run(["bash", GPU / "job.sbatch", "toy", "cpu"], capture_output=True, text=True)
  assert proc.returncode == 2 and "expected EXPERIMENT PRESET WORKDIR" in proc.stderr
