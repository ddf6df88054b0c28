"""The train/eval loop shared by experiments: data, steps, logs, checkpoints, resume, preemption.

Outputs under `workdir`: config.json, metrics.jsonl (appended; on resume, steps after the
checkpoint are logged again and readers keep each step's last record), TensorBoard events,
summary.json, checkpoints/, .lock (held while a run owns the workdir) and, with W&B, wandb_id.
config.json is the resolved config plus `history`, one entry per start. Host 0 writes the logs
(lmhead_jax.runs.logs); every host takes part in checkpoints.
"""

import dataclasses
import fcntl
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lmhead_jax.data import pipeline, tokens
from lmhead_jax.runs import checkpoint, divergence, experiment, logs
from lmhead_jax.training import sharding, train
from lmhead_jax.training.setup import Setup

log = logging.getLogger(__name__)

# Keys that define the data stream whose position a checkpoint's iterator state records.
DATA_KEYS = ("seed", "data.kind", "data.path", "data.shuffle", "data.window_mode",
             "train.batch_size")


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and measures: the step counts of the `train` group."""

  log_every: int
  eval_every: int
  eval_batches: int
  bottleneck_every: int
  realized_cosine_every: int

  @classmethod
  def of(cls, cfg) -> "Cadence":
    return cls(**{f.name: int(cfg.train[f.name]) for f in dataclasses.fields(cls)})


class Preempted(SystemExit):
  """A run stopped by SIGTERM/SIGINT (or a preemption sync point) after saving its last step;
  exits with status 0 unless caught (a sweep catches it to write its summary first)."""

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C; one process), or JAX's preemption sync point (many), asks for
  save-and-exit. The handlers are installed for the whole run, start-up included, and removed
  afterwards; a second Ctrl-C while the save runs interrupts as usual.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the signal's name, once one came
    self.previous = {}
    if jax.process_count() == 1:
      self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

  def _handle(self, signum, _):
    if self.requested == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return bool(self.requested)

  def close(self):
    for sig, previous in self.previous.items():
      signal.signal(sig, previous)


def _lock(workdir: epath.Path) -> int | None:
  """An exclusive flock on workdir/.lock (by process 0, for the whole job; local paths only).

  The kernel drops the lock when its holder exits, however it dies; close the fd to release.
  """
  fd, holder = None, ""
  if jax.process_index() == 0 and "://" not in str(workdir):
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os.ftruncate(fd, 0)
      os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode())
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace") or "another process"
      os.close(fd)
      fd = None
  taken = fd is not None or jax.process_index() != 0 or "://" in str(workdir)
  if jax.process_count() > 1:
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
  if not taken:
    raise RuntimeError(f"{workdir} is in use by another run ({holder or 'see process 0'}); "
                       "wait for it to end or stop it, or use another --workdir")
  return fd


def environment() -> dict:
  """Package versions, Python, backend, devices and the git commit behind a run."""
  import importlib.metadata
  import platform
  env = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax",
                                                    "orbax-checkpoint", "grain")}
  env.update(python=platform.python_version(), backend=jax.default_backend(),
             device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
             processes=jax.process_count())
  git = lambda *a: subprocess.run(["git", *a], cwd=os.path.dirname(__file__), text=True,
                                  capture_output=True, timeout=10)
  try:
    commit = git("rev-parse", "HEAD")
    if commit.returncode == 0:
      env["git_commit"] = commit.stdout.strip()
      env["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
  except (OSError, subprocess.SubprocessError):
    pass
  return env


def _history(workdir: epath.Path) -> tuple[dict, list]:
  """(resolved config, history) of the workdir's config.json; ({}, []) when there is none."""
  path = workdir / "config.json"
  if not path.exists():
    return {}, []
  try:
    old = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e}): restore it, or use a new --workdir") from None
  history = old.pop("history", []) if isinstance(old, dict) else None
  if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
    raise ValueError(f"{path} is not a run's config (a JSON object whose 'history' is a list "
                     "of objects): restore it, or use a new --workdir")
  return old, history


