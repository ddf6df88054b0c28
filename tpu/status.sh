#!/usr/bin/env bash
# shellcheck disable=SC2016 # the remote command's $ expands on the workers
# Usage: tpu/status.sh [options]
#
# Shows the queued resource (its state: WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, ...),
# then, on every worker, which runs started by tpu/run.sh are alive and the last line of each log.
# The second part needs an ACTIVE slice.
#
#   --name, --zone, --project   the slice (env LMHEAD_TPU_NAME, LMHEAD_TPU_ZONE, LMHEAD_TPU_PROJECT)
#   --dry-run           print the gcloud commands, run nothing
#   -h, --help          this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

parse_args "$@"
(( ${#ARGS[@]} == 0 )) || die "unexpected argument(s): ${ARGS[*]}"

run_or_print gcloud compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}"
on_workers all "status failed" 'n=0; for f in lmhead_logs/*.pid; do
    [ -e "$f" ] && ps -o stat= -p "$(cat "$f")" | grep -q "^[^Z]" || continue;
    n=$((n + 1)); r=$(basename "$f" .pid);
    echo "$(hostname): $r running: $(tail -n 1 "lmhead_logs/$r.log")";
  done; [ "$n" -gt 0 ] || echo "$(hostname): no run going"'
