#!/usr/bin/env bash
# Run one pipeline stage on every worker of a TPU VM / queued resource; gather the logs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --stage STAGE [options] [key=value ...] [-- key=value ...]

On every worker at once (--worker=all; every node with --node-count K), in ~/REMOTE_DIR:
  DASD_DISTRIBUTED=1 .venv/bin/python -m dasd_jax.launch --stage=STAGE [--config=FILE] key=value ...
Each worker tees its output to ~/REMOTE_DIR/logs/RUN_ID/<hostname>.log; the output streams
here, and afterwards each worker's log is copied to LOG_DIR/RUN_ID/. Exits with the remote
status (non-zero when any worker failed). Stages resume from their own outputs and
checkpoints, so re-running the same command continues an interrupted run.

  --name NAME          TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE          (env DASD_ZONE)
  --project PROJECT    default: gcloud's configured project (env DASD_PROJECT)
  --node-count K       the queued resource has K slices (nodes NAME-0 ... NAME-(K-1))
  --stage STAGE        the stage to run (python -m dasd_jax.launch --help lists them)
  --config FILE        YAML config, relative to REMOTE_DIR (e.g. configs/x.yaml)
  key=value            config overrides, passed on unchanged (quoted for the remote shell)
  --env KEY=VALUE      extra environment for the stage (repeatable)
  --run-id ID          names the log folder (default STAGE-<UTC time>)
  --log-dir DIR        local folder for the fetched logs (default $LOG_DIR; env DASD_LOG_DIR)
  --workers N          workers per node (default: read with describe; needed with --dry-run)
  --no-fetch           do not copy the logs back
  --kill-stale         first stop a dasd_jax.launch left running on the workers
  --remote-dir DIR     project folder under the workers' home (default $REMOTE_DIR)
  --dry-run            print the commands, one per line, and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project node-count stage config overrides env run-id log-dir workers
  no-fetch kill-stale remote-dir dry-run" "$@"
require_target
check_run_flags
do_run
