"""The thin `main` of every experiment module: flags, multi-process start-up, then run.

A refusal (a bad flag, key or value; a workdir in use; a resume that cannot be exact; bad data
or checkpoints; a failed save or storage request; a non-finite or diverged step) prints one
line, `error: ...`, and exits 2 (1 for a failure during training or of storage); `--verbose`
prints the traceback as well.
`--print_config` prints the resolved config (each run's, for a sweep) after the same checks.
"""

import json
import logging
import os
import sys
import threading
import traceback

from absl import app, flags
from ml_collections import config_flags

from lmhead_jax.runs import experiment, grid

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags of an experiment run; defined on first use so that importing stays side-effect free."""
  if "workdir" in FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, "experiments/<name>.py[:preset]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (local or gs://); required unless "
                      "--print_config.")
  flags.DEFINE_bool("print_config", False, "Print the resolved config as JSON (every key, the "
                    "family flags filled in) and exit.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("distributed_timeout", 120, "Seconds to wait for every process to join.")
  flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal, not just its line.")


# What the project raises on purpose: refusals of input (exit 2) and failures of a run (exit 1).
REFUSED = (ValueError, KeyError, RuntimeError)
FAILED = (OSError, FloatingPointError)


def storage_errors() -> tuple[type[BaseException], ...]:
  """gcsfs's failures that are not OSErrors: an HTTP error after its retries (5xx, 401, 429),
  an aiohttp client error, failed credentials; () without gcsfs. (requests' errors and a
  dropped connection are OSErrors: FAILED, one line too.)"""
  try:
    import aiohttp
    import gcsfs.retry
    import google.auth.exceptions
  except ImportError:
    return ()
  return (gcsfs.retry.HttpError, aiohttp.ClientError, google.auth.exceptions.GoogleAuthError)


def refuse(error: BaseException, verbose: bool, code: int, text: str | None = None):
  """One line, `text` or `error`'s message (`error`'s traceback first with --verbose), then
  exit `code`."""
  if verbose:
    traceback.print_exception(error)
  text = " ".join((text or str(error)).split()) or type(error).__name__
  hint = "" if verbose else " (--verbose for the traceback)"
  sys.stderr.write(f"error: {text}{hint}\n")
  sys.stderr.flush()
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad `--config.*` override refused in one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # a config file's traceback: its flag and its last line
    lines = str(e).strip().splitlines()
    text = f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}" if len(lines) > 1 else None
    refuse(e, "--verbose" in argv, 2, text)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    words = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    name = next((a for a in argv if a.startswith("--config.") and
                 any(w.strip("'\"") in a for w in words.split()[:1])), "a --config override")
    refuse(e, "--verbose" in argv, 2, f"{name.split('=')[0]}: {words}")


def detected_cluster(env=os.environ) -> tuple[str, int] | None:
  """(name, process count) of the job that `jax.distributed.initialize()` detects without
  arguments, read from the environment as JAX reads it (Open MPI's mpirun first, then SLURM's
  srun, then a Cloud TPU slice); None outside such a job. Kubernetes needs --num_processes."""
  def count(key):
    try:
      return int(env[key])
    except ValueError:
      raise ValueError(f"environment variable {key}={env[key]!r} is not a process count") from None
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if "OMPI_COMM_WORLD_SIZE" in env:
    return "Open MPI", count("OMPI_COMM_WORLD_SIZE")
  if all(k in env for k in slurm):
    return "SLURM", count("SLURM_NTASKS")
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  return ("Cloud TPU", len(hosts.split(","))) if hosts else None


def multi_process() -> bool:
  """Explicit flags, or a detected cluster job (SLURM, Open MPI, Cloud TPU) of several processes."""
  cluster = detected_cluster()
  return (bool(FLAGS.coordinator_address) or (FLAGS.num_processes or 1) > 1
          or (cluster is not None and cluster[1] > 1))


def start_distributed() -> None:
  """`jax.distributed.initialize` before any other JAX call; a missing peer fails fast.

  Flags left unset are detected by JAX (SLURM, Open MPI, Cloud TPU). JAX aborts the process
  from C++ when peers never arrive, so a watchdog exits first with a message that says what is
  missing.
  """
  import jax
  if not multi_process():
    return
  timeout = FLAGS.distributed_timeout
  cluster = detected_cluster()
  expected = FLAGS.num_processes or (cluster[1] if cluster else "all")
  how = (f"start every process of the {cluster[0]} job" if cluster and not FLAGS.coordinator_address
         else "start every process (same --coordinator_address and --num_processes, distinct "
              "--process_id)")

  def give_up():
    sys.stderr.write(f"multi-process start-up failed: not all {expected} processes joined "
                     f"{FLAGS.coordinator_address or 'the coordinator'} within {timeout}s; "
                     f"{how}\n")
    sys.stderr.flush()
    os._exit(2)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             initialization_timeout=timeout + 60)
  watchdog.cancel()


def printed_config(cfg) -> str:
  """What --print_config prints: the resolved config as JSON; for a sweep, an object with each
  run's resolved config under its run name."""
  if not cfg.get("sweep"):
    return experiment.resolved(cfg).to_json(indent=2)
  runs = {grid.run_name(o): json.loads(experiment.resolved(grid.configure(cfg, o)).to_json())
          for o in grid.expand(cfg.sweep)}
  return json.dumps(runs, indent=2)


def main(run_fn) -> None:
  """absl entry point: `run_fn(config, workdir)` after flags, config checks (every run of a
  sweep) and distributed start-up; with --print_config, prints the resolved config instead."""
  def _main(argv):
    if len(argv) > 1:
      refuse(app.UsageError(f"unexpected arguments: {argv[1:]} (overrides take the form "
                            "--config.a.b=value)"), FLAGS.verbose, 2)
    # checked here, not by an absl validator, which would fail any later parse (tokamax's)
    if not FLAGS.print_config and not (FLAGS.workdir or "").strip():
      refuse(app.UsageError("--workdir=DIR is required and must not be empty (or pass "
                            "--print_config)"), FLAGS.verbose, 2)
    try:
      experiment.validate_experiment(FLAGS.config)
    except ValueError as e:
      refuse(e, FLAGS.verbose, 2, f"invalid config: {e}")
    if FLAGS.print_config:
      print(printed_config(FLAGS.config))
      return
    logging.getLogger().setLevel(logging.WARNING)  # orbax and grain are chatty at INFO
    logging.getLogger("lmhead_jax").setLevel(logging.INFO)
    if not FLAGS.verbose:  # gcsfs logs the traceback of a request it gives up on; we say it once
      logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    try:
      start_distributed()
      run_fn(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt as e:
      refuse(e, FLAGS.verbose, 130, "interrupted (Ctrl-C) outside the training steps: nothing "
            "was saved by this interruption")
    except FAILED as e:
      refuse(e, FLAGS.verbose, 1)
    except storage_errors() as e:
      refuse(e, FLAGS.verbose, 1, f"Google Cloud Storage: {type(e).__name__}: "
             f"{str(e).strip(' ,')} (gcsfs gave up after its retries)")
    except REFUSED as e:
      refuse(e, FLAGS.verbose, 2)

  define_flags()
  flags.mark_flag_as_required("config")
  app.run(_main, flags_parser=parse_flags)
