"""The thin `main` of every experiment module: flags, multi-process start-up, then run."""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<name>.py[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 120,
                                     "Seconds to wait for every process to join.")


def multi_process() -> bool:
  """Explicit flags, or a Cloud TPU slice with several workers."""
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return bool(_COORDINATOR.value) or (_NUM_PROCESSES.value or 1) > 1 or "," in workers


def start_distributed() -> None:
  """`jax.distributed.initialize` before any other JAX call; a missing peer fails fast."""
  import jax
  if not multi_process():
    return
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               initialization_timeout=_INIT_TIMEOUT.value)
  except Exception as e:
    raise SystemExit(
        f"multi-process start-up failed: not all {_NUM_PROCESSES.value or 'expected'} processes "
        f"joined {_COORDINATOR.value or 'the coordinator'} within {_INIT_TIMEOUT.value}s "
        f"({type(e).__name__}: {e})") from e


def main(run_fn) -> None:
  """absl entry point: `run_fn(config, workdir)` after flags and distributed start-up."""
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    flags.mark_flags_as_required(["config", "workdir"])
    logging.getLogger().setLevel(logging.WARNING)  # orbax and grain are chatty at INFO
    logging.getLogger("lmhead_jax").setLevel(logging.INFO)
    start_distributed()
    run_fn(_CONFIG.value, _WORKDIR.value)

  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
