"""tpu/ scripts: shellcheck, --dry-run output, and real runs against a fake gcloud whose workers are
local directories (the remote commands really run, in bash, with HOME set to the worker's dir);
run.sh's local config check with the fake experiment and with the real ones."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (ROOT, TRICKY, assert_shellcheck_clean, fake_calls, run_script,
                     write_exe, write_fake_experiment)

TPU = ROOT / "tpu"
SCRIPTS = ["create", "setup", "run", "status", "logs", "delete"]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  sys.exit(print("state:\\n  state: ACTIVE"))
if args[:4] != ["compute", "tpus", "tpu-vm", "ssh"]:
  sys.exit("fake gcloud: only ssh and describe are faked")
worker = next(a for a in args if a.startswith("--worker=")).split("=")[1]
cmd = args[args.index("--command") + 1]
root = os.environ["FAKE_WORKERS"]
status = 0
procs = {{w: subprocess.Popen(["bash", "-c", cmd], cwd=os.path.join(root, w),
                              env=dict(os.environ, HOME=os.path.join(root, w)))
          for w in (sorted(os.listdir(root), key=int) if worker == "all" else [worker])}}
for w, proc in procs.items():
  rc = proc.wait()
  if rc and worker == "all":  # as gcloud: it names failed workers only when there are several
    print(f"##### Command execution on worker {{w}} failed with exit status {{rc}}. Continuing.",
          file=sys.stderr)
  status = status or rc
sys.exit(status)
"""

FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd()}}, open(os.path.join(os.environ["HOME"], "argv.json"), "w"))
print("fake run started", flush=True)
time.sleep(20)
"""

CRASHING_PYTHON = f"""#!{sys.executable}
import sys
sys.exit("boom: bad config")
"""


@pytest.fixture
def env(tmp_path):
  """Environment with a fake gcloud on PATH, a fake experiments dir checked by this python, and two
  empty fake workers."""
  write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
  write_fake_experiment(tmp_path / "experiments")
  (tmp_path / "experiments" / "__init__.py").write_text("")
  for w in "01":
    (tmp_path / "workers" / w).mkdir(parents=True)
  return dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
              FAKE_CALLS=str(tmp_path / "calls.jsonl"), FAKE_WORKERS=str(tmp_path / "workers"),
              FAKE_CHECK=str(tmp_path / "check.json"), LMHEAD_LOCAL_PYTHON=sys.executable,
              LMHEAD_EXPERIMENTS_DIR=str(tmp_path / "experiments"), LMHEAD_TPU_NAME="my-tpu",
              LMHEAD_TPU_ZONE="us-east5-a", LMHEAD_WAIT="1")


def tpu(env, script, *args, check=True):
  return run_script(TPU / f"{script}.sh", *args, env=env, check=check)


def dry(env, script, *args):
  """The commands that `script --dry-run args` prints, each split into argv; checks none ran."""
  proc = tpu(env, script, "--dry-run", *args)
  assert fake_calls(env) == [], "--dry-run called gcloud"
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote(cmd):
  """The --command argument of an ssh command, split into shell words."""
  return shlex.split(cmd[cmd.index("--command") + 1])


def ssh(worker):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a",
          f"--worker={worker}", "--command"]


def test_shellcheck_is_clean():
  assert_shellcheck_clean(TPU / "common.sh", ROOT / "scripts" / "experiment_args.sh",
                          *(TPU / f"{s}.sh" for s in SCRIPTS))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_options(env, script):
  assert tpu(env, script, "--help").stdout.startswith(f"Usage: tpu/{script}.sh")
  proc = tpu(env, script, "--dry-run", "--bogus=1", check=False)
  assert proc.returncode == 1 and "unknown option --bogus" in proc.stderr
  proc = tpu(dict(env, LMHEAD_TPU_NAME=""), script, "--dry-run", check=False)
  assert proc.returncode == 1 and "LMHEAD_TPU_NAME" in proc.stderr
  assert fake_calls(env) == []


def test_create(env):
  base = ["compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu"]
  assert dry(env, "create") == [["gcloud", *base, "--accelerator-type=v5p-64",
                                 "--runtime-version=v2-alpha-tpuv5", "--zone=us-east5-a"]]
  assert dry(env, "create", "--type", "v6e-64", "--project=p", "--spot") == [
      ["gcloud", *base, "--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e",
       "--zone=us-east5-a", "--project=p", "--spot"]]
  assert dry(env, "create", "--name=other", "--type=v4-32", "--runtime=rt", "--preemptible", "--",
             "--reserved", "--labels=a=b c") == [
      ["gcloud", "alpha", *base[:4], "other", "--node-id=other", "--accelerator-type=v4-32",
       "--runtime-version=rt", "--zone=us-east5-a", "--best-effort", "--reserved", "--labels=a=b c"]]
  for args, message in [(["--type=v9-8"], "--runtime"), (["--spot", "--preemptible"], "exclude")]:
    proc = tpu(env, "create", "--dry-run", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and not proc.stdout


def test_setup_dry_run(env):
  proc = tpu(dict(env, LMHEAD_REPO=""), "setup", "--dry-run", check=False)
  assert proc.returncode == 1 and "LMHEAD_REPO" in proc.stderr and not proc.stdout
  env["LMHEAD_REPO"] = "https://example.com/x y.git"
  [cmd] = dry(env, "setup", "--commit=abc123")
  assert cmd[:-1] == ssh("all")
  words = remote(cmd)
  assert {"repo=https://example.com/x y.git;", "commit=abc123;", "python=3.12;"} <= set(words)
  assert ".venv/bin/pip install -q -e .[tpu];" in " ".join(words)
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  assert f"commit={head};" in remote(dry(env, "setup")[0])


def _source_repo(path):
  """A git repo with two commits; returns their hashes."""
  git = ["git", "-C", path, "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", path], check=True)
  commits = []
  for i in range(2):
    (path / "f.txt").write_text(str(i))
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", str(i)], check=True)
    commits.append(subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip())
  return commits


FAKE_UV = f"""#!{sys.executable}
import os, sys
assert sys.argv[1:] == ["venv", "-q", "--seed", "--allow-existing", "--python", "3.11", ".venv"], sys.argv
os.makedirs(".venv/bin", exist_ok=True)
for name, body in [("pip", 'echo "$@" > "$HOME/pip.args"'), ("python", "echo Python 3.11.0")]:
  with open(f".venv/bin/{{name}}", "w") as f:
    f.write("#!/bin/bash\\n" + body + "\\n")
  os.chmod(f".venv/bin/{{name}}", 0o755)
