"""Logs people use: the final eval as a record, plain progress lines off a terminal, the bar on
one, a sweep's run names and ETA, W&B (offline) and the workdir's file list."""

import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import types

import pytest
import helpers
from helpers import tiny_config

from lmhead_jax.reporting import metrics
from lmhead_jax.runs import experiment, grid, logs, sweep

ROOT = str(helpers.ROOT)
HAS_WANDB = importlib.util.find_spec("wandb") is not None

# One real run in a subprocess whose stderr is a pipe (not a terminal); W&B offline when
# installed. It then evaluates the checkpoint of the last step, restored from disk.
SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import jax
from helpers import tiny_config
from lmhead_jax.data import pipeline
from lmhead_jax.runs import checkpoint, experiment, runner
from lmhead_jax.training import sharding, train
cfg = tiny_config()
cfg.train.update(steps=3, log_every=1, eval_every=0, eval_batches=1, bottleneck_every=0)
cfg.logging.update(progress_every_s=0.0, wandb_project=sys.argv[2])
runner.run(cfg, sys.argv[1])
setup = experiment.resolve(cfg, sharding.make_mesh())
state, shardings = train.init_state(jax.random.key(0), setup)
ckpt = checkpoint.Checkpointer(sys.argv[1] + "/checkpoints", every=0, keep=5)
state, step = ckpt.restore_latest(sharding.abstract_like(state, shardings))
ckpt.close()
source = pipeline.make_source(cfg.data, cfg.model.vocab_size, split="eval", seed=cfg.seed)
ev = runner.evaluate(setup, 1, train.make_eval_step(setup), state.params, source)
print(json.dumps({"restored_step": step, **ev}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, stdout, stderr) of the run."""
  workdir = tmp_path_factory.mktemp("logs") / "run"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", WANDB_MODE="offline",
             WANDB_DIR=str(workdir.parent), WANDB_SILENT="true")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(workdir), "lmhead" * HAS_WANDB],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc.stdout, proc.stderr


def records(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tfevents(workdir) -> dict[tuple[int, str], float]:
  """(step, tag) -> value of the TensorBoard event file, read as TFRecords."""
  from tensorboardX.proto import event_pb2
  (path,) = workdir.glob("events.out.tfevents.*")
  data, pos, out = path.read_bytes(), 0, {}
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out[event.step, v.tag] = v.simple_value
  return out


def test_final_eval_is_a_record_in_metrics_jsonl_and_tensorboard(run):
  workdir, stdout, _ = run
  truth = json.loads(stdout.strip().splitlines()[-1])  # the restored last step, evaluated
  assert truth["restored_step"] == 3
  by_step = {r["step"]: r for r in records(workdir)}
  assert sorted(by_step) == [1, 2, 3]
  assert not any(k.startswith("eval/") for s in (1, 2) for k in by_step[s])
  summary = json.loads((workdir / "summary.json").read_text())
  events = tfevents(workdir)
  for key in ("eval/loss", "eval/accuracy"):
    assert by_step[3][key] == pytest.approx(truth[key], rel=1e-6)
    assert summary[key] == by_step[3][key]
    assert events[3, key] == pytest.approx(truth[key], rel=1e-6)
  assert by_step[3]["loss"] == summary["loss"] and events[3, "loss"] == pytest.approx(
      summary["loss"], rel=1e-6)


def test_tensorboard_holds_the_config_as_text_and_hparams(run):
  """The HParams plugin's experiment (every config leaf, the metrics) and session start (the
  values), as TensorBoard reads them, and the config.json text."""
  from tensorboardX.proto import event_pb2, plugin_hparams_pb2
  workdir = run[0]
  (path,) = workdir.glob("events.out.tfevents.*")
  data, pos, plugin, text = path.read_bytes(), 0, {}, None
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    for v in event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]).summary.value:
      if v.metadata.plugin_data.plugin_name == "hparams":
        plugin[v.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(
            v.metadata.plugin_data.content)
      elif v.tag.startswith("config"):
        text = b"".join(v.tensor.string_val).decode()
    pos += 12 + n + 4
  config = json.loads((workdir / "config.json").read_text())
  del config["history"]  # config.json's record of the runs' environments, written beside
  assert json.loads(text) == config
  hp = plugin["_hparams_/session_start_info"].session_start_info.hparams
  assert hp["model.d_model"].number_value == config["model"]["d_model"] == 32
  assert hp["optimizer.name"].string_value == config["optimizer"]["name"]
  assert hp["model.tie_embeddings"].bool_value is False
  assert hp["head.rank"].string_value == "None"
  experiment = plugin["_hparams_/experiment"].experiment
  assert {m.name.tag for m in experiment.metric_infos} == set(logs.HPARAM_METRICS)
  assert {h.name for h in experiment.hparam_infos} == set(logs.flat_hparams(config))


def test_off_a_terminal_progress_is_plain_lines(run):
  workdir, _, stderr = run
  assert "\r" not in stderr and "it/s" not in stderr  # no tqdm bar
  lines = [line for line in stderr.splitlines() if line.startswith("train step ")]
  assert len(lines) == 3  # progress_every_s=0: one per logged step
  for line, r in zip(lines, records(workdir)):
    assert line.startswith(f"train step {r['step']}/3 loss {r['loss']:.4f} tok/s ")
  assert "ETA" not in lines[0] and re.search(r" ETA (\d+m)?\d+s$", lines[1])  # a rate needs 2 points
  assert f"eval/loss {records(workdir)[-1]['eval/loss']:.4f}" in lines[-1]


def test_the_end_of_a_run_lists_its_files_with_sizes(run):
  workdir, stdout, _ = run
  listed = stdout[stdout.index(f"files in {workdir}:"):].splitlines()[1:]
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    size = (workdir / name).stat().st_size
    shown = f"{size} B" if size < 1024 else f"{size / 1024:.1f} KB"
    assert f"  {name}  {shown}" in listed
  n = sum(len(files) for _, _, files in os.walk(workdir / "checkpoints"))
  assert any(line.startswith(f"  checkpoints/  {n} files, ") for line in listed)
  assert not any(".lock" in line for line in listed)


def _wandb_records(path):
  """The protobuf records of a W&B offline run file (a LevelDB-style log of 32 KiB blocks)."""
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b":W&B"
  pos, chunks = 7, []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunks.append(data[pos + 7:pos + 7 + n])
    pos += 7 + n
    if kind in (1, 4):  # a full record, or the last piece of one
      yield wandb_internal_pb2.Record.FromString(b"".join(chunks))
      chunks = []


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_offline_gets_every_record_and_the_resolved_config(run):
  workdir, _, _ = run
  (path,) = workdir.parent.glob("wandb/offline-run-*/run-*.wandb")
  history, config = {}, {}
  for r in _wandb_records(path):
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    elif r.WhichOneof("record_type") == "run":
      assert r.run.run_id == (workdir / "wandb_id").read_text() and r.run.display_name == "run"
      config = {i.key: json.loads(i.value_json) for i in r.run.config.update
                if i.key != "_wandb"}  # W&B's own
  for rec in records(workdir):
    step = rec.pop("step")
    assert history[step] == pytest.approx(rec, rel=1e-12)
  resolved = json.loads((workdir / "config.json").read_text())
  resolved.pop("history")
  assert config == resolved


def test_wandb_not_installed_names_the_extra(monkeypatch):
  cfg = tiny_config()
  cfg.logging.wandb_project = "p"
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
  with pytest.raises(ValueError, match=re.escape('pip install -e ".[wandb]"')):
    experiment.validate(cfg)
  cfg.logging.wandb_mode = "disabled"  # off: wandb is never imported
  experiment.validate(cfg)
  cfg.logging.wandb_mode = "onlin"
  with pytest.raises(ValueError, match="logging.wandb_mode='onlin'"):
    experiment.validate(cfg)


def clock(monkeypatch, module, *times):
  """`module`'s time.perf_counter returns `times`, one per call (time.time is the real one)."""
  import time
  ticks = iter(times)
  monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks),
                                                            time=time.time))


