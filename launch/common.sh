# shellcheck shell=bash disable=SC2034 # the settings below are read by the sourcing scripts
# Shared by launch/*.sh (sourced, never run): flag parsing, command printing (--dry-run), and
# the gcloud steps (create, wait, install, run, fetch logs, delete) that the scripts and
# qr_resume.sh compose. Every gcloud or state-changing command goes through `run`, which
# prints it, shell-quoted, one per line (stdout under --dry-run, where nothing is executed;
# stderr with a "+ " prefix otherwise). Needs bash >= 4.4.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "launch scripts need bash >= 4.4 (found $BASH_VERSION)" >&2
  exit 1
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")

# Settings: flag > environment > default. Project and zone are never hard-coded.
NAME=${DASD_TPU_NAME:-}
ZONE=${DASD_ZONE:-}
PROJECT=${DASD_PROJECT:-}       # empty: gcloud's configured project
DRY_RUN=0
QUEUED=0
ACCEL=${DASD_ACCELERATOR_TYPE:-}
RUNTIME=${DASD_RUNTIME_VERSION:-}
TIER=on-demand
NODE_COUNT=1
SERVICE_ACCOUNT=
SCOPES=
WAIT=0
TIMEOUT=3600
INTERVAL=30
SOURCE=copy
REPO_URL=
REF=main
REMOTE_DIR=dasd_jax
PYTHON_VERSION=3.11
JAX_VERSION=0.10.2             # requirements.txt's pin on Python 3.11
UV_VERSION=0.13.9
GCSFS_VERSION=2026.10.1        # gs:// paths through etils.epath's fsspec backend
SETUP=                         # extra shell command run on every worker after installing
STAGE=
CONFIG=
RUN_ID=
LOG_DIR=${DASD_LOG_DIR:-runs/tpu_logs}
WORKERS=
KILL_STALE=0
FETCH=1
MAX_ATTEMPTS=10
ENV_VARS=()
OVERRIDES=()

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

