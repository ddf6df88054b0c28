#!/usr/bin/env bash
# Usage: tpu/create.sh [options] [-- extra gcloud flags]
#
# Requests a Cloud TPU VM slice as a queued resource; the TPU node gets the same name. Watch it
# with tpu/status.sh: it is ready when its state is ACTIVE.
#
#   --name NAME         queued resource and TPU name (env LMHEAD_TPU_NAME; required)
#   --zone ZONE         (env LMHEAD_TPU_ZONE; default: gcloud's compute/zone)
#   --project PROJECT   (env LMHEAD_TPU_PROJECT; default: gcloud's core/project)
#   --type TYPE         accelerator type, e.g. v5p-64, v6e-64 (env LMHEAD_TPU_TYPE; default v5p-64)
#   --runtime VERSION   TPU software version (env LMHEAD_TPU_RUNTIME; default by type: v5p
#                       v2-alpha-tpuv5, v6e v2-alpha-tpuv6e, v5e v2-alpha-tpuv5-lite,
#                       v4 tpu-ubuntu2204-base)
#   --spot              Spot capacity: cheaper, may be preempted at any time
#   --preemptible       best-effort tier (gcloud alpha ... --best-effort): preemptible capacity
#   --dry-run           print the gcloud command, run nothing
#   -h, --help          this help
#
# Words after -- go to gcloud as they are, e.g. -- --reserved --network=my-net.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

TPU_TYPE=${LMHEAD_TPU_TYPE:-v5p-64}
RUNTIME=${LMHEAD_TPU_RUNTIME:-}
SPOT=0
PREEMPTIBLE=0
OPTIONS+=([type]=TPU_TYPE [runtime]=RUNTIME)
SWITCHES+=([spot]=SPOT [preemptible]=PREEMPTIBLE)
parse_args "$@"

if [[ -z $RUNTIME ]]; then
  case $TPU_TYPE in
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$TPU_TYPE': pass --runtime VERSION" ;;
  esac
fi
(( SPOT + PREEMPTIBLE < 2 )) || die "--spot and --preemptible exclude each other"

gcloud=(gcloud compute tpus queued-resources create)
tier=()
if (( SPOT )); then tier=(--spot); fi
if (( PREEMPTIBLE )); then
  gcloud=(gcloud alpha compute tpus queued-resources create)
  tier=(--best-effort)
fi
run_or_print "${gcloud[@]}" "$TPU_NAME" --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" \
  --runtime-version="$RUNTIME" "${LOCATION[@]}" "${tier[@]}" "${ARGS[@]}"
