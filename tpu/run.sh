#!/usr/bin/env bash
# shellcheck disable=SC2016 # the remote commands' $ expands on the workers
# Usage: tpu/run.sh [options] EXPERIMENT PRESET WORKDIR [overrides...]
#        tpu/run.sh [options] --stop
#
# Starts, on every worker of the slice at once and detached,
#   python -m experiments.EXPERIMENT --config=experiments/EXPERIMENT.py:PRESET \
#     --workdir=WORKDIR [overrides...]
# in ~/lmhead_jax (see tpu/setup.sh), logging to ~/lmhead_logs/RUN.log on each worker, then checks
# that it is still running on every worker after --wait seconds. WORKDIR is normally gs://bucket/path;
# starting again with the same WORKDIR resumes from its latest checkpoint. Overrides are passed as
# they are, e.g. --config.train.steps=1000.
#
# Before any gcloud call (under --dry-run too) it resolves and validates the config here, with the
# overrides, exactly as the run would:
#   PYTHON -m experiments.EXPERIMENT --config=experiments/EXPERIMENT.py:PRESET --print_config \
#     [overrides...]
# and refuses a bad preset, key or value with the experiment's error line (a second or two).
#
#   --name, --zone, --project   the slice (env LMHEAD_TPU_NAME, LMHEAD_TPU_ZONE, LMHEAD_TPU_PROJECT)
#   --run NAME          name of the logs (default EXPERIMENT-PRESET-YYYYmmdd-HHMMSS)
#   --wait SECONDS      how long a run must survive to count as started (env LMHEAD_WAIT; default 30)
#   --local-python PATH the python of that check, with this project installed
#                       (env LMHEAD_LOCAL_PYTHON; default: .venv/bin/python of this checkout if
#                       there is one, else python3)
#   --no-check          skip that check (a warning says so)
#   --stop              stop every run that run.sh started on the slice (SIGTERM to each)
#   --dry-run           print the gcloud commands, run nothing
#   -h, --help          this help
#
# EXPERIMENT must name a file experiments/EXPERIMENT.py of this checkout (env LMHEAD_EXPERIMENTS_DIR
# points elsewhere).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
# shellcheck source-path=SCRIPTDIR source=../scripts/experiment_args.sh
source "$ROOT/scripts/experiment_args.sh"

RUN=''
WAIT=${LMHEAD_WAIT:-30}
STOP=0
NO_CHECK=0
LOCAL_PYTHON=${LMHEAD_LOCAL_PYTHON:-}
OPTIONS+=([run]=RUN [wait]=WAIT [local-python]=LOCAL_PYTHON)
SWITCHES+=([stop]=STOP [no-check]=NO_CHECK)
parse_args "$@"
set -- "${ARGS[@]}"

if (( STOP )); then
  (( $# == 0 )) || die "--stop takes no arguments, got: $*"
  on_workers all "stopping failed" 'for f in lmhead_logs/*.pid; do
    [ -e "$f" ] && kill -- "-$(cat "$f")" 2>/dev/null &&
      echo "lmhead: stopped $(basename "$f" .pid) on $(hostname)";
  done; true'
  exit 0
fi

experiment_args "$@"
shift 3
[[ $workdir == gs://* ]] || warn "WORKDIR '$workdir' is not on GCS: each worker writes its own copy"
RUN=${RUN:-$experiment-$preset-$(date +%Y%m%d-%H%M%S)}
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --run '$RUN': use letters, digits, '_', '.', '-'"
[[ $WAIT =~ ^[0-9]+$ ]] || die "bad --wait '$WAIT': a number of seconds"
if [[ -z $LOCAL_PYTHON ]]; then
  LOCAL_PYTHON=python3
  [[ ! -x $ROOT/.venv/bin/python ]] || LOCAL_PYTHON=$ROOT/.venv/bin/python
fi
install="install the project in it (pip install -e . in this checkout), set LMHEAD_LOCAL_PYTHON\
 (--local-python) to a python that has it, or pass --no-check to start without the check"
check_config "$NO_CHECK" "$LOCAL_PYTHON" "$install" "$@"

python=$(shquote .venv/bin/python -m "experiments.$experiment" \
  "--config=experiments/$experiment.py:$preset" "--workdir=$workdir" "$@")
run_or_print "${SSH[@]}" --worker=all --command true  # SSH warm-up: gcloud makes and pushes the keys
on_workers all "could not launch $RUN" "r=$RUN; "'mkdir -p lmhead_logs && cd lmhead_jax && {
  PYTHONUNBUFFERED=1 setsid nohup '"$python"' >> "../lmhead_logs/$r.log" 2>&1 < /dev/null &
  echo $! > "../lmhead_logs/$r.pid"; }'
on_workers all "run $RUN did not start" "r=$RUN; sleep $WAIT; "'cd lmhead_logs;
  if ps -o stat= -p "$(cat "$r.pid")" | grep -q "^[^Z]"; then
    echo "lmhead: $r running on $(hostname)";
  else
    echo "lmhead: $r is not running on $(hostname); the end of ~/lmhead_logs/$r.log:";
    tail -n 20 "$r.log"; exit 1;
  fi'
(( DRY_RUN )) || echo "lmhead: $RUN started on every worker; see tpu/logs.sh --run $RUN --follow" >&2
