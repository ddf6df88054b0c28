"""Checkpoints: the one module that talks to orbax.

Each step directory holds the TrainState ('state'), every process's grain iterator state
('data', when given) and a checksum of all of it ('checksum': the step number, a fingerprint of
every state array and of every process's iterator state). Saves are asynchronous and atomic
(a step counts once complete: renamed from a temporary directory, or on gs:// given its
commit_success.txt), so a crash or SIGKILL mid-save leaves the previous checkpoint as the latest.
A save that fails raises `CheckpointError` at the next save or `wait`, naming the step and the
cause, on gs:// in bounded time too (`bound_gcs`). A non-finite state is never saved.

Restore first compares the checkpoint's metadata (tree, shapes, dtypes) with the run's abstract
state and refuses a mismatch (`StateMismatch`). A step that cannot be read or fails its checksum
is corrupt: restore falls back to the previous step with a warning, and raises
`CheckpointError` when checkpoints exist but none can be restored. Paths may be local or gs://.
"""

import json
import logging
import os
import zlib

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.serialization import tensorstore_utils

log = logging.getLogger(__name__)

# Environment defaults for gs:// (a value already set wins): tensorstore's curl gives up on a
# transfer with no byte for 60 s and a connect after 30 s (it waits forever by default); gcsfs's
# experimental layer stays off (read when gcsfs is imported, so before any gs:// call).
GCS_ENVIRONMENT = {"TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60",
                   "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1",
                   "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS": "30",
                   "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
# Retries of a failed GCS request: 8, 1 s to 32 s apart, about 2 min in all (the budget of
# Google's Python storage client); tensorstore's own 32 take about 15 min per request.
GCS_RETRIES = {"max_retries": 8, "initial_delay": "1s", "max_delay": "32s"}


def bound_gcs() -> None:
  """Applies GCS_ENVIRONMENT and GCS_RETRIES to this process (idempotent).

  orbax builds every tensorstore context from two module dicts and has no public option for
  them; the retries are added there, and a test checks that they take effect.
  """
  for key, value in GCS_ENVIRONMENT.items():
    os.environ.setdefault(key, value)
  for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
    context.setdefault("gcs_request_retries", GCS_RETRIES)


bound_gcs()


class StateMismatch(ValueError):
  """The checkpoint holds a TrainState of another tree structure, shapes or dtypes."""


class CheckpointError(RuntimeError):
  """A save failed, or checkpoints exist but none can be restored."""


def _first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: message`, cut to its first line (tensorstore errors run to pages)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + " …"


def _iterator_print(data_iter) -> int:
  """crc32 of a grain iterator's state."""
  return zlib.crc32(json.dumps(data_iter.get_state(), sort_keys=True, default=repr).encode())


def _iterator_prints(data_iter) -> list[int]:
  """Every process's `_iterator_print`, in process order (a collective when multi-process)."""
  mine = _iterator_print(data_iter)
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils
  return [int(x) for x in multihost_utils.process_allgather(jnp.uint32(mine))]


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=".")


def _fingerprint(x):
  """Position-weighted wrapping sum of the array's words: any changed word changes it."""
  words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  w = jax.lax.bitcast_convert_type(x, words).astype(jnp.uint32).ravel()
  return jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1), dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(_fingerprint, tree), jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def fingerprints(state) -> tuple[dict[str, int], list[str]]:
  """({array name: fingerprint}, names of arrays with a non-finite value) of a state."""
  prints, finite = jax.device_get(_fingerprints(state))
  flat = lambda t: [(_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(t)]
  return {k: int(f) for k, f in flat(prints)}, [k for k, ok in flat(finite) if not ok]


def differences(abstract_state, tree_metadata) -> list[str]:
  """Arrays whose presence, shape or dtype differ between a run's state and a checkpoint's."""
  ours = {_name(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
  saved = {m.name: (tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(
      tree_metadata, is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))}
  show = lambda s: f"{s[1]}{list(s[0])}" if s else "absent"
  return [f"{k}: checkpoint {show(saved.get(k))}, this run {show(ours.get(k))}"
          for k in sorted(ours.keys() | saved.keys()) if ours.get(k) != saved.get(k)]


class Checkpointer:
  """Async saves every `every` steps (0: only when forced), keeps the newest `keep`."""

  def __init__(self, directory, *, every: int, keep: int):
    self.directory = epath.Path(directory)
    if not self.directory.is_absolute():  # orbax needs absolute paths
      self.directory = epath.Path(os.path.abspath(directory))
    if self.directory.exists():
      partial = [p.name for p in self.directory.iterdir() if "tmp" in p.name]
      if partial:
        log.warning("ignoring incomplete checkpoint(s) %s in %s (interrupted save)", partial,
                    self.directory)
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        # A directory that cannot be created raises in save(), not in a thread that then
        # keeps the process alive for orbax's 300 s signal timeout.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    handlers = {"state": ocp.StandardCheckpointHandler(), "checksum": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._current = set()  # steps on disk that this run saved or restored
    self._saving = None  # the step of the save in flight, if any

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    """Starts an async save of `state` (and the iterator) at `step` if due or forced.

    A step already on disk from an earlier run (one that restore skipped as corrupt, say) is
    replaced. A state with a non-finite value raises FloatingPointError and is not saved.
    """
    if not (force or self.due(step)) or step in self._current:
      return False
    checksum, nonfinite = fingerprints(state)
    if nonfinite:
      raise FloatingPointError(f"refusing to save step {step} to {self.directory}: non-finite "
                               f"values in {', '.join(nonfinite)}")
    self.wait()  # an earlier save's failure surfaces here, naming its step
    if step in self.manager.all_steps():
      self.manager.delete(step)
    record = {"step": step, "arrays": checksum}
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
      record["data"] = _iterator_prints(data_iter)
    items["checksum"] = ocp.args.JsonSave(record)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      raise CheckpointError(f"cannot save checkpoint step {step} in {self.directory}: "
                            f"{_first_line(e)}") from e
    self._current.add(step)
    self._saving = step
    return saved

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _restore(self, step: int, abstract_state, data_iter):
    """The state at `step`; StateMismatch if its shapes differ, another error if corrupt."""
    items = self.manager.item_metadata(step)
    if items.get("state") is None:
      raise ValueError("no readable state metadata")
    diff = differences(abstract_state, items["state"].tree)
    if diff:
      raise StateMismatch(f"checkpoint step {step} in {self.directory} holds a different "
                          f"TrainState ({len(diff)} arrays differ): {'; '.join(diff[:8])}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if "checksum" in items:
      args["checksum"] = ocp.args.JsonRestore()
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    if "checksum" not in items:
      log.warning("checkpoint step %d in %s has no checksum (an older save): not verified", step,
                  self.directory)
      return restored["state"]
    record = restored["checksum"]
    if "arrays" not in record:  # an older save: arrays only
      record = {"step": step, "arrays": record}
    if record.get("step") != step:
      raise ValueError(f"its checksum records step {record.get('step')}: a renamed directory?")
    checksum, _ = fingerprints(restored["state"])
    bad = [k for k in checksum if checksum[k] != record["arrays"].get(k)]
    if bad:
      raise ValueError(f"checksum mismatch in {', '.join(bad)}")
    if data_iter is not None and "data" in record:
      prints, i = record["data"], jax.process_index()
      if (prints[i] if i < len(prints) else None) != _iterator_print(data_iter):
        raise ValueError("checksum mismatch in the data-iterator state")
    return restored["state"]

  def restore_latest(self, abstract_state, data_iter=None):
    """(state, step) from the newest intact checkpoint, placed on the abstract state's
    shardings, or None when there is none."""
    steps, errors = self.steps(), []
    for step in reversed(steps):
      try:
        state = self._restore(step, abstract_state, data_iter)
      except StateMismatch:
        raise
      except Exception as e:  # a corrupt or partial step: fall back to the previous one
        log.warning("checkpoint step %d in %s is corrupt (%s); trying the previous one",
                    step, self.directory, _first_line(e))
        errors.append(f"step {step}: {_first_line(e, 200)}")
        continue
      self._current.add(step)
      return state, step
    if steps:
      raise CheckpointError(
          f"{self.directory} holds checkpoints at steps {steps}, but none can be restored "
          f"({'; '.join(errors)}). To start over, use a new --workdir or delete this "
          "directory and the run's metrics.jsonl")
    return None

  def wait(self):
    """Blocks until the save in flight has committed; CheckpointError if it failed."""
    step, self._saving = self._saving, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._current.discard(step)
      raise CheckpointError(f"checkpoint step {step} in {self.directory} failed to save: "
                            f"{_first_line(e)}") from None
    if step is not None and step not in self.manager.all_steps():
      raise CheckpointError(f"checkpoint step {step} in {self.directory} did not commit")

  def close(self):
    """Waits for the save in flight, then closes; a failed save raises after closing."""
    try:
      self.wait()
    except CheckpointError:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 — the same failure again; the first is raised
        pass
      raise
    self.manager.close()