def _data_fingerprints(cfg) -> dict:
  """{data key: content fingerprint} of the token directories a run reads (none for SpamLang)."""
  if cfg.data.kind != "tokens":
    return {}
  return {f"data.{k}": tokens.fingerprint(cfg.data[k]) for k in ("path", "eval_path")
          if cfg.data[k]}


def evaluate(setup: Setup, batches: int, eval_step, params, source) -> dict:
  """Mean loss and accuracy over `batches` held-out batches (the same ones each time)."""
  ds = pipeline.make_dataset(source, global_batch_size=setup.batch_size, seed=setup.seed,
                             shuffle=False)
  it, total, n = iter(ds), {"loss": 0.0, "accuracy": 0.0}, 0.0
  batch_sh = sharding.batch_sharding(setup.mesh)
  for _ in range(batches):
    out = jax.device_get(eval_step(params, pipeline.global_batch(next(it), batch_sh)))
    for k in total:
      total[k] += float(out[k]) * float(out["n"])
    n += float(out["n"])
  return {f"eval/{k}": v / max(n, 1.0) for k, v in total.items()}


def _records(workdir: epath.Path) -> list[dict]:
  """metrics.jsonl's records; host 0 first drops a torn last line (a kill mid-write) from the
  file, which the other hosts skip."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  if jax.process_index() == 0:
    logs.repair_tail(path)
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  if lines and jax.process_index() != 0:
    try:
      json.loads(lines[-1])
    except ValueError:
      lines.pop()
  return [json.loads(line) for line in lines]


def _host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(cfg, workdir, position: logs.Position | None = None) -> dict:
  """Trains (or resumes) one run into `workdir`; returns the summary.

  A second run on the same workdir is refused while this one holds it. `position` names the
  run of a sweep in its progress; a run outside a sweep lists the workdir's files at the end.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  preempted = _Preemption()  # first: a SIGTERM during start-up ends the run cleanly
  try:
    lock = _lock(workdir)
    try:
      summary = _run(cfg, workdir, preempted, position)
    finally:
      if lock is not None:
        os.close(lock)
  except Preempted as e:
    log.warning("%s", e.message)
    raise
  finally:
    preempted.close()
  if position is None and jax.process_index() == 0:
    print(logs.listing(workdir), flush=True)
  return summary