def test_bar_on_a_terminal_names_the_sweep_run_and_its_eta(tmp_path, monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  monkeypatch.setattr(sys, "stderr", Terminal())
  clock(monkeypatch, logs, 100.0, 110.0, 130.0)  # created; first progress; second progress
  position = logs.Position("rank_sweep/head.rank=64", 3, 8, after=4, run_s=50.0)
  logger = logs.Logger(tiny_config(), tmp_path, total=100, start=0, position=position)
  logger.progress(10, {"loss": 2.5})
  logger.progress(30, {"loss": 2.0})  # 20 steps in 20 s: 70 s left, then 4 runs of 50 s
  logger.close()
  screen = sys.stderr.getvalue()
  assert "rank_sweep/head.rank=64 [3/8]" in screen and "30/100" in screen
  assert "sweep ETA=4m30s" in screen and "loss=2.0000" in screen


def test_sweep_eta_without_a_finished_run_projects_the_current_one(tmp_path, monkeypatch,
                                                                   capsys):
  clock(monkeypatch, logs, 0.0, 10.0, 40.0)
  cfg = tiny_config()
  cfg.logging.progress_every_s = 1e9  # only the first and the last step print
  logger = logs.Logger(cfg, tmp_path, total=40, start=0,
                       position=logs.Position("s/a=1", 1, 3, after=2))
  logger.progress(10, {"loss": 1.0})
  logger.progress(40, {"loss": 1.0})  # run took 40 s: two more runs of 40 s
  logger.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == "s/a=1 [1/3] step 10/40 loss 1.0000 tok/s 0"
  assert lines[1] == "s/a=1 [1/3] step 40/40 loss 1.0000 tok/s 0 ETA 0s sweep ETA 1m20s"


def test_sweep_names_each_run_counts_the_runs_left_and_lists_its_files(tmp_path, monkeypatch,
                                                                       capsys):
  cfg = tiny_config()
  cfg.train.steps = 2
  cfg.sweep = ({"model.d_model": (8, 16, 32)},)
  (tmp_path / "d_model=16").mkdir()  # finished before: skipped
  (tmp_path / "d_model=16" / "summary.json").write_text('{"steps": 2}')
  (tmp_path / "d_model=16" / "config.json").write_text(
      experiment.resolved(grid.configure(cfg, {"model.d_model": 16})).to_json())
  seen = []

  def fake_run(run_cfg, run_dir, position):
    seen.append(position)
    return {"steps": 2}
  monkeypatch.setattr(sweep.runner, "run", fake_run)
  clock(monkeypatch, sweep, 0.0, 30.0, 30.0, 40.0)  # two runs: 30 s, then 10 s
  sweep.run(cfg, tmp_path)
  name = tmp_path.name
  assert seen == [logs.Position(f"{name}/d_model=8", 1, 3, after=1, run_s=None),
                  logs.Position(f"{name}/d_model=32", 3, 3, after=0, run_s=30.0)]
  (tmp_path / "fig.png").write_bytes(b"x" * 3000)
  sweep.publish(tmp_path, lambda: "the report")
  out = capsys.readouterr().out
  assert out.endswith(textwrap.dedent(f"""\
      the report
      files in {tmp_path}:
        d_model=16/  2 files, {logs._size(sum(f.stat().st_size for f in (tmp_path / 'd_model=16').iterdir()))}
        fig.png  2.9 KB
        results.md  11 B
        runs.json  {(tmp_path / 'runs.json').stat().st_size} B
        summary.json  {(tmp_path / 'summary.json').stat().st_size} B
      """))


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (59.6, "1m00s"), (61, "1m01s"),
                                          (3599, "59m59s"), (3600 * 26 + 125, "26h02m")])
