#!/usr/bin/env bash
# Poll a TPU VM until READY, or (--queued) a queued resource until ACTIVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [--queued] [options]

Poll 'describe' until the TPU VM is READY (with --queued: the queued resource is ACTIVE).
Exits 0 when it is, 3 on a terminal state (FAILED, SUSPENDED, PREEMPTED, ...), 4 on timeout.

  --name NAME          TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE          (env DASD_ZONE)
  --project PROJECT    default: gcloud's configured project (env DASD_PROJECT)
  --queued             NAME is a queued resource
  --timeout SECONDS    give up after this long (default $TIMEOUT)
  --interval SECONDS   seconds between polls (default $INTERVAL)
  --dry-run            print the describe command and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project queued timeout interval dry-run" "$@"
require_target
do_wait