usage_error() {
  echo "$PROG: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

# One word quoted for a POSIX shell exactly as Python's shlex.quote does.
sh_quote() {
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# One word double-quoted (when it needs quoting) for the remote shell: the remote command is
# itself printed single-quoted, and nested single quotes are hard to read.
dq_quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
    return
  fi
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//\$/\\\$}
  s=${s//\`/\\\`}
  printf '"%s"' "$s"
}

quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(sh_quote "$word")"
  done
  printf '%s' "$out"
}

# Print a command; execute it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# parse_flags "ALLOWED FLAG NAMES" "$@": sets the globals above. `overrides` in ALLOWED
# accepts positional key=value arguments (and everything after --) as stage overrides.
parse_flags() {
  local allowed=" ${1//$'\n'/ } "
  shift
  while (($#)); do
    local arg=$1 flag value has_value=0
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        [[ $allowed == *" overrides "* ]] || usage_error "unexpected arguments after --: $*"
        OVERRIDES+=("$@")
        break
        ;;
      --*) ;;
      *)
        [[ $allowed == *" overrides "* && $arg == *=* ]] ||
          usage_error "unexpected argument: $arg"
        OVERRIDES+=("$arg")
        shift
        continue
        ;;
    esac
    flag=${arg%%=*}
    if [[ $arg == *=* ]]; then
      value=${arg#*=}
      has_value=1
    fi
    [[ $allowed == *" ${flag#--} "* ]] || usage_error "unknown flag: $flag"
    case $flag in
      --dry-run | --queued | --wait | --kill-stale | --no-fetch)
        ((has_value == 0)) || usage_error "$flag takes no value"
        case $flag in
          --dry-run) DRY_RUN=1 ;;
          --queued) QUEUED=1 ;;
          --wait) WAIT=1 ;;
          --kill-stale) KILL_STALE=1 ;;
          --no-fetch) FETCH=0 ;;
        esac
        shift
        continue
        ;;
    esac
    if ((has_value == 0)); then
      (($# >= 2)) || usage_error "$flag needs a value"
      value=$2
      shift
    fi
    shift
    [[ -n $value ]] || usage_error "$flag needs a non-empty value"
    set_flag "$flag" "$value"
  done
}

set_flag() {
  local flag=$1 value=$2
  case $flag in
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCEL=$value ;;
    --runtime-version) RUNTIME=$value ;;
    --tier)
      [[ $value =~ ^(on-demand|spot|reserved|best-effort)$ ]] ||
        usage_error "--tier must be on-demand, spot, reserved or best-effort (got '$value')"
      TIER=$value
      ;;
    --node-count)
      [[ $value =~ ^[1-9][0-9]*$ ]] || usage_error "--node-count must be >= 1 (got '$value')"
      NODE_COUNT=$value
      ;;
    --service-account) SERVICE_ACCOUNT=$value ;;
    --scopes) SCOPES=$value ;;
    --timeout | --interval | --workers | --max-attempts)
      is_uint "$value" || usage_error "$flag must be a whole number (got '$value')"
      case $flag in
        --timeout) TIMEOUT=$value ;;
        --interval) INTERVAL=$value ;;
        --workers) WORKERS=$value ;;
        --max-attempts) MAX_ATTEMPTS=$value ;;
      esac
      ;;
    --source)
      [[ $value =~ ^(copy|git)$ ]] || usage_error "--source must be copy or git (got '$value')"
      SOURCE=$value
      ;;
    --repo-url) REPO_URL=$value ;;
    --ref) REF=$value ;;
    --remote-dir)
      [[ $value =~ ^[A-Za-z0-9._/-]+$ ]] ||
        usage_error "--remote-dir: letters, digits and ._/- only (got '$value')"
      REMOTE_DIR=$value
      ;;
    --python) PYTHON_VERSION=$value ;;
    --jax-version) JAX_VERSION=$value ;;
    --setup) SETUP=$value ;;
    --stage) STAGE=$value ;;
    --config) CONFIG=$value ;;
    --run-id)
      [[ $value =~ ^[A-Za-z0-9._-]+$ ]] ||
        usage_error "--run-id: letters, digits and ._- only (got '$value')"
      RUN_ID=$value
      ;;
    --log-dir) LOG_DIR=$value ;;
    --env)
      [[ $value =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env needs KEY=VALUE (got '$value')"
      ENV_VARS+=("$value")
      ;;
    *) usage_error "unknown flag: $flag" ;;
  esac
}

require_target() {
  [[ -n $NAME ]] || usage_error "--name is required (or set DASD_TPU_NAME)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    usage_error "--name must be lowercase letters, digits and '-' (got '$NAME')"
  [[ -n $ZONE ]] || usage_error "--zone is required (or set DASD_ZONE)"
}

# The runtime image for an accelerator type, unless --runtime-version says otherwise.
default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

scope_flags() {
  SCOPE=(--zone="$ZONE")
  [[ -z $PROJECT ]] || SCOPE+=(--project="$PROJECT")
}

# Nodes that make up the target: NAME, or NAME-0 ... NAME-(K-1) for a multislice request.
node_names() {
  local i
  if ((NODE_COUNT == 1)); then
    echo "$NAME"
  else
    for ((i = 0; i < NODE_COUNT; i++)); do echo "$NAME-$i"; done
  fi
}

# --------------------------------------------------------------------------- create

check_create_flags() {
  [[ -n $ACCEL ]] || usage_error "--accelerator-type is required (e.g. v6e-64, v5p-128)"
  if [[ -z $RUNTIME ]]; then
    RUNTIME=$(default_runtime "$ACCEL") ||
      usage_error "no default runtime for '$ACCEL': pass --runtime-version"
  fi
  if ((!QUEUED)); then
    [[ $TIER != best-effort ]] || usage_error "--tier=best-effort needs --queued"
    ((NODE_COUNT == 1)) || usage_error "--node-count > 1 (multislice) needs --queued"
  fi
}

