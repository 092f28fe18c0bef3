#!/usr/bin/env bash
# Delete a TPU VM, or (--queued) a queued resource and its nodes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--queued] [options]

Delete the TPU VM NAME, or with --queued the queued resource NAME together with its nodes
(--force). Nothing is asked (--quiet). Whatever was on the workers' disks is gone: keep
outputs and checkpoints on gs://.

  --name NAME          TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE          (env DASD_ZONE)
  --project PROJECT    default: gcloud's configured project (env DASD_PROJECT)
  --queued             NAME is a queued resource
  --dry-run            print the command and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project queued dry-run" "$@"
require_target
do_delete
