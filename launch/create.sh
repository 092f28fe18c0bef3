#!/usr/bin/env bash
# Create a Cloud TPU VM, or (--queued) a queued resource, and optionally wait until usable.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a queued resource
(gcloud compute tpus queued-resources create), whose node is named NAME (NAME-0 ...
NAME-(K-1) with --node-count K).

  --name NAME              TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE              e.g. us-east5-a (env DASD_ZONE)
  --project PROJECT        default: gcloud's configured project (env DASD_PROJECT)
  --accelerator-type TYPE  e.g. v6e-64, v5p-128 (env DASD_ACCELERATOR_TYPE)
  --runtime-version V      TPU software image; default from the type: v6e v2-alpha-tpuv6e,
                           v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                           v4 tpu-ubuntu2204-base (env DASD_RUNTIME_VERSION)
  --queued                 request a queued resource instead of a TPU VM
  --tier TIER              on-demand (default), spot, reserved, best-effort (queued only;
                           uses gcloud alpha)
  --node-count K           K slices (multislice; queued only), nodes NAME-0 ... NAME-(K-1)
  --service-account SA     service account of the VMs (needs read/write on your bucket)
  --scopes SCOPES          comma-separated OAuth scopes for that service account
  --wait                   then poll until READY / ACTIVE (see wait.sh)
  --timeout SECONDS        with --wait: give up after this long (default $TIMEOUT)
  --interval SECONDS       with --wait: seconds between polls (default $INTERVAL)
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               this help
USAGE
}

parse_flags "name zone project accelerator-type runtime-version queued tier node-count
  service-account scopes wait timeout interval dry-run" "$@"
require_target
check_create_flags
do_create
if ((WAIT)); then
  do_wait
fi
