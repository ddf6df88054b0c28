# shellcheck shell=bash disable=SC2034 # ROOT and ARGS are read by the scripts that source this file
# Shared helpers for the tpu/ scripts; sourced, not run.
#
# A script adds its own options to OPTIONS (option -> variable, takes a value) and SWITCHES
# (option -> variable set to 1), then calls parse_args "$@". Every script also takes --name,
# --zone, --project, --dry-run and --help. Options come first: the first other word, or "--",
# starts the positional arguments, which land in ARGS (so overrides such as --config.a=1 pass
# through untouched). --dry-run and --help count wherever they stand, among the positional
# arguments and after "--" too, and are never passed on: a misplaced one must not start anything.

shopt -s extglob
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU_NAME=${LMHEAD_TPU_NAME:-}
TPU_ZONE=${LMHEAD_TPU_ZONE:-}
TPU_PROJECT=${LMHEAD_TPU_PROJECT:-}
DRY_RUN=0
declare -A OPTIONS=([name]=TPU_NAME [zone]=TPU_ZONE [project]=TPU_PROJECT)
declare -A SWITCHES=()
ARGS=()
LOCATION=()  # --zone/--project flags for gcloud, when set
SSH=()       # gcloud compute tpus tpu-vm ssh NAME ...

# Prints the script's header comment.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 && !/^# shellcheck/ { sub(/^# ?/, ""); print }' "$0"; }

die() { echo "${0##*/}: error: $*" >&2; exit 1; }

warn() { echo "${0##*/}: warning: $*" >&2; }

# Prints its arguments as one line of shell words, quoted only where needed.
shquote() {
  local a q="'" words=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      words+=("$a")
    else
      words+=("'${a//$q/$q\\$q$q}'")
    fi
  done
  echo "${words[*]}"
}

parse_args() {
  local key arg rest=()
  for arg in "$@"; do
    case $arg in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --help=*|--dry-run=*) die "${arg%%=*} takes no value" ;;
      *) rest+=("$arg") ;;
    esac
  done
  set -- "${rest[@]}"
  while (( $# )); do
    case $1 in
      --) shift; break ;;
      --*=*)
        key=${1%%=*}; key=${key#--}
        [[ ${OPTIONS[$key]+set} ]] || die "unknown option --$key (see --help)"
        printf -v "${OPTIONS[$key]}" '%s' "${1#*=}" ;;
      --*)
        key=${1#--}
        if [[ ${SWITCHES[$key]+set} ]]; then
          printf -v "${SWITCHES[$key]}" 1
        elif [[ ${OPTIONS[$key]+set} ]]; then
          (( $# > 1 )) || die "option $1 needs a value"
          printf -v "${OPTIONS[$key]}" '%s' "$2"; shift
        else
          die "unknown option $1 (see --help)"
        fi ;;
      *) break ;;
    esac
    shift
  done
  ARGS=("$@")
  [[ -n $TPU_NAME ]] || die "no TPU name: pass --name NAME or set LMHEAD_TPU_NAME"
  [[ -z $TPU_ZONE ]] || LOCATION+=("--zone=$TPU_ZONE")
  [[ -z $TPU_PROJECT ]] || LOCATION+=("--project=$TPU_PROJECT")
  SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}")
}

# With --dry-run prints the command; otherwise echoes it to stderr and runs it.
run_or_print() {
  if (( DRY_RUN )); then shquote "$@"; return; fi
  echo "+ $(shquote "$@")" >&2
  "$@"
}

# on_workers WORKERS WHAT CMD: runs CMD on the workers ("all", or an index) over SSH; if it fails,
# dies with "WHAT on worker(s) ...", naming the workers that gcloud reported as failed. CMD may
# span lines: each line break and the indentation after it become one space.
on_workers() {
  local workers=$1 what=$2 line rc=0 failed=()
  local cmd=("${SSH[@]}" --worker="$workers" --command "${3//$'\n'*( )/ }")
  if (( DRY_RUN )); then shquote "${cmd[@]}"; return; fi
  echo "+ $(shquote "${cmd[@]}")" >&2
  while IFS= read -r line || [[ $line ]]; do
    echo "$line"
    if [[ $line =~ ^'##### Command execution on worker '([0-9]+)' failed' ]]; then
      failed+=("${BASH_REMATCH[1]}")
    fi
  done < <("${cmd[@]}" 2>&1)
  wait $! || rc=$?
  (( rc )) || return 0
  [[ $workers == all ]] || failed=("$workers")
  local IFS=,
  die "$what on worker(s) ${failed[*]:-unknown} (gcloud exit status $rc)"
}
