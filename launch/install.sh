#!/usr/bin/env bash
# Install this project on every worker of a TPU VM / queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --name NAME --zone ZONE [options]

On every worker (--worker=all; every node with --node-count K): put the project in
~/REMOTE_DIR (a tarball of this working tree, or a git checkout), create REMOTE_DIR/.venv
with uv (Python $PYTHON_VERSION by default), and install requirements.txt together with
jax[tpu]==$JAX_VERSION (and its libtpu) and gcsfs (for gs:// paths). Safe to re-run: outputs
and the venv are kept, files are updated.

  --name NAME          TPU VM / queued resource name (env DASD_TPU_NAME)
  --zone ZONE          (env DASD_ZONE)
  --project PROJECT    default: gcloud's configured project (env DASD_PROJECT)
  --node-count K       the queued resource has K slices (nodes NAME-0 ... NAME-(K-1))
  --source copy|git    copy this working tree (default) or clone --repo-url at --ref
  --repo-url URL       git URL reachable from the workers (with --source=git)
  --ref REF            branch, tag or commit (default $REF)
  --remote-dir DIR     folder under the workers' home (default $REMOTE_DIR)
  --python VERSION     Python for the venv (default $PYTHON_VERSION: requirements.txt's exact pins)
  --jax-version V      jax[tpu] version (default $JAX_VERSION, requirements.txt's pin)
  --setup COMMAND      a shell command to run afterwards on every worker, in REMOTE_DIR
                       (e.g. copy the student checkpoint from gs:// to the worker's disk)
  --dry-run            print the commands, one per line, and run nothing
  -h, --help           this help
USAGE
}

parse_flags "name zone project node-count source repo-url ref remote-dir python jax-version
  setup dry-run" "$@"
require_target
check_install_flags
do_install