"""


def test_setup_installs_the_pinned_commit_on_every_worker(env, tmp_path):
  commits = _source_repo(tmp_path / "src")
  for w in "01":  # a fake uv, so that setup.sh does not download one
    write_exe(tmp_path / "workers" / w / ".local" / "bin" / "uv", FAKE_UV)
  for commit in commits:  # the second round fetches into the existing clones
    out = tpu(env, "setup", f"--repo={tmp_path / 'src'}", f"--commit={commit}", "--python=3.11").stdout
    for w in "01":
      home = tmp_path / "workers" / w
      head = subprocess.run(["git", "-C", home / "lmhead_jax", "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
      assert head == commit
      assert (home / "pip.args").read_text() == "install -q -e .[tpu]\n"
    assert out.count(f"ready at {commit[:7]}, python Python 3.11.0") == 2


def test_run_dry_run(env):
  warmup, start, check = dry(env, "run", "--run=r1", "toy", "cpu", "gs://b/w", TRICKY, "--config.a=1")
  assert warmup == [*ssh("all"), "true"]
  assert start[:-1] == check[:-1] == ssh("all")
  python = [".venv/bin/python", "-m", "experiments.toy", "--config=experiments/toy.py:cpu",
            "--workdir=gs://b/w", TRICKY, "--config.a=1"]
  words = remote(start)
  i = words.index(".venv/bin/python")
  assert words[i:i + len(python)] == python
  assert words[i + len(python)] == ">>" and "r=r1;" in words
  assert "r=r1;" in remote(check)


def test_run_checks_the_config_here_first(env, tmp_path):
  dry(env, "run", "toy", "cpu", "gs://b/w", TRICKY, "--config.a=1")
  assert json.loads((tmp_path / "check.json").read_text()) == {
      "argv": ["--config=experiments/toy.py:cpu", "--print_config", TRICKY, "--config.a=1"],
      "cwd": str(tmp_path)}
  for dry_run in (["--dry-run"], []):
    proc = tpu(env, "run", *dry_run, "toy", "gpu", "gs://b/w", check=False)
    assert proc.returncode == 1 and not proc.stdout and fake_calls(env) == []
    assert "run.sh: error: config of toy gpu refused" in proc.stderr
    assert proc.stderr.endswith(": unknown preset (known: cpu)\n")
  (tmp_path / "check.json").unlink()
  proc = tpu(env, "run", "--dry-run", "--no-check", "toy", "gpu", "gs://b/w")
  assert "--no-check: the config of toy gpu was not checked here" in proc.stderr
  assert "--config=experiments/toy.py:gpu" in proc.stdout and not (tmp_path / "check.json").exists()


@pytest.mark.parametrize("args,message", [
    (["nosuchpreset", "gs://b/x"], "unknown preset 'nosuchpreset' for experiments/rank_sweep.py"),
    (["paper", "gs://b/x", "--config.train.stepz=1"], "'stepz' Did you mean \"steps\""),
    (["paper", "gs://b/x", "--config.train.steps=0"], "train.steps=0 must be an integer >= 1")])
def test_run_refuses_a_bad_real_config_before_gcloud(env, args, message):
  del env["LMHEAD_EXPERIMENTS_DIR"]  # the checkout's experiments, checked by this python
  proc = tpu(env, "run", "rank_sweep", *args, check=False)
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr
  assert "config of rank_sweep" in proc.stderr and not proc.stdout and fake_calls(env) == []


def test_run_passes_a_good_real_config(env):
  del env["LMHEAD_EXPERIMENTS_DIR"]
  _, start, _ = dry(env, "run", "rank_sweep", "paper", "gs://b/x", "--config.train.steps=1")
  assert "--config.train.steps=1" in remote(start)


def test_run_refuses_a_python_without_the_project(env, tmp_path):
  del env["LMHEAD_EXPERIMENTS_DIR"]
  bare = tmp_path / "bare_python"  # no site-packages: no jax, no numpy, no lmhead_jax installed
  write_exe(bare, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
  for python, why in [(bare, "(ModuleNotFoundError: No module named"),
                      (tmp_path / "nowhere", "No such file or directory")]:
    proc = tpu(dict(env, LMHEAD_LOCAL_PYTHON=str(python)), "run", "rank_sweep", "paper", "gs://b/x",
               check=False)
    assert proc.returncode == 1 and not proc.stdout and fake_calls(env) == []
    assert f"error: {python} cannot run experiments.rank_sweep here " in proc.stderr
    assert why in proc.stderr and "pip install -e . in this checkout" in proc.stderr
    assert "--no-check" in proc.stderr
  proc = tpu(env, "run", "--dry-run", f"--local-python={bare}", "--no-check", "rank_sweep", "paper",
             "gs://b/x")
  assert "not checked here" in proc.stderr and proc.stdout.count("\n") == 3


def test_run_rejects_bad_input(env):
  for args, message in [([], "expected EXPERIMENT PRESET WORKDIR"),
                        (["toy", "cpu"], "got 2 argument(s)"),
                        (["nope", "cpu", "gs://b/w"], "unknown experiment 'nope'"),
                        (["../toy", "cpu", "gs://b/w"], "unknown experiment '../toy'"),
                        (["toy", "a b", "gs://b/w"], "bad PRESET"),
                        (["toy", "cpu", ""], "empty WORKDIR"),
                        (["--run=a/b", "toy", "cpu", "gs://b/w"], "bad --run"),
                        (["--stop", "toy"], "--stop takes no arguments")]:
    proc = tpu(env, "run", "--dry-run", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    assert not proc.stdout
  assert "(known: toy)" in tpu(env, "run", "--dry-run", "nope", "cpu", "gs://x", check=False).stderr
  proc = tpu(env, "run", "--dry-run", "toy", "cpu", "/local/dir")
  assert "not on GCS" in proc.stderr and "--workdir=/local/dir" in proc.stdout


def _pid(env, w, run):
  return int((Path(env["FAKE_WORKERS"]) / w / "lmhead_logs" / f"{run}.pid").read_text())


def _alive(pid):
  try:
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
  except FileNotFoundError:
    return False


def _wait_for(condition, timeout=10):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def _kill(env, run):
  for w in "01":
    try:
      os.killpg(_pid(env, w, run), signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
      pass


def test_run_starts_on_every_worker_and_stops(env):
  workers = Path(env["FAKE_WORKERS"])
  for w in "01":
    write_exe(workers / w / "lmhead_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
  try:
    proc = tpu(env, "run", "--run=r1", "toy", "cpu", "gs://b/w", TRICKY, "--config.a=1")
    _wait_for(lambda: all((workers / w / "argv.json").exists() for w in "01"))
    python = ["-m", "experiments.toy", "--config=experiments/toy.py:cpu", "--workdir=gs://b/w",
              TRICKY, "--config.a=1"]
    for w in "01":
      assert json.loads((workers / w / "argv.json").read_text()) == {
          "argv": python, "cwd": str(workers / w / "lmhead_jax")}
      assert (workers / w / "lmhead_logs" / "r1.log").read_text() == "fake run started\n"
      assert _alive(_pid(env, w, "r1"))
    assert proc.stdout.count("lmhead: r1 running on") == 2
    assert [c[c.index("--command") + 1] for c in fake_calls(env)][0] == "true"  # the warm-up first
    assert all("--worker=all" in c for c in fake_calls(env))

    status = tpu(env, "status").stdout
    assert status.startswith("state:\n  state: ACTIVE\n") and status.count(": r1 running: fake run started") == 2
    logs = tpu(env, "logs", "--worker=1").stdout
    assert logs.endswith(": fake run started\n") and logs.count("\n") == 1

    tpu(env, "run", "--stop")
    _wait_for(lambda: not any(_alive(_pid(env, w, "r1")) for w in "01"))
    assert tpu(env, "status").stdout.count(": no run going") == 2  # zombies do not count
  finally:
    _kill(env, "r1")


def test_run_names_the_worker_that_did_not_start(env):
  workers = Path(env["FAKE_WORKERS"])
  write_exe(workers / "0" / "lmhead_jax" / ".venv" / "bin" / "python", FAKE_PYTHON)
  write_exe(workers / "1" / "lmhead_jax" / ".venv" / "bin" / "python", CRASHING_PYTHON)
  try:
    proc = tpu(dict(env, LMHEAD_WAIT="3"), "run", "--run=r2", "toy", "cpu", "gs://b/w", check=False)
    assert proc.returncode == 1
    assert "run.sh: error: run r2 did not start on worker(s) 1 " in proc.stderr
    assert "r2 is not running" in proc.stdout and "boom: bad config" in proc.stdout
    assert "r2 running on" in proc.stdout  # worker 0 did start
  finally:
    _kill(env, "r2")


def test_run_names_the_workers_that_could_not_launch(env):
  proc = tpu(env, "run", "--run=r3", "toy", "cpu", "gs://b/w", check=False)  # no checkout there
  assert proc.returncode == 1 and "could not launch r3 on worker(s) 0,1 " in proc.stderr
  proc = tpu(env, "logs", "--run=r3", "--worker=1", check=False)
  assert proc.returncode == 1 and "logs failed on worker(s) 1 " in proc.stderr
  assert proc.stdout.endswith(": no log lmhead_logs/r3.log\n")


def test_logs_status_delete_dry_run(env):
  [cmd] = dry(env, "logs")
  assert cmd[:-1] == ssh("all") and "tail -n 50" in cmd[-1] and "ls -t lmhead_logs/*.log" in cmd[-1]
  [cmd] = dry(env, "logs", "--run", "r1", "--worker", "2", "--lines=7", "--follow")
  assert cmd[:-1] == ssh("2") and "f=lmhead_logs/r1.log;" in cmd[-1] and "tail -n 7 -f" in cmd[-1]
  for args in (["--worker=x"], ["--lines=-1"], ["--run=a b"]):
    assert tpu(env, "logs", "--dry-run", *args, check=False).returncode == 1
  describe, workers = dry(env, "status", "--project=p")
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu",
                      "--zone=us-east5-a", "--project=p"]
  assert "--worker=all" in workers
  delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", "--zone=us-east5-a",
            "--force"]
  assert dry(env, "delete") == [delete]
  assert dry(env, "delete", "--yes") == [[*delete, "--quiet"]]


# Valid arguments of each script, options and positionals, for --dry-run / --help to stand after.
VALID_ARGS = {"create": ["--type=v6e-64", "--", "--reserved"], "setup": ["--repo=r", "--commit=c"],
              "run": ["--zone", "z", "--project", "p", "toy", "cpu", "gs://b/w", "--config.a=1"],
              "status": [], "logs": ["--run=r1"], "delete": ["--yes"]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_and_help_count_wherever_they_stand(env, script):
  args = VALID_ARGS[script]
  # run.sh names its log after the second it starts: the two calls may straddle one
  same_second = lambda out: re.sub(r"-\d{8}-\d{6}\b", "-<time>", out)
  first = tpu(env, script, "--dry-run", *args).stdout
  assert first and fake_calls(env) == []
  proc = tpu(env, script, *args, "--dry-run", check=False)
  assert fake_calls(env) == [], f"{script}.sh with --dry-run last called gcloud"
  assert (proc.returncode, same_second(proc.stdout)) == (0, same_second(first))
  for where in range(len(args) + 1):
    proc = tpu(env, script, *args[:where], "--help", *args[where:])
    assert proc.stdout.startswith(f"Usage: tpu/{script}.sh") and fake_calls(env) == []
  proc = tpu(env, script, *args, "--dry-run=yes", check=False)
  assert proc.returncode == 1 and "--dry-run takes no value" in proc.stderr and fake_calls(env) == []
