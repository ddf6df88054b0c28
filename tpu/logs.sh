#!/usr/bin/env bash
# shellcheck disable=SC2016 # the remote command's $ expands on the workers
# Usage: tpu/logs.sh [options]
#
# Prints the end of a run's log (~/lmhead_logs/RUN.log) on every worker, or on one, each line
# prefixed with the worker's host name.
#
#   --name, --zone, --project   the slice (env LMHEAD_TPU_NAME, LMHEAD_TPU_ZONE, LMHEAD_TPU_PROJECT)
#   --run NAME          the run (see tpu/run.sh; default: each worker's newest log)
#   --worker N          one worker, by index (default: all)
#   --lines N           how many lines (default 50)
#   --follow            keep printing new lines (tail -f) until interrupted
#   --dry-run           print the gcloud command, run nothing
#   -h, --help          this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

RUN=''
WORKER=all
LINES=50
FOLLOW=0
OPTIONS+=([run]=RUN [worker]=WORKER [lines]=LINES)
SWITCHES+=([follow]=FOLLOW)
parse_args "$@"
(( ${#ARGS[@]} == 0 )) || die "unexpected argument(s): ${ARGS[*]}"
[[ $RUN =~ ^[A-Za-z0-9_.-]*$ ]] || die "bad --run '$RUN': use letters, digits, '_', '.', '-'"
[[ $WORKER =~ ^(all|[0-9]+)$ ]] || die "bad --worker '$WORKER': a worker index or 'all'"
[[ $LINES =~ ^[0-9]+$ ]] || die "bad --lines '$LINES': a number"

log="f=lmhead_logs/$RUN.log;"
[[ -n $RUN ]] || log='f=$(ls -t lmhead_logs/*.log 2>/dev/null | head -n 1);'
tail="tail -n $LINES"
if (( FOLLOW )); then tail+=' -f'; fi
on_workers "$WORKER" "logs failed" "$log"'
  [ -f "$f" ] || { echo "$(hostname): no log ${f:-in ~/lmhead_logs}"; exit 1; };
  '"$tail"' "$f" | sed -u "s/^/$(hostname): /"'