def _resume(cfg, workdir: epath.Path, ckpt, abstract_state, data_iter):
  """(state, step) to continue from, or None to start; refuses anything but a clean resume.

  Records this start in config.json: the resolved config plus `history`, one entry per start
  with its step, environment and the keys changed since the previous start.
  """
  old, history = _history(workdir)
  if not old and ckpt.steps():
    raise ValueError(
        f"{workdir} holds checkpoints (steps {ckpt.steps()}) but no config.json, so nothing "
        "shows that this config and data match them: restore config.json, or use a new "
        "--workdir")
  resolved = json.loads(experiment.resolved(cfg).to_json())
  changed = experiment.changed_keys(old, cfg) if old else {}
  fingerprints = _data_fingerprints(cfg)
  shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "none"
  try:
    restored = ckpt.restore_latest(abstract_state, data_iter)
  except checkpoint.StateMismatch as e:
    raise ValueError(f"cannot resume {workdir}: {e}. Config keys that differ from its "
                     f"config.json: {shown}. Resume with the old values, or use a new "
                     "--workdir") from None
  if restored is None and (records := _records(workdir)):
    last = int(records[-1].get("step", 0))
    first_save = int(cfg.checkpoint.every) or int(cfg.train.steps)
    if last > first_save:  # a checkpoint had committed, and is gone
      raise RuntimeError(
          f"{workdir}/metrics.jsonl holds {len(records)} records up to step {last}, but "
          f"{ckpt.directory} holds no checkpoint: the run cannot resume, and starting at step "
          f"0 would lose {last} steps. To start over, use a new --workdir or delete "
          f"{workdir}/metrics.jsonl")
    aside = workdir / f"metrics.jsonl.before-restart-{time.strftime('%Y%m%dT%H%M%S')}"
    if jax.process_index() == 0:
      (workdir / "metrics.jsonl").rename(aside)
    log.warning("%s: no checkpoint was committed before step %d: starting over, the %d earlier "
                "records kept in %s", workdir, last, len(records), aside.name)
  if restored is not None:
    if restored[1] > int(cfg.train.steps):
      raise ValueError(
          f"cannot resume {workdir}: its checkpoint is at step {restored[1]}, beyond "
          f"train.steps={cfg.train.steps}; training to fewer steps would overwrite it. Set "
          f"train.steps >= {restored[1]}, or use a new --workdir")
    recorded = history[-1].get("data_fingerprints", fingerprints) if history else fingerprints
    if (moved_data := sorted(k for k in fingerprints if recorded.get(k) != fingerprints[k])):
      raise ValueError(
          f"cannot resume {workdir} at step {restored[1]}: the token data of "
          f"{', '.join(moved_data)} changed since the last start (its content fingerprint "
          "differs: re-prepared?), so the saved data position points into other data. Restore "
          "the data, or use a new --workdir")
    data_keys = DATA_KEYS + (("data.seq_len",) if cfg.data.kind == "tokens" else ())
    moved = [k for k in data_keys if k in changed]
    if moved:
      raise ValueError(f"cannot resume {workdir} at step {restored[1]}: {', '.join(moved)} "
                       f"changed ({shown}), so the saved data-iterator position no longer "
                       "points into the same data stream. Resume with the old values, or use "
                       "a new --workdir")
    if changed:
      log.warning("resuming %s at step %d with a changed config: %s", workdir, restored[1], shown)
  entry = {"step": restored[1] if restored else 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "environment": environment(), "data_fingerprints": fingerprints}
  if changed:
    entry["changed"] = changed
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(
        json.dumps(resolved | {"history": [*history, entry]}, indent=2))
  return restored


def _run(cfg, workdir: epath.Path, preempted: _Preemption, position) -> dict:
  experiment.validate(cfg)
  setup = experiment.resolve(cfg, sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  has_eval = cfg.data.kind != "tokens" or bool(cfg.data.eval_path)
  v = setup.model.vocab_size
  # Built now, so that a bad data.eval_path fails before step 1.
  data = pipeline.DataConfig.of(cfg.data)
  eval_source = (pipeline.make_source(data, v, split="eval", seed=setup.seed) if has_eval
                 else None)
  source = pipeline.make_source(data, v, split="train", seed=setup.seed)
  data_iter = iter(pipeline.make_dataset(source, global_batch_size=setup.batch_size,
                                         seed=setup.seed, shuffle=cfg.data.shuffle))
  state, shardings = train.init_state(jax.random.key(setup.seed), setup)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=cfg.checkpoint.every,
                                 keep=cfg.checkpoint.keep)
  try:
    restored = _resume(cfg, workdir, ckpt, sharding.abstract_like(state, shardings), data_iter)
    start = 0
    if restored is not None:
      state, start = restored
      log.info("resumed %s from step %d", workdir, start)
    if preempted.requested:
      raise Preempted(f"{preempted.requested} during start-up: exiting before step "
                      f"{start + 1}, nothing saved")
    loop = Loop(setup, Cadence.of(cfg), divergence.Guard.from_config(cfg),
                cfg.train.divergence_action == "stop")
    logger = logs.Logger(experiment.resolved(cfg), workdir, setup.steps, start, position)
    return _train(loop, workdir, state, start, data_iter, eval_source, ckpt, preempted, logger)
  finally:
    ckpt.close()


@dataclasses.dataclass(frozen=True)
class Loop:
  """What the training loop needs besides its state and data."""

  setup: Setup
  cadence: Cadence
  guard: divergence.Guard | None
  stop_diverging: bool  # train.divergence_action='stop'