def test_duration(seconds, text):
  assert logs.duration(seconds) == text


def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path, caplog):
  good = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
  for torn in ('{"step": 3, "lo', '{"step": 3, "lo\n', '{"step": 3, "loss": 1.0}'):
    path = tmp_path / "metrics.jsonl"
    path.write_text(good + torn)
    assert logs.repair_tail(path) == len(torn)
    assert path.read_text() == good and "torn last record" in caplog.text
    assert logs.repair_tail(path) == 0 and path.read_text() == good
  path.write_text("")
  assert logs.repair_tail(path) == 0


def test_repair_tail_cuts_the_file_in_place(tmp_path):
  """Rewriting the file would lose records when the write fails or is killed midway (here
  files cannot grow past 4 KB, RLIMIT_FSIZE); cutting it in place only drops the torn one."""
  good = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 400))
  path = tmp_path / "metrics.jsonl"
  torn = '{"step": 400, "lo'
  path.write_text(good + torn)
  script = """
import resource, signal, sys
from lmhead_jax.runs import logs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
print(logs.repair_tail(sys.argv[1]))
"""
  proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == [str(len(torn))] and path.read_text() == good


def test_a_resumed_logger_drops_a_torn_last_record_before_appending(tmp_path, caplog):
  good = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  torn = '{"step": 3, "lo'  # killed mid-write: appending would glue the next record onto it
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in good) + torn)
  logger = logs.Logger(tiny_config(), tmp_path, total=4, start=2)
  logger.write({"step": 3, "loss": 1.25})
  logger.close()
  assert metrics.read_metrics(path) == good + [{"step": 3, "loss": 1.25}]
  assert f"{path}: dropped a torn last record ({len(torn)} bytes" in caplog.text


