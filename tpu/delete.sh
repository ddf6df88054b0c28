#!/usr/bin/env bash
# Usage: tpu/delete.sh [options]
#
# Deletes the queued resource and its TPU VM slice (gcloud ... queued-resources delete --force).
# Workdirs on GCS are kept.
#
#   --name, --zone, --project   the slice (env LMHEAD_TPU_NAME, LMHEAD_TPU_ZONE, LMHEAD_TPU_PROJECT)
#   --yes               do not ask for confirmation
#   --dry-run           print the gcloud command, run nothing
#   -h, --help          this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

YES=0
SWITCHES+=([yes]=YES)
parse_args "$@"
(( ${#ARGS[@]} == 0 )) || die "unexpected argument(s): ${ARGS[*]}"

quiet=()
if (( YES )); then quiet=(--quiet); fi
run_or_print gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force "${quiet[@]}"