def _train(loop: Loop, workdir, state, start, data_iter, eval_source, ckpt, preempted,
           logger) -> dict:
  """Steps start+1 .. train.steps, then the summary."""
  setup, cadence, guard = loop.setup, loop.cadence, loop.guard
  every, realized_every = cadence.bottleneck_every, cadence.realized_cosine_every
  carry = train.RangeMapCarry(setup) if train.carries_range_map(setup) else None
  steps = {(b, r): train.make_train_step(setup, with_bottleneck=b, with_realized=r,
                                         carry_range_map=b and carry is not None)
           for b in (True, False) for r in (True, False)}  # each compiled on first use
  eval_step = train.make_eval_step(setup)
  batch_sh = sharding.batch_sharding(setup.mesh)
  tokens_per_step = setup.batch_size * setup.seq_len
  total = setup.steps
  pending, last = None, {}
  t_log, step_log = time.perf_counter(), start

  def finish(step: int, metrics, extra: dict) -> None:
    """Host-side handling of step `step`'s metrics (fetched while the next step runs)."""
    nonlocal t_log, step_log, last
    m = _host(metrics) | extra
    if carry is not None:
      carry.observe(m)
    bad = [k for k in train.GUARDED if not math.isfinite(m[k])]
    if bad:
      ckpt.wait()
      raise FloatingPointError(
          f"non-finite {bad[0]} at step {step} ({', '.join(f'{k}={m[k]}' for k in bad)}); "
          f"its update was not applied or saved (last checkpoint kept: "
          f"{ckpt.steps()[-1:] or 'none'})")
    if guard is not None and (message := guard.update(step, m["loss"], m["grad_norm"])):
      if loop.stop_diverging:
        ckpt.wait()
        raise FloatingPointError(f"diverging (train.divergence_action='stop'): {message}; last "
                                 f"checkpoint kept: {ckpt.steps()[-1:] or 'none'}")
      log.warning("diverging: %s", message)
    m.update(step=step, tokens_seen=step * tokens_per_step)
    if step % cadence.log_every == 0 or step == total or extra:  # never drop an eval
      now = time.perf_counter()
      m["tokens_per_sec"] = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
      t_log, step_log = now, step
      logger.write(m)
      logger.progress(step, m)
    last = m

  try:
    for step in range(start + 1, total + 1):
      batch = pipeline.global_batch(next(data_iter), batch_sh)
      with_b = every > 0 and (step % every == 0 or step == total)
      with_r = with_b and realized_every > 0 and (step % realized_every == 0 or step == total)
      if with_b and carry is not None:  # W's range map, refined from the last metric step's
        state, metrics, range_map = steps[with_b, with_r](state, batch, carry.start())
        carry.update(range_map)
      else:
        state, metrics = steps[with_b, with_r](state, batch)
      eval_due = ((cadence.eval_every and step % cadence.eval_every == 0)
                  or (step == total and cadence.eval_batches))  # the final eval is logged too
      extra = (evaluate(setup, cadence.eval_batches, eval_step, state.params, eval_source)
               if eval_due and eval_source is not None else {})
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, extra)
      stop = preempted(step)
      if stop or ckpt.due(step):  # a step's metrics are checked (and kept) before it is saved
        finish(*pending)
        pending = None
        ckpt.save(step, state, data_iter, force=True)
      if stop:
        ckpt.wait()
        raise Preempted(f"{preempted.requested or 'preempted'}: saved step {step} to {workdir}, "
                        "exiting; run the same command again to resume")
    if pending is not None:
      finish(*pending)
    ckpt.save(total, state, data_iter, force=True)
    ckpt.wait()  # summary.json only once the final checkpoint has committed
  finally:
    logger.close()

  if not last and start == total:  # resumed at the end: the last record is on disk
    last = _records(workdir)[-1]
  summary = last | {"steps": total}
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
