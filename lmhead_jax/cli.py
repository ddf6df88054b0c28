"""The thin `main` of every experiment module: flags, multi-process start-up, then run."""

import logging
import os
import sys
import threading

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
  """`jax.distributed.initialize` before any other JAX call; a missing peer fails fast.

  JAX aborts the process from C++ when peers never arrive, so a watchdog exits first with a
  message that says what is missing.
  """
  import jax
  if not multi_process():
    return
  timeout = _INIT_TIMEOUT.value
  expected = _NUM_PROCESSES.value or "all"

  def give_up():
    sys.stderr.write(f"multi-process start-up failed: not all {expected} processes joined "
                     f"{_COORDINATOR.value or 'the coordinator'} within {timeout}s; start every "
                     f"process (same --coordinator_address and --num_processes, distinct "
                     f"--process_id)\n")
    sys.stderr.flush()
    os._exit(2)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                             initialization_timeout=timeout + 60)
  watchdog.cancel()


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
