#!/usr/bin/env bash
# Copy every worker's log of one run back to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --run-id ID [options]

Copy ~/REMOTE_DIR/logs/ID/*.log from every worker (of every node) into LOG_DIR/ID/: one
file per worker host. run.sh does this itself at the end of a run; use this script for a
run whose ssh session was lost, or to look at a run in progress.

  --name NAME          TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE          (env DASD_ZONE)
  --project PROJECT    default: gcloud's configured project (env DASD_PROJECT)
  --node-count K       the queued resource has K slices (nodes NAME-0 ... NAME-(K-1))
  --run-id ID          the run (run.sh printed it; the folder name under logs/)
  --log-dir DIR        local folder (default $LOG_DIR; env DASD_LOG_DIR)
  --workers N          workers per node (default: read with describe; needed with --dry-run)
  --remote-dir DIR     project folder under the workers' home (default $REMOTE_DIR)
  --dry-run            print the commands, one per line, and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project node-count run-id log-dir workers remote-dir dry-run" "$@"
require_target
[[ -n $RUN_ID ]] || usage_error "--run-id is required"
if ((DRY_RUN)) && [[ -z $WORKERS ]]; then
  usage_error "--dry-run needs --workers N: without it the worker count is read with describe"
fi
do_fetch_logs
