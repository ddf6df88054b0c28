"""Multi-process start-up: which environments count as a cluster job (no real cluster needed), and
a real 2-process run that finds its peers from SLURM's variables alone, as under `srun`."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ALL, ROOT, free_port

from lmhead_jax.runs import cli, grid


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
CLUSTER_VARS = ("SLURM_", "OMPI_", "TPU_")


@pytest.fixture
def flags(monkeypatch):
  """Parsed default flags and an environment without any cluster variables."""
  for k in list(os.environ):
    if k.startswith(CLUSTER_VARS):
      monkeypatch.delenv(k)
  cli.define_flags()
  cli.FLAGS.unparse_flags()
  cli.FLAGS(["test", "--workdir=w"])
  yield cli.FLAGS
  cli.FLAGS.unparse_flags()


@pytest.mark.parametrize("env,want", [
    ({}, None),
    (SLURM, ("SLURM", 4)),
    (SLURM | {"SLURM_NTASKS": "1"}, ("SLURM", 1)),
    # sbatch's batch shell, outside srun: no step, so JAX detects nothing either
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}, ("Open MPI", 8)),
    (SLURM | {"OMPI_COMM_WORLD_SIZE": "2"}, ("Open MPI", 2)),  # mpirun inside an allocation
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, ("Cloud TPU", 4)),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, ("Cloud TPU", 1)),
    ({"TPU_PROCESS_ADDRESSES": "a:1,b:1", "TPU_WORKER_HOSTNAMES": "a"}, ("Cloud TPU", 2))])
def test_detected_cluster(env, want):
  assert cli.detected_cluster(env) == want


def test_detected_cluster_names_a_bad_count():
  with pytest.raises(ValueError, match="SLURM_NTASKS='4x'"):
    cli.detected_cluster(SLURM | {"SLURM_NTASKS": "4x"})


@pytest.mark.parametrize("env,argv,want", [
    ({}, [], False),
    (SLURM, [], True),
    (SLURM | {"SLURM_NTASKS": "1"}, [], False),  # one task with all the node's GPUs
    ({"OMPI_COMM_WORLD_SIZE": "2"}, [], True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, [], True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, [], False),
    ({}, ["--num_processes=2"], True),  # e.g. Kubernetes: JAX finds the rest
    ({}, ["--coordinator_address=h:1234"], True)])
def test_multi_process(flags, monkeypatch, env, argv, want):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  flags(["test", "--workdir=w", *argv])
  assert cli.multi_process() is want


def slurm_task(workdir, i, port, *flags):
  """Task i of 2 as `srun --ntasks=2` on this host starts it: SLURM's variables, no peer flags."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
  env.update(SLURM, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
             SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.spamlang", f"--config={ROOT}/experiments/spamlang.py:smoke",
       f"--workdir={workdir}", "--config.train.steps=2", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.eval_batches=0",
       "--config.checkpoint.every=0", "--config.mesh.data=4", "--config.mesh.fsdp=2", *flags],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_missing_slurm_task_fails_fast_naming_the_job(tmp_path):
  p = slurm_task(tmp_path, 0, str(free_port()), "--distributed_timeout=3")
  _, err = p.communicate(timeout=60)
  assert p.returncode == 2
  assert "not all 2 processes joined the coordinator within 3s; start every process of the " \
         "SLURM job" in err


@pytest.mark.slow
def test_two_slurm_tasks_join_without_coordinator_flags(tmp_path):
  """Two tasks with no --coordinator_address, --num_processes or --process_id: JAX's SLURM
  detection joins them into one job of 8 devices (mesh 4 × 2; each process has 4)."""
  port = str(free_port())
  procs = [slurm_task(tmp_path, i, port, "--distributed_timeout=60") for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]


def test_print_config_works_for_every_preset_of_every_experiment():
  for module, preset in ALL:
    cfg = module.get_config(preset)
    printed = json.loads(cli.printed_config(cfg))
    if cfg.get("sweep"):
      assert sorted(printed) == sorted(map(grid.run_name, grid.expand(cfg.sweep)))
      printed = next(iter(printed.values()))
    assert printed["model"]["vocab_size"] >= 2 and "head" in printed, (module, preset)


def run_experiment(*args, preset="smoke"):
  return subprocess.run([sys.executable, "-m", "experiments.spamlang",
                         f"--config={ROOT}/experiments/spamlang.py:{preset}", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("preset,args,needle", [
    ("smoke", ["--workdir=w", "--config.train.stepz=1"],
     '--config.train.stepz: \'stepz\' Did you mean "steps"'),
    ("smoke", ["--workdir=w", "--config.train.steps=0"], "invalid config: train.steps=0 must be"),
    ("nosuch", ["--print_config"], "ValueError: unknown preset 'nosuch'"),
    ("smoke", ["--print_config", "foo"], "unexpected arguments: ['foo']"),
])
def test_a_refusal_is_one_line_and_exit_2(preset, args, needle):
  proc = run_experiment(*args, preset=preset)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr
  assert "Traceback" not in proc.stderr
  verbose = run_experiment(*args, "--verbose", preset=preset)
  assert verbose.returncode == 2 and needle in verbose.stderr
  assert ("Traceback" in verbose.stderr) == ("foo" not in args)  # a usage error has no traceback


def test_defined_flags_leave_a_later_parse_without_workdir_alone():
  """tokamax parses absl's flags on first use; --workdir is checked by `main`, not by a
  validator that such a parse would trip."""
  cli.define_flags()
  cli.FLAGS.unparse_flags()
  try:
    cli.FLAGS(["tokamax"], known_only=True)
    assert cli.FLAGS.workdir is None
  finally:
    cli.FLAGS.unparse_flags()
