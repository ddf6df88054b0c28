"""A run's logs, written on host 0: metrics.jsonl, TensorBoard, Weights & Biases (optional) and
progress on stderr (a tqdm bar on a terminal, otherwise a plain line every
`logging.progress_every_s` seconds); and the listing of a workdir's files printed at the end.

Every write happens in the caller's thread, so a failed one (a full disk, a lost bucket, a dead
W&B service) raises there at once as an OSError naming the file, and the run stops with its last
checkpoint kept. TensorBoard events are written synchronously (tensorboardX's protos; its writer
thread would hang the run when it dies), with the resolved config as text and as HParams at the
start.
On gs://, which has no append, each flush rewrites the object whole (`_ObjectFile`).
W&B writes its own files in a service process that only logs its failures (in its
debug-internal.log): those cannot reach the run.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import sys
import time

import jax
from etils import epath


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a run stands in a sweep: its `name` (`<sweep dir>/<run>`), `index` of `count`, how
  many runs still train after it, and the mean wall time of the runs trained so far."""
  name: str
  index: int
  count: int
  after: int = 0
  run_s: float | None = None

  def __str__(self):
    return f"{self.name} [{self.index}/{self.count}]"


def duration(seconds: float) -> str:
  """`1h02m`, `4m05s` or `12s`."""
  s = round(seconds)
  h, m = s // 3600, s // 60 % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def _files(folder: epath.Path) -> list[epath.Path]:
  """Every file under `folder`, at any depth. (On gs://, epath's `walk` yields folders without
  their gs:// prefix, so each is rebuilt from its path relative to `folder`.)"""
  top = str(folder).split("://")[-1]
  out = []
  for d, _, files in folder.walk():
    rel = os.path.relpath(str(d).split("://")[-1], top)
    out += [(folder if rel == "." else folder / rel) / f for f in files]
  return out


def listing(workdir) -> str:
  """The workdir's files with their sizes, paths relative to it; a folder is one line with its
  file count and total size. Hidden names (`.lock`) are left out."""
  workdir = epath.Path(workdir)
  lines = []
  for path in sorted(workdir.iterdir()):
    if path.name.startswith("."):
      continue
    if path.is_dir():
      sizes = [f.stat().length for f in _files(path)]
      lines.append(f"  {path.name}/  {len(sizes)} files, {_size(sum(sizes))}")
    else:
      lines.append(f"  {path.name}  {_size(path.stat().length)}")
  return f"files in {workdir}:\n" + "\n".join(lines)


class _ObjectFile:
  """A binary file on an object store: its bytes are kept here and each `flush` uploads them
  whole, so a flushed record is in the bucket (a kill loses nothing flushed) and a file opened
  to append keeps what the object held. The logs stay small: a few KB per hundred records."""

  def __init__(self, path: epath.Path, append: bool):
    self.path, self.dirty = path, True
    self.data = bytearray(path.read_bytes() if append and path.exists() else b"")

  def write(self, data: bytes):
    self.data += data
    self.dirty = True

  def flush(self):
    if self.dirty:
      self.path.write_bytes(bytes(self.data))
      self.dirty = False

  close = flush


def _open_binary(path: epath.Path, append: bool):
  """`path` opened to write bytes, appending or from empty; an `_ObjectFile` on gs://."""
  if "://" in str(path):
    return _ObjectFile(path, append)
  return path.open("ab" if append else "wb")


@contextlib.contextmanager
def _writing(what):
  """An OSError inside is raised again naming `what` (a file or W&B run); as a decorator, the
  same around each call."""
  try:
    yield
  except OSError as e:
    raise OSError(f"cannot write {what}: {e}") from e