def test_a_full_disk_under_the_logs_stops_the_run_naming_the_file(tmp_path):
  """Writes past 48 KB fail (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC); the run used to
  hang for good in the TensorBoard writer's queue once its thread had died."""
  limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, resource.RLIM_INFINITY)); "
             "sys.argv.pop(0); runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
  proc = subprocess.run(
      [sys.executable, "-c", limited, "experiments.spamlang",
       "--config=experiments/spamlang.py:smoke", f"--workdir={tmp_path}",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.every=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert re.match(rf"error: cannot write {tmp_path}/"
                  r"(metrics\.jsonl|events\.out\.tfevents\.\S+): .*File too large", last), last


# A Logger in a subprocess, given a workdir, config overrides (JSON) and the record it writes
# until a write fails. Once it is open, either its files cannot grow past `limit` bytes
# (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) or, for limit "kill-wandb", W&B's service
# process (its only child) is killed.
LOGGER = """
import json, os, resource, signal, subprocess, sys, time
sys.path.insert(0, "tests")
from helpers import tiny_config
from etils import epath
from lmhead_jax.runs import logs
workdir, overrides, record, limit = sys.argv[1:]
cfg = tiny_config()
cfg.update_from_flattened_dict(json.loads(overrides))
logger = logs.Logger(cfg, epath.Path(workdir), total=10**6, start=0)
if limit == "kill-wandb":
  service = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
  os.kill(int(service.stdout), signal.SIGKILL)
else:
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.RLIM_INFINITY))
t = time.perf_counter()
for step in range(1, 10**5):
  try:
    logger.write({"step": step, **json.loads(record)})
  except OSError as e:
    failed, error = time.perf_counter() - t, str(e)
    break
logger.close()
print(json.dumps({"step": step, "error": error, "failed_s": failed,
                  "close_s": time.perf_counter() - t - failed}))
"""


def run_logger(workdir, overrides: dict, record: dict, limit, env=()) -> dict:
  """What LOGGER prints; a hang fails the test after 60 s."""
  proc = subprocess.run(
      [sys.executable, "-c", LOGGER, str(workdir), json.dumps(overrides), json.dumps(record),
       str(limit)],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **dict(env)),
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("failing,record", [
    ("events.out.tfevents.*", {f"m{i}": 1 for i in range(50)}),  # events grow faster
    ("metrics.jsonl", {"loss": 1.5, "note": "x" * 300})])  # text: only in metrics.jsonl
def test_a_full_disk_under_each_log_file_raises_at_once_naming_it(tmp_path, failing, record):
  out = run_logger(tmp_path, {}, record, limit=48 * 1024)
  (path,) = tmp_path.glob(failing)
  assert out["error"].startswith(f"cannot write {path}: [Errno 27] File too large"), out
  assert out["failed_s"] < 5 and out["close_s"] < 5, out
  logs.repair_tail(tmp_path / "metrics.jsonl")  # what a resume does first
  steps = [r["step"] for r in metrics.read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == list(range(1, out["step"] + (failing != "metrics.jsonl")))


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_a_dead_wandb_service_raises_at_once_naming_the_run(tmp_path):
  out = run_logger(tmp_path, {"logging.wandb_project": "p"}, {"loss": 1.0}, limit="kill-wandb",
                   env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
  run_id = (tmp_path / "wandb_id").read_text()
  assert re.match(rf"cannot write W&B run {run_id} \({tmp_path}/wandb/offline-run-\S+\): "
                  r".*Connection (reset|lost)", out["error"]), out["error"]
  assert out["failed_s"] < 5 and out["close_s"] < 5, out


def test_a_logger_that_fails_to_open_closes_what_it_opened(tmp_path):
  """Its events file cannot take the config text (files end at 1 KB): metrics.jsonl, the events
  file and the W&B run opened before are closed again, and the process exits."""
  script = """
import json, os, resource, signal, sys
sys.path.insert(0, "tests")
from etils import epath
from helpers import tiny_config
from lmhead_jax.runs import logs
cfg = tiny_config()
cfg.logging.wandb_project = sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
try:
  logs.Logger(cfg, epath.Path(sys.argv[1]), total=10, start=0)
except OSError as e:
  error = e  # its traceback keeps what the Logger held
fds = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
wandb = sys.modules.get("wandb")
print(json.dumps({"error": str(error), "open": [f for f in fds if f.startswith(sys.argv[1])],
                  "wandb_run": bool(wandb and wandb.run)}))
"""
  workdir = tmp_path / "run"
  workdir.mkdir()
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", WANDB_MODE="offline",
             WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
  proc = subprocess.run([sys.executable, "-c", script, str(workdir), "lmhead" * HAS_WANDB],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  (events,) = workdir.glob("events.out.tfevents.*")
  assert out["error"].startswith(f"cannot write {events}: [Errno 27] File too large"), out
  assert out["open"] == [] and not out["wandb_run"]
