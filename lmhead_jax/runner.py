"""The train/eval loop shared by experiments: data, steps, logs, checkpoints, resume, preemption.

Outputs under `workdir`: config.json, metrics.jsonl (appended; on resume, steps after the
checkpoint are logged again and readers keep each step's last record), TensorBoard events,
summary.json and checkpoints/. Host 0 writes the logs; every host takes part in checkpoints.
"""

import json
import logging
import math
import signal
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lmhead_jax import checkpoint, sharding, train
from lmhead_jax.data import pipeline

log = logging.getLogger(__name__)

# Keys whose change alters parameter or optimizer-state shapes: a workdir cannot resume across them.
SHAPE_KEYS = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
              "model.n_kv_heads", "model.d_ff", "model.head_dim", "model.family",
              "model.tie_embeddings", "head.kind", "head.rank", "optimizer.name")


class _Preemption:
  """SIGTERM (one process) or JAX's preemption sync point (many) asks for save-and-exit."""

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _lookup(d: dict, dotted: str):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def check_resumable(workdir: epath.Path, cfg) -> None:
  """Refuses a workdir whose config.json differs from `cfg` on a shape-changing key."""
  path = workdir / "config.json"
  if not path.exists():
    return
  old, new = json.loads(path.read_text()), cfg.to_dict()
  for key in SHAPE_KEYS:
    if _lookup(old, key) != _lookup(new, key):
      raise ValueError(f"{workdir} holds a run with {key}={_lookup(old, key)!r}, but the config "
                       f"asks for {key}={_lookup(new, key)!r}; use a new --workdir")


class _Logger:
  """metrics.jsonl, TensorBoard and a progress bar, on host 0 only."""

  def __init__(self, workdir: epath.Path, total: int, start: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    import tqdm
    from tensorboardX import SummaryWriter
    self.jsonl = (workdir / "metrics.jsonl").open("a")
    self.tb = SummaryWriter(str(workdir))
    self.bar = tqdm.tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                         mininterval=1.0)

  def write(self, record: dict):
    if not self.active:
      return
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, record["step"])

  def progress(self, step: int, m: dict):
    if not self.active:
      return
    self.bar.n = step
    post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m.get('tokens_per_sec', 0):.0f}"}
    if "bottleneck/destroyed_ratio" in m:
      post["destroyed"] = f"{m['bottleneck/destroyed_ratio']:.4f}"
    self.bar.set_postfix(post, refresh=False)
    self.bar.refresh()

  def close(self):
    if self.active:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()


def evaluate(cfg, mesh, eval_step, params) -> dict:
  """Mean loss and accuracy over `train.eval_batches` held-out batches (the same each time)."""
  source = pipeline.make_source(cfg.data, cfg.model.vocab_size, split="eval", seed=cfg.seed)
  ds = pipeline.make_dataset(source, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                             shuffle=False)
  it, total, n = iter(ds), {"loss": 0.0, "accuracy": 0.0}, 0.0
  for _ in range(int(cfg.train.eval_batches)):
    out = jax.device_get(eval_step(params, pipeline.global_batch(next(it),
                                                                 sharding.batch_sharding(mesh))))
    for k in total:
      total[k] += float(out[k]) * float(out["n"])
    n += float(out["n"])
  return {f"eval/{k}": v / max(n, 1.0) for k, v in total.items()}


def _last_record(workdir: epath.Path) -> dict:
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return json.loads(lines[-1]) if lines else {}


def _host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(cfg, workdir) -> dict:
  """Trains (or resumes) one run into `workdir`; returns the summary."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_resumable(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  train.validate(cfg, mesh)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(cfg.to_json(indent=2))

  source = pipeline.make_source(cfg.data, cfg.model.vocab_size, split="train", seed=cfg.seed)
  data_iter = iter(pipeline.make_dataset(source, global_batch_size=cfg.train.batch_size,
                                         seed=cfg.seed, shuffle=cfg.data.shuffle))
  state, shardings = train.init_state(jax.random.key(cfg.seed), cfg, mesh)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=cfg.checkpoint.every,
                                 keep=cfg.checkpoint.keep)
  restored = ckpt.restore_latest(checkpoint.abstract_like(state, shardings), data_iter)
  start = 0
  if restored is not None:
    state, start = restored
    log.info("resumed %s from step %d", workdir, start)

  every = int(cfg.train.bottleneck_every)
  steps = {True: train.make_train_step(cfg, mesh, with_bottleneck=True),
           False: train.make_train_step(cfg, mesh, with_bottleneck=False)}
  eval_step = train.make_eval_step(cfg, mesh)
  has_eval = cfg.data.kind != "tokens" or bool(cfg.data.eval_path)
  batch_sh = sharding.batch_sharding(mesh)
  tokens_per_step = int(cfg.train.batch_size) * int(cfg.data.seq_len)
  total = int(cfg.train.steps)
  logger = _Logger(workdir, total, start)
  preempted = _Preemption()
  pending, last = None, {}
  t_log, step_log = time.perf_counter(), start

  def finish(step: int, metrics, extra: dict) -> None:
    """Host-side handling of step `step`'s metrics (fetched while the next step runs)."""
    nonlocal t_log, step_log, last
    m = _host(metrics) | extra
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(m[k])]
    if m.pop("nonfinite") or bad:
      ckpt.wait()
      raise FloatingPointError(f"non-finite {', '.join(bad) or 'value'} at step {step} "
                               f"(last checkpoint kept: {ckpt.steps()[-1:] or 'none'})")
    m.update(step=step, tokens_seen=step * tokens_per_step)
    if step % int(cfg.train.log_every) == 0 or step == total or extra:  # never drop an eval
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
      state, metrics = steps[with_b](state, batch)
      eval_due = has_eval and cfg.train.eval_every and step % int(cfg.train.eval_every) == 0
      extra = evaluate(cfg, mesh, eval_step, state.params) if eval_due else {}
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, extra)
      ckpt.save(step, state, data_iter)
      if preempted(step):
        finish(*pending)
        ckpt.save(step, state, data_iter, force=True)
        ckpt.close()
        log.warning("preempted: saved step %d to %s, exiting", step, workdir)
        raise SystemExit(0)
    if pending is not None:
      finish(*pending)
    ckpt.save(total, state, data_iter, force=True)
  finally:
    ckpt.close()
    logger.close()

  if not last and start == total:  # resumed at the end: the last record is on disk
    last = _last_record(workdir)
  summary = {k: v for k, v in last.items() if not k.startswith("eval/")}
  if has_eval and cfg.train.eval_batches:
    summary.update(evaluate(cfg, mesh, eval_step, state.params))
  summary["steps"] = total
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