def repair_tail(path) -> int:
  """Drops a torn last record of a JSON-lines file (a kill mid-write: no newline at its end, or
  not JSON), with a warning naming the file; returns the bytes dropped. A local file is cut in
  place, so a kill or a full disk meanwhile loses nothing else."""
  path = epath.Path(path)
  data = path.read_bytes()
  start = data.rfind(b"\n", 0, len(data) - 1) + 1  # of the last line
  try:
    whole = data.endswith(b"\n") and (start == len(data) or json.loads(data[start:]) is not None)
  except ValueError:
    whole = False
  if not data or whole:
    return 0
  cut = start if data.endswith(b"\n") else data.rfind(b"\n") + 1
  if "://" in str(path):
    path.write_bytes(data[:cut])  # an object store replaces the whole object at once
  else:
    os.truncate(path, cut)
  log.warning("%s: dropped a torn last record (%d bytes, a run killed mid-write)", path,
              len(data) - cut)
  return len(data) - cut


def _wandb(cfg, workdir: epath.Path, position: Position | None):
  """A W&B run for `logging.wandb_project` (None when off), named after the run; its files go to
  $WANDB_DIR, else the (local) workdir. The same W&B run continues when the workdir resumes."""
  project, mode = cfg.logging.wandb_project, cfg.logging.wandb_mode
  if not project or mode == "disabled":
    return None
  import wandb
  id_file = workdir / "wandb_id"
  run_id = id_file.read_text() if id_file.exists() else secrets.token_hex(6)
  id_file.write_text(run_id)
  local = "://" not in str(workdir)
  return wandb.init(
      project=project, entity=cfg.logging.wandb_entity or None, mode=mode or None,
      name=position.name if position else workdir.name, id=run_id, resume="allow",
      group=position.name.rpartition("/")[0] if position else None,
      dir=os.environ.get("WANDB_DIR") or (str(workdir) if local else None),
      config=cfg.to_dict())


# The metrics TensorBoard's HParams dashboard shows against the hyperparameters.
HPARAM_METRICS = ("loss", "eval/loss", "eval/accuracy", "bottleneck/destroyed_ratio")


