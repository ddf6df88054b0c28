# shellcheck shell=bash disable=SC2034 # experiment, preset and workdir are read by the caller
# The EXPERIMENT PRESET WORKDIR arguments of gpu/submit.sh and tpu/run.sh, and the local check of
# their config; sourced, not run. The caller defines ROOT (the checkout), die and warn.

# experiment_args EXPERIMENT PRESET WORKDIR [overrides...]: checks the first three and sets
# experiment, preset and workdir; dies naming the bad one. EXPERIMENT must name a file
# experiments/EXPERIMENT.py of the checkout (env LMHEAD_EXPERIMENTS_DIR points to another directory
# named experiments; check_config runs in its parent).
experiment_args() {
  (( $# >= 3 )) ||
    die "expected EXPERIMENT PRESET WORKDIR [overrides...], got $# argument(s) (see --help)"
  experiment=$1 preset=$2 workdir=$3
  experiments_dir=${LMHEAD_EXPERIMENTS_DIR:-$ROOT/experiments}
  local f known=()
  if [[ ! $experiment =~ ^[A-Za-z_][A-Za-z0-9_]*$ || ! -f $experiments_dir/$experiment.py ]]; then
    for f in "$experiments_dir"/*.py; do
      [[ $f == */__init__.py || ! -f $f ]] || known+=("$(basename "$f" .py)")
    done
    die "unknown experiment '$experiment': no file $experiments_dir/$experiment.py" \
      "(known: ${known[*]:-none})"
  fi
  [[ $preset =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad PRESET '$preset': use letters, digits, '_', '.', '-'"
  [[ -n $workdir ]] || die "empty WORKDIR"
}

# check_config SKIP PYTHON INSTALL [overrides...]: resolves and validates the config of experiment
# and preset with the overrides, here and now, as the run would: PYTHON -m experiments.EXPERIMENT
# --config=experiments/EXPERIMENT.py:PRESET --print_config [overrides...]. Dies with the
# experiment's error line when it refuses the config; when PYTHON cannot run the experiment
# (missing, or without the project), dies saying INSTALL (how to install it, or skip the check).
# With SKIP 1 (--no-check), only warns that nothing was checked.
check_config() {
  local skip=$1 python=$2 install=$3 out rc=0 last
  shift 3
  if (( skip )); then
    warn "--no-check: the config of $experiment $preset was not checked here; a bad preset, key" \
      "or value shows only once the run starts"
    return
  fi
  out=$(cd "$(dirname "$experiments_dir")" && "$python" -m "experiments.$experiment" \
          "--config=experiments/$experiment.py:$preset" --print_config "$@" 2>&1 > /dev/null) ||
    rc=$?
  (( rc )) || return 0
  last=${out##*$'\n'}
  if [[ $rc == 12[67] || $last =~ ^(ModuleNotFoundError|ImportError): ]]; then
    die "$python cannot run experiments.$experiment here (${last:-exit status $rc}): $install"
  fi
  die "config of $experiment $preset refused (checked here with experiments.$experiment" \
    "--print_config and the overrides; nothing started): ${last#error: }"
}
