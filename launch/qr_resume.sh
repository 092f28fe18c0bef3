#!/usr/bin/env bash
# Keep a stage running on a queued resource until it finishes: (re)create the queued
# resource whenever it is missing, failed or preempted, install, run, repeat.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --stage STAGE [options]
       [key=value ...] [-- key=value ...]

Each attempt: make sure the queued resource NAME is ACTIVE (create it when it does not
exist; delete and re-create it when it is FAILED or SUSPENDED, as spot and best-effort
capacity is after a preemption), install the project (install.sh), run the stage on all
workers (run.sh). The same command runs every time with the same --run-id: stages resume
from their own checkpoints and finished output shards, which therefore must be on gs://
(a re-created node starts with an empty disk). Stops when the stage exits 0 with the queued
resource still ACTIVE, or when it fails while the queued resource stays ACTIVE (a real
error; exit statuses 255, ssh lost, and 143, stopped by SIGTERM, count as preemptions and
are retried), or after --max-attempts. Run it where it can outlive your laptop
session (tmux on a small VM).

Flags of create.sh (--queued implied): --name --zone --project --accelerator-type
  --runtime-version --tier --node-count --service-account --scopes --timeout --interval
Flags of install.sh: --source --repo-url --ref --remote-dir --python --jax-version --setup
Flags of run.sh: --stage --config key=value --env --run-id --log-dir --workers --no-fetch
  --max-attempts N     attempts before giving up (default $MAX_ATTEMPTS)
  --dry-run            print the commands of a first attempt from nothing (describe, create,
                       wait, install, run) and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project accelerator-type runtime-version tier node-count service-account
  scopes timeout interval max-attempts source repo-url ref remote-dir python jax-version setup
  stage config overrides env run-id log-dir workers no-fetch dry-run" "$@"
QUEUED=1
require_target
check_create_flags
check_install_flags
check_run_flags # fixes RUN_ID: every attempt appends to the same logs

if ((DRY_RUN)); then
  describe_cmd
  run "${DESCRIBE[@]}"
  do_create
  do_wait
  do_install
  do_run
  exit 0
fi

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  state=$(current_state)
  while [[ $state == DELETING ]]; do
    sleep "$INTERVAL"
    state=$(current_state)
  done
  echo "$PROG: attempt $attempt/$MAX_ATTEMPTS: $NAME is ${state:-not found}" >&2
  case $state in
    "") do_create ;;
    FAILED | SUSPENDING | SUSPENDED)
      do_delete
      do_create
      ;;
  esac
  do_wait || continue # FAILED, SUSPENDED or timed out: the next attempt re-creates it
  do_install || continue
  ((attempt == 1)) || KILL_STALE=1
  rc=0
  do_run || rc=$?
  state=$(current_state)
  if ((rc == 0)) && [[ $state == ACTIVE ]]; then
    echo "$PROG: stage $STAGE finished (run $RUN_ID)" >&2
    exit 0
  fi
  # 255: ssh lost the workers; 143: the stage stopped on SIGTERM after saving a checkpoint
  # (128 + 15). Both mean "resume"; any other failure on an ACTIVE resource is an error.
  if [[ $state == ACTIVE ]] && ((rc != 255 && rc != 143)); then
    sleep "$INTERVAL" # a preemption may take a moment to show in the state
    state=$(current_state)
    if [[ $state == ACTIVE ]]; then
      echo "$PROG: stage $STAGE failed (status $rc) on an ACTIVE queued resource:" \
        "not a preemption, not retried; see $LOG_DIR/$RUN_ID/" >&2
      exit "$rc"
    fi
  fi
  echo "$PROG: status $rc, $NAME ${state:-gone}: resuming" >&2
done
die "gave up after $MAX_ATTEMPTS attempts (run $RUN_ID)"
