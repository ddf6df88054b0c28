#!/usr/bin/env bash
# Usage: gpu/submit.sh [options] EXPERIMENT PRESET WORKDIR [overrides...]
#
# Submits gpu/job.sbatch: one SLURM job of --nodes nodes, one task per node with all its GPUs,
# running from this checkout
#   VENV/bin/python -m experiments.EXPERIMENT --config=experiments/EXPERIMENT.py:PRESET \
#     --workdir=WORKDIR [overrides...]
# The checkout, VENV and WORKDIR must be on storage that every node shares. Submitting again with
# the same WORKDIR (and config) resumes from its latest checkpoint. Overrides are passed as they
# are, e.g. --config.train.steps=1000.
#
# Before sbatch (under --dry-run too) it resolves and validates the config here, with the
# overrides, exactly as the job would:
#   VENV/bin/python -m experiments.EXPERIMENT --config=experiments/EXPERIMENT.py:PRESET \
#     --print_config [overrides...]
# and refuses a bad preset, key or value with the experiment's error line (a second or two).
#
#   --nodes N           nodes (env LMHEAD_NODES; default 1)
#   --gpus-per-node N   GPUs of each node (env LMHEAD_GPUS_PER_NODE; default 8)
#   --time LIMIT        time limit, e.g. 24:00:00 (env LMHEAD_TIME; default: the partition's)
#   --partition NAME    (env LMHEAD_PARTITION; default: the cluster's)
#   --account NAME      (env LMHEAD_ACCOUNT; default: yours)
#   --job-name NAME     (default EXPERIMENT-PRESET)
#   --venv DIR          the venv with lmhead_jax[cuda] installed (env LMHEAD_VENV; default .venv
#                       in this checkout)
#   --logs DIR          the job's output goes to DIR/JOBNAME-JOBID.out (default slurm_logs in
#                       this checkout)
#   --sbatch FLAG       one more sbatch flag, e.g. --sbatch=--qos=high (repeatable)
#   --no-check          skip the config check (a warning says so)
#   --dry-run           print the sbatch command, run nothing
#   -h, --help          this help
#
# --dry-run and --help count wherever they stand. The other options come before EXPERIMENT; the
# words after WORKDIR go to the experiment. EXPERIMENT must name a file experiments/EXPERIMENT.py
# of this checkout (env LMHEAD_EXPERIMENTS_DIR points elsewhere).

set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../scripts/experiment_args.sh
source "$ROOT/scripts/experiment_args.sh"
NODES=${LMHEAD_NODES:-1}
GPUS=${LMHEAD_GPUS_PER_NODE:-8}
TIME=${LMHEAD_TIME:-}
PARTITION=${LMHEAD_PARTITION:-}
ACCOUNT=${LMHEAD_ACCOUNT:-}
JOB_NAME=''
VENV=${LMHEAD_VENV:-$ROOT/.venv}
LOGS=$ROOT/slurm_logs
EXTRA=()
DRY_RUN=0
NO_CHECK=0
declare -A OPTIONS=([nodes]=NODES [gpus-per-node]=GPUS [time]=TIME [partition]=PARTITION
                    [account]=ACCOUNT [job-name]=JOB_NAME [venv]=VENV [logs]=LOGS [sbatch]=EXTRA)

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { echo "${0##*/}: error: $*" >&2; exit 1; }
warn() { echo "${0##*/}: warning: $*" >&2; }

# Sets option $1 (a name in OPTIONS) to $2; --sbatch adds to EXTRA.
set_option() {
  [[ ${OPTIONS[$1]+set} ]] || die "unknown option --$1 (see --help)"
  if [[ $1 == sbatch ]]; then EXTRA+=("$2"); else printf -v "${OPTIONS[$1]}" '%s' "$2"; fi
}

words=()
for a in "$@"; do
  case $a in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    *) words+=("$a") ;;
  esac
done
set -- "${words[@]}"
while (( $# )); do
  case $1 in
    --) shift; break ;;
    --no-check) NO_CHECK=1 ;;
    --*=*) key=${1%%=*}; set_option "${key#--}" "${1#*=}" ;;
    --*)
      [[ ${OPTIONS[${1#--}]+set} ]] || die "unknown option $1 (see --help)"
      (( $# > 1 )) || die "option $1 needs a value"
      set_option "${1#--}" "$2"; shift ;;
    *) break ;;
  esac
  shift
done

experiment_args "$@"
shift 3
[[ $workdir == /* || $workdir == *://* ]] || workdir=$PWD/$workdir  # the job runs in $ROOT
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "bad --nodes '$NODES': a positive number"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "bad --gpus-per-node '$GPUS': a positive number"
JOB_NAME=${JOB_NAME:-$experiment-$preset}
[[ $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --job-name '$JOB_NAME': use letters, digits, '_', '.', '-'"
VENV=$(realpath -m "$VENV") LOGS=$(realpath -m "$LOGS")
[[ $VENV != *,* ]] || die "--venv '$VENV': sbatch --export cannot pass a path with a comma"
[[ -x $VENV/bin/python ]] ||
  die "no $VENV/bin/python: make the venv and pip install -e \".[cuda]\" in it (see gpu/README.md)"
install="pip install -e \".[cuda]\" in $VENV (see gpu/README.md), or pass --no-check to submit\
 without the check"
check_config "$NO_CHECK" "$VENV/bin/python" "$install" "$@"

cmd=(sbatch --parsable "--chdir=$ROOT" "--job-name=$JOB_NAME" "--nodes=$NODES"
     "--gpus-per-node=$GPUS" "--output=$LOGS/%x-%j.out" "--export=ALL,LMHEAD_VENV=$VENV")
[[ -z $TIME ]] || cmd+=("--time=$TIME")
[[ -z $PARTITION ]] || cmd+=("--partition=$PARTITION")
[[ -z $ACCOUNT ]] || cmd+=("--account=$ACCOUNT")
cmd+=("${EXTRA[@]}" "$ROOT/gpu/job.sbatch" "$experiment" "$preset" "$workdir" "$@")
if (( DRY_RUN )); then  # one line of shell words, quoted only where needed
  words=()
  for a in "${cmd[@]}"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$a"); else words+=("${a@Q}"); fi
  done
  echo "${words[*]}"
  exit 0
fi
mkdir -p "$LOGS"
job=$("${cmd[@]}")
job=${job%%;*}  # --parsable prints JOBID or JOBID;CLUSTER
echo "lmhead: submitted job $job ($NODES node(s) × $GPUS GPUs): squeue -j $job;" \
  "log $LOGS/$JOB_NAME-$job.out"
