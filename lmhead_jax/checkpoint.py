"""Checkpoints: the one module that talks to orbax.

Each step directory holds the TrainState ('state') and, when given, every process's grain
iterator state ('data'). Saves are asynchronous and atomic (orbax writes a temporary directory
and renames it when complete), so a crash or SIGKILL mid-save leaves the previous checkpoint as
the latest. Restore walks back from the newest step past any that fail to load, with a warning.
Paths may be local or gs://.
"""

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


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
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    """Starts an async save of `state` (and the iterator) at `step` if due or forced."""
    if not (force or self.due(step)) or step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state, data_iter=None):
    """(state, step) from the newest loadable checkpoint, placed on the abstract state's
    shardings, or None when there is none."""
    for step in reversed(self.steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # a corrupt or partial step: fall back to the previous one
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous",
                    step, self.directory, type(e).__name__, e)
        continue
      return restored["state"], step
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)