def flat_hparams(tree: dict, prefix: str = "") -> dict:
  """The config's leaves as {dotted key: number, bool or string} (None and tuples as text)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out |= flat_hparams(v, f"{prefix}{k}.")
    else:
      out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return out


class TensorBoard:
  """An event file in `logdir` (local or gs://), written and flushed in the caller's thread. It
  opens with the resolved config as a text summary and as HParams (every leaf, against
  HPARAM_METRICS), so that TensorBoard's HParams dashboard compares the runs of a sweep."""

  def __init__(self, logdir: epath.Path, config: dict):
    from tensorboardX import summary
    self.summary = summary
    self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.file = _open_binary(self.path, append=False)
    try:
      self.event(0, file_version="brain.Event:2")
      self.event(0, summary=summary.text("config", json.dumps(config, indent=2)))
      experiment, session_start, _ = summary.hparams(flat_hparams(config),
                                                     dict.fromkeys(HPARAM_METRICS, 0.0))
      self.event(0, summary=experiment)
      self.event(0, summary=session_start)
    except OSError:
      with contextlib.suppress(OSError):  # flushing what did not fit fails again
        self.file.close()
      raise

  def event(self, step: int, **fields):
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    data = event_pb2.Event(wall_time=time.time(), step=step, **fields).SerializeToString()
    header = len(data).to_bytes(8, "little")
    with _writing(self.path):
      self.file.write(header + masked_crc32c(header).to_bytes(4, "little") + data
                      + masked_crc32c(data).to_bytes(4, "little"))
      self.file.flush()

  def scalars(self, step: int, values: dict):
    summary = self.summary.scalar  # one event for all values of the step
    merged = type(summary("x", 0.0))(value=[v for k, x in values.items()
                                            for v in summary(k, x).value])
    self.event(step, summary=merged)

  def close(self):
    with _writing(self.path):
      self.file.close()


class Logger:
  """Every record goes to metrics.jsonl, TensorBoard and W&B; `progress` shows where the run is.
  `cfg` is the run's resolved config (what config.json holds): W&B and TensorBoard record it."""

  def __init__(self, cfg, workdir: epath.Path, total: int, start: int,
               position: Position | None = None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.total, self.position = total, position
    self.every_s = float(cfg.logging.progress_every_s)
    self.started = time.perf_counter()
    self.first = None  # (time, step) of the first progress, after compiling: the rate's origin
    self.printed = -math.inf
    self.failed = False  # a write raised: closing may meet the same failure again
    self.opened = contextlib.ExitStack()  # each writer's close, run in reverse order
    try:
      self.wandb = _wandb(cfg, workdir, position)
      if self.wandb is not None:
        self.wandb_name = f"W&B run {self.wandb.id} ({self.wandb.dir})"
        self.opened.callback(_writing(self.wandb_name)(self.wandb.finish))
      self.jsonl_path = workdir / "metrics.jsonl"
      if self.jsonl_path.exists():
        repair_tail(self.jsonl_path)
      self.jsonl = _open_binary(self.jsonl_path, append=True)
      self.opened.callback(_writing(self.jsonl_path)(self.jsonl.close))
      self.tb = TensorBoard(workdir, json.loads(cfg.to_json()))
      self.opened.callback(self.tb.close)
      self.bar = None
      if sys.stderr.isatty():
        import tqdm
        self.bar = self.opened.enter_context(tqdm.tqdm(
            total=total, initial=start, desc=str(position or "train"), dynamic_ncols=True,
            mininterval=1.0))
    except BaseException:
      self.failed = True  # what opened is closed again; the failure to open is the one raised
      self.close()
      raise

  def write(self, record: dict):
    if not self.active:
      return
    self.failed = True  # until this record is written everywhere
    with _writing(self.jsonl_path):
      self.jsonl.write((json.dumps(record) + "\n").encode())
      self.jsonl.flush()
    self.tb.scalars(record["step"], {k: v for k, v in record.items() if k != "step" and
                                     isinstance(v, (int, float)) and math.isfinite(v)})
    if self.wandb is not None:
      with _writing(self.wandb_name):
        self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    self.failed = False

  def _etas(self, step: int, now: float) -> dict:
    """The run's ETA and, in a sweep, the sweep's: runs yet to train take the mean wall time
    of those trained so far (this run's own projected time while there are none)."""
    t0, step0 = self.first
    if step <= step0:
      return {}
    run = (self.total - step) * (now - t0) / (step - step0)
    out = {"ETA": duration(run)}
    if self.position and self.position.after:
      each = self.position.run_s or now - self.started + run
      out["sweep ETA"] = duration(run + self.position.after * each)
    return out

  def progress(self, step: int, m: dict):
    if not self.active:
      return
    now = time.perf_counter()
    self.first = self.first or (now, step)
    post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m.get('tokens_per_sec', 0):.0f}"}
    if "bottleneck/destroyed_ratio" in m:
      post["destroyed"] = f"{m['bottleneck/destroyed_ratio']:.4f}"
    if "eval/loss" in m:
      post["eval/loss"] = f"{m['eval/loss']:.4f}"
    etas = self._etas(step, now)
    if self.bar is not None:
      self.bar.n = step
      etas.pop("ETA", None)  # the bar shows its own
      self.bar.set_postfix(post | etas, refresh=False)
      self.bar.refresh()
    elif step == self.total or now - self.printed >= self.every_s:
      self.printed = now
      fields = " ".join(f"{k} {v}" for k, v in (post | etas).items())
      print(f"{self.position or 'train'} step {step}/{self.total} {fields}", file=sys.stderr,
            flush=True)

  def close(self):
    """Closes every writer, even when one fails; after a failed write, the same failure met
    again while flushing buffers on close is not raised a second time."""
    if self.active:
      try:
        self.opened.close()
      except OSError:
        if not self.failed:
          raise