do_create() {
  local -a cmd tier_flag=()
  scope_flags
  case $TIER in
    spot) tier_flag=(--spot) ;;
    reserved) tier_flag=(--reserved) ;;
    best-effort) tier_flag=(--best-effort) ;;
  esac
  if ((QUEUED)); then
    cmd=(gcloud)
    # --best-effort exists only in the alpha track.
    [[ $TIER != best-effort ]] || cmd+=(alpha)
    cmd+=(compute tpus queued-resources create "$NAME" "${SCOPE[@]}"
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    if ((NODE_COUNT == 1)); then
      cmd+=(--node-id="$NAME")
    else
      cmd+=(--node-count="$NODE_COUNT" --node-prefix="$NAME")
    fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}"
      --accelerator-type="$ACCEL" --version="$RUNTIME")
  fi
  cmd+=("${tier_flag[@]}")
  [[ -z $SERVICE_ACCOUNT ]] || cmd+=(--service-account="$SERVICE_ACCOUNT")
  [[ -z $SCOPES ]] || cmd+=(--scopes="$SCOPES")
  run "${cmd[@]}"
}

# --------------------------------------------------------------------------- state, wait

describe_cmd() {
  scope_flags
  if ((QUEUED)); then
    DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}"
      "--format=value(state.state)")
  else
    DESCRIBE=(gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" "--format=value(state)")
  fi
}

# The current state (ACTIVE, READY, SUSPENDED, ...), or empty when it does not exist.
current_state() {
  describe_cmd
  "${DESCRIBE[@]}" 2>/dev/null || true
}

# Poll until READY (TPU VM) / ACTIVE (queued resource); fail on a terminal state or timeout.
do_wait() {
  local target=READY state deadline=$((SECONDS + TIMEOUT))
  ((QUEUED)) && target=ACTIVE
  if ((DRY_RUN)); then
    describe_cmd
    run "${DESCRIBE[@]}"
    return 0
  fi
  while :; do
    state=$(current_state)
    echo "$PROG: $NAME is ${state:-not found} (waiting for $target)" >&2
    case $state in
      "$target") return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | PREEMPTED | TERMINATED | STOPPED)
        echo "$PROG: $NAME reached $state" >&2
        return 3
        ;;
    esac
    if ((SECONDS + INTERVAL >= deadline)); then
      echo "$PROG: $NAME not $target after ${TIMEOUT}s" >&2
      return 4
    fi
    sleep "$INTERVAL"
  done
}

# --------------------------------------------------------------------------- ssh / scp

# ssh_all COMMAND: run a shell command on every worker of every node, concurrently.
ssh_all() {
  scope_flags
  if ((NODE_COUNT > 1)); then
    run gcloud compute tpus queued-resources ssh "$NAME" "${SCOPE[@]}" --node=all --worker=all \
      --command="$1"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$1"
  fi
}

# scp_to_all LOCAL REMOTE: copy a local file to every worker of every node.
scp_to_all() {
  scope_flags
  if ((NODE_COUNT > 1)); then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" "${SCOPE[@]}" --node=all \
      --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${SCOPE[@]}" --worker=all
  fi
}

# --------------------------------------------------------------------------- install

check_install_flags() {
  if [[ $SOURCE == git ]]; then
    [[ -n $REPO_URL ]] || usage_error "--source=git needs --repo-url"
  else
    [[ -z $REPO_URL ]] || usage_error "--repo-url needs --source=git"
  fi
}

do_install() {
  local tarball="${TMPDIR:-/tmp}/dasd_jax-$NAME.tar.gz" uv="\$HOME/.local/bin/uv" fetch remote
  local d=$REMOTE_DIR venv="$REMOTE_DIR/.venv"
  if [[ $SOURCE == copy ]]; then
    # The working tree as it is (uncommitted edits included), without venvs, caches, outputs.
    run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=./runs \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.whl \
      --exclude=.gl --exclude='*.egg-info' -C "$REPO_ROOT" .
    scp_to_all "$tarball" "$REMOTE_DIR.tar.gz"
    fetch="mkdir -p $d && tar -xzf $REMOTE_DIR.tar.gz -C $d"
  else
    fetch="git init -q $d && git -C $d fetch -q --depth=1 $(dq_quote "$REPO_URL") $(dq_quote "$REF")"
    fetch+=" && git -C $d checkout -q --force FETCH_HEAD"
  fi
  remote="$fetch"
  # uv brings the Python the pins need (TPU images ship an older python3) and resolves
  # requirements.txt together with jax[tpu] (which pins the matching libtpu).
  remote+=" && { python3 -m pip install -q --user uv==$UV_VERSION"
  remote+=" || python3 -m pip install -q --user --break-system-packages uv==$UV_VERSION; }"
  remote+=" && $uv venv -q --allow-existing --python $(dq_quote "$PYTHON_VERSION") $venv"
  remote+=" && $uv pip install -q --python $venv/bin/python -r $d/requirements.txt"
  remote+=" $(dq_quote "jax[tpu]==$JAX_VERSION") gcsfs==$GCSFS_VERSION"
  remote+=" && cd $d && .venv/bin/python -c \"import dasd_jax.launch, jax; print(jax.__version__)\""
  # e.g. copy a checkpoint to the worker's disk; runs in REMOTE_DIR, on fresh nodes too.
  [[ -z $SETUP ]] || remote+=" && ( $SETUP )"
  ssh_all "$remote"
}

