# shellcheck shell=bash disable=SC2034 # experiment, preset and workdir are read by the caller
# The EXPERIMENT PRESET WORKDIR arguments of gpu/submit.sh and tpu/run.sh; sourced, not run.
# The caller defines ROOT (the checkout) and die.

# experiment_args EXPERIMENT PRESET WORKDIR [overrides...]: checks the first three and sets
# experiment, preset and workdir; dies naming the bad one. EXPERIMENT must name a file
# experiments/EXPERIMENT.py of the checkout (env LMHEAD_EXPERIMENTS_DIR points elsewhere).
experiment_args() {
  (( $# >= 3 )) ||
    die "expected EXPERIMENT PRESET WORKDIR [overrides...], got $# argument(s) (see --help)"
  experiment=$1 preset=$2 workdir=$3
  local experiments=${LMHEAD_EXPERIMENTS_DIR:-$ROOT/experiments} f known=()
  if [[ ! $experiment =~ ^[A-Za-z_][A-Za-z0-9_]*$ || ! -f $experiments/$experiment.py ]]; then
    for f in "$experiments"/*.py; do
      [[ $f == */__init__.py || ! -f $f ]] || known+=("$(basename "$f" .py)")
    done
    die "unknown experiment '$experiment': no file $experiments/$experiment.py (known: ${known[*]:-none})"
  fi
  [[ $preset =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad PRESET '$preset': use letters, digits, '_', '.', '-'"
  [[ -n $workdir ]] || die "empty WORKDIR"
}