# --------------------------------------------------------------------------- run a stage

check_run_flags() {
  [[ -n $STAGE ]] || usage_error "--stage is required (e.g. --stage=score)"
  if ((DRY_RUN && FETCH)) && [[ -z $WORKERS ]]; then
    usage_error "--dry-run needs --workers N (or --no-fetch): without it the worker count is read with describe"
  fi
  [[ -n $RUN_ID ]] || RUN_ID="$STAGE-$(date -u +%Y%m%d-%H%M%S)"
}

# The command each worker runs: every process joins jax.distributed (DASD_DISTRIBUTED=1)
# and tees its output to logs/RUN_ID/<hostname>.log in the remote project folder.
stage_command() {
  local line="cd $REMOTE_DIR && mkdir -p logs/$RUN_ID" kv o
  if ((KILL_STALE)); then
    # A stage left running by a lost ssh session holds the TPU: stop it first.
    line+=" && { pkill -f \"^[^ ]*python[0-9.]* -m dasd_jax[.]launch\" && sleep 10 || true; }"
  fi
  line+=" && set -o pipefail && DASD_DISTRIBUTED=1"
  for kv in "${ENV_VARS[@]}"; do line+=" ${kv%%=*}=$(dq_quote "${kv#*=}")"; done
  line+=" .venv/bin/python -m dasd_jax.launch --stage=$(dq_quote "$STAGE")"
  [[ -z $CONFIG ]] || line+=" --config=$(dq_quote "$CONFIG")"
  for o in "${OVERRIDES[@]}"; do line+=" $(dq_quote "$o")"; done
  line+=" 2>&1 | tee -a logs/$RUN_ID/\$(hostname).log"
  printf '%s' "$line"
}

# The number of workers per node, from --workers or describe.
worker_count() {
  local endpoints
  if [[ -n $WORKERS ]]; then
    echo "$WORKERS"
    return
  fi
  scope_flags
  endpoints=$(gcloud compute tpus tpu-vm describe "$(node_names | head -n1)" "${SCOPE[@]}" \
    "--format=value(networkEndpoints[].ipAddress)") || return 1
  tr ';' '\n' <<<"$endpoints" | grep -c .
}

# Copy every worker's log of RUN_ID into LOG_DIR/RUN_ID/ (one file per worker host).
do_fetch_logs() {
  local node n w rc=0
  n=$(worker_count) || {
    echo "$PROG: cannot read the worker count of $NAME; logs not fetched" >&2
    return 1
  }
  scope_flags
  run mkdir -p "$LOG_DIR/$RUN_ID"
  for node in $(node_names); do
    for ((w = 0; w < n; w++)); do
      run gcloud compute tpus tpu-vm scp "$node:$REMOTE_DIR/logs/$RUN_ID/*.log" \
        "$LOG_DIR/$RUN_ID/" "${SCOPE[@]}" --worker="$w" || rc=1
    done
  done
  return "$rc"
}

# Run the stage on all workers; logs stream to this terminal and are fetched afterwards.
do_run() {
  local rc=0
  ssh_all "$(stage_command)" || rc=$?
  if ((FETCH)); then
    do_fetch_logs || echo "$PROG: some logs could not be fetched" >&2
  fi
  return "$rc"
}

# --------------------------------------------------------------------------- delete

do_delete() {
  scope_flags
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
  fi
}
