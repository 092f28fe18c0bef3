# Golden command lines are as long as the commands they check.
# ruff: noqa: E501
"""launch/*.sh: golden --dry-run output, usage errors, shellcheck, and real runs against a
fake gcloud that records what it is asked to do (so "--dry-run prints what would run" is
checked, not assumed). No network, no cloud account.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # A stand-in for gcloud: logs its argv, answers describe from a script of states, runs
    # the remote stage command in a fake worker home, and copies files for scp.
    import glob, json, os, shutil, subprocess, sys
    argv = sys.argv[1:]
    env = os.environ
    with open(env["FAKE_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\\n")
    def pop(name, default):
        path = env.get(name)
        if not path or not os.path.exists(path):
            return default
        lines = open(path).read().splitlines()
        if not lines:
            return default
        open(path, "w").write("".join(x + "\\n" for x in lines[1:]))
        return lines[0]
    if "describe" in argv and any(a.startswith("--format=value(networkEndpoints") for a in argv):
        print("10.0.0.1;10.0.0.2")
    elif "describe" in argv:
        state = pop("FAKE_STATES", "MISSING")
        if state == "MISSING":
            print("ERROR: (gcloud) NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(state)
    elif "ssh" in argv:
        command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
        rc = int(pop("FAKE_SSH_RCS", "0"))
        if "-m dasd_jax.launch" in command and env.get("FAKE_HOME"):
            done = subprocess.run(["bash", "-c", command], cwd=env["FAKE_HOME"])
            rc = rc or done.returncode
        sys.exit(rc)
    elif "scp" in argv:
        home = env.get("FAKE_HOME")
        src, dst = [a for a in argv if not a.startswith("--")][-2:]
        if home and ":" in src:
            for f in glob.glob(os.path.join(home, src.split(":", 1)[1])):
                shutil.copy(f, dst)
    """)

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    print(json.dumps({{"argv": sys.argv[1:], "distributed": os.environ.get("DASD_DISTRIBUTED"),
                      "xla": os.environ.get("XLA_FLAGS")}}))
    """)


@pytest.fixture
def sh(tmp_path):
    """Run a launch script with a clean environment and a fake gcloud first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    (tmp_path / "t").mkdir()

    def run(script, *args, env=None, cwd=None):
        environ = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "TMPDIR": str(tmp_path / "t"),
            "FAKE_LOG": str(log),
            "LC_ALL": "C.UTF-8",
        }
        environ.update(env or {})
        proc = subprocess.run(
            ["bash", str(LAUNCH / script), *args],
            capture_output=True,
            text=True,
            env=environ,
            cwd=cwd or tmp_path,
            timeout=60,
        )
        return proc

    run.calls = lambda: (
        [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    )
    run.tmp = tmp_path
    return run


def _golden(text, tmp):
    text = textwrap.dedent(text).strip()
    return text.replace("{root}", str(ROOT)).replace("{tmp}", str(tmp / "t")).splitlines()


# --------------------------------------------------------------------------- golden dry runs

INSTALL_REMOTE = (
    "mkdir -p dasd_jax && tar -xzf dasd_jax.tar.gz -C dasd_jax && { python3 -m pip install -q "
    "--user uv==0.13.9 || python3 -m pip install -q --user --break-system-packages uv==0.13.9; "
    "} && $HOME/.local/bin/uv venv -q --allow-existing --python 3.11 dasd_jax/.venv && "
    "$HOME/.local/bin/uv pip install -q --python dasd_jax/.venv/bin/python -r "
    'dasd_jax/requirements.txt "jax[tpu]==0.10.2" gcsfs==2026.10.1 && cd dasd_jax && '
    '.venv/bin/python -c "import dasd_jax.launch, jax; print(jax.__version__)"'
)
TAR = (
    "tar -czf {tmp}/dasd_jax-dasd-q.tar.gz --exclude=.git --exclude=.venv --exclude=./runs "
    "--exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.whl "
    "--exclude=.gl '--exclude=*.egg-info' -C {root} ."
)

GOLDEN = {
    "create-vm": (
        "create.sh --name dasd-a --zone us-east5-b --project my-proj --accelerator-type v6e-8 --dry-run",
        """
        gcloud compute tpus tpu-vm create dasd-a --zone=us-east5-b --project=my-proj --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e
        """,
    ),
    "create-vm-spot": (
        "create.sh --name=dasd-a --zone=us-east5-b --accelerator-type=v5litepod-16 --tier=spot --dry-run",
        """
        gcloud compute tpus tpu-vm create dasd-a --zone=us-east5-b --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot
        """,
    ),
    "create-queued-spot-wait": (
        "create.sh --name=dasd-q --zone=us-east5-a --accelerator-type=v5p-128 --queued --tier=spot --wait --dry-run",
        """
        gcloud compute tpus queued-resources create dasd-q --zone=us-east5-a --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=dasd-q --spot
        gcloud compute tpus queued-resources describe dasd-q --zone=us-east5-a '--format=value(state.state)'
        """,
    ),
    "create-queued-reserved-multislice": (
        "create.sh --name dasd-ms --zone us-central2-b --accelerator-type v4-32 --runtime-version tpu-ubuntu2204-base --queued --tier reserved --node-count 2 --service-account sa@p.iam.gserviceaccount.com --scopes https://www.googleapis.com/auth/cloud-platform --dry-run",
        """
        gcloud compute tpus queued-resources create dasd-ms --zone=us-central2-b --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --node-count=2 --node-prefix=dasd-ms --reserved --service-account=sa@p.iam.gserviceaccount.com --scopes=https://www.googleapis.com/auth/cloud-platform
        """,
    ),
    "create-queued-best-effort": (
        "create.sh --name dasd-q --zone us-east5-a --accelerator-type v6e-256 --queued --tier best-effort --project p-1 --dry-run",
        """
        gcloud alpha compute tpus queued-resources create dasd-q --zone=us-east5-a --project=p-1 --accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e --node-id=dasd-q --best-effort
        """,
    ),
    "wait-vm": (
        "wait.sh --name dasd-a --zone us-east5-b --dry-run",
        """
        gcloud compute tpus tpu-vm describe dasd-a --zone=us-east5-b '--format=value(state)'
        """,
    ),
    "install-copy": (
        "install.sh --name dasd-q --zone us-east5-a --dry-run",
        f"""
        {TAR}
        gcloud compute tpus tpu-vm scp {{tmp}}/dasd_jax-dasd-q.tar.gz dasd-q:dasd_jax.tar.gz --zone=us-east5-a --worker=all
        gcloud compute tpus tpu-vm ssh dasd-q --zone=us-east5-a --worker=all '--command={INSTALL_REMOTE}'
        """,
    ),
    "install-git-multislice": (
        "install.sh --name dasd-ms --zone us-east5-a --node-count 2 --source git --repo-url https://example.com/me/dasd_jax.git --ref v0.2 --python 3.12 --jax-version 0.11.2 --remote-dir work/dj --setup 'mkdir -p ckpt && gcloud storage cp -r gs://bkt/ckpt/Qwen3-4B ckpt/' --dry-run",
        """
        gcloud compute tpus queued-resources ssh dasd-ms --zone=us-east5-a --node=all --worker=all '--command=git init -q work/dj && git -C work/dj fetch -q --depth=1 https://example.com/me/dasd_jax.git v0.2 && git -C work/dj checkout -q --force FETCH_HEAD && { python3 -m pip install -q --user uv==0.13.9 || python3 -m pip install -q --user --break-system-packages uv==0.13.9; } && $HOME/.local/bin/uv venv -q --allow-existing --python 3.12 work/dj/.venv && $HOME/.local/bin/uv pip install -q --python work/dj/.venv/bin/python -r work/dj/requirements.txt "jax[tpu]==0.11.2" gcsfs==2026.10.1 && cd work/dj && .venv/bin/python -c "import dasd_jax.launch, jax; print(jax.__version__)" && ( mkdir -p ckpt && gcloud storage cp -r gs://bkt/ckpt/Qwen3-4B ckpt/ )'
        """,
    ),
    "run": (
        "run.sh --name dasd-q --zone us-east5-a --stage 2 --config configs/train_qwen3_4b.yaml --run-id s2-a --workers 2 --env 'XLA_FLAGS=--xla_tpu_a=1 --b' run_dir=gs://bkt/runs/s2 --dry-run -- \"train.note=it's $HOME\"",
        """
        gcloud compute tpus tpu-vm ssh dasd-q --zone=us-east5-a --worker=all '--command=cd dasd_jax && mkdir -p logs/s2-a && set -o pipefail && DASD_DISTRIBUTED=1 XLA_FLAGS="--xla_tpu_a=1 --b" .venv/bin/python -m dasd_jax.launch --stage=2 --config=configs/train_qwen3_4b.yaml run_dir=gs://bkt/runs/s2 "train.note=it'"'"'s \\$HOME" 2>&1 | tee -a logs/s2-a/$(hostname).log'
        mkdir -p runs/tpu_logs/s2-a
        gcloud compute tpus tpu-vm scp 'dasd-q:dasd_jax/logs/s2-a/*.log' runs/tpu_logs/s2-a/ --zone=us-east5-a --worker=0
        gcloud compute tpus tpu-vm scp 'dasd-q:dasd_jax/logs/s2-a/*.log' runs/tpu_logs/s2-a/ --zone=us-east5-a --worker=1
        """,
    ),
    "run-multislice-no-fetch": (
        "run.sh --name dasd-ms --zone us-east5-a --node-count 2 --stage=score --run-id=sc --no-fetch --kill-stale --project p-1 --dry-run",
        """
        gcloud compute tpus queued-resources ssh dasd-ms --zone=us-east5-a --project=p-1 --node=all --worker=all '--command=cd dasd_jax && mkdir -p logs/sc && { pkill -f "^[^ ]*python[0-9.]* -m dasd_jax[.]launch" && sleep 10 || true; } && set -o pipefail && DASD_DISTRIBUTED=1 .venv/bin/python -m dasd_jax.launch --stage=score 2>&1 | tee -a logs/sc/$(hostname).log'
        """,
    ),
    "fetch-logs-multislice": (
        "fetch_logs.sh --name dasd-ms --zone us-east5-a --node-count 2 --run-id sc --workers 2 --log-dir /data/logs --dry-run",
        """
        mkdir -p /data/logs/sc
        gcloud compute tpus tpu-vm scp 'dasd-ms-0:dasd_jax/logs/sc/*.log' /data/logs/sc/ --zone=us-east5-a --worker=0
        gcloud compute tpus tpu-vm scp 'dasd-ms-0:dasd_jax/logs/sc/*.log' /data/logs/sc/ --zone=us-east5-a --worker=1
        gcloud compute tpus tpu-vm scp 'dasd-ms-1:dasd_jax/logs/sc/*.log' /data/logs/sc/ --zone=us-east5-a --worker=0
        gcloud compute tpus tpu-vm scp 'dasd-ms-1:dasd_jax/logs/sc/*.log' /data/logs/sc/ --zone=us-east5-a --worker=1
        """,
    ),
    "teardown-vm": (
        "teardown.sh --name dasd-a --zone us-east5-b --dry-run",
        """
        gcloud compute tpus tpu-vm delete dasd-a --zone=us-east5-b --quiet
        """,
    ),
    "teardown-queued": (
        "teardown.sh --name dasd-q --zone us-east5-a --queued --project my-proj --dry-run",
        """
        gcloud compute tpus queued-resources delete dasd-q --zone=us-east5-a --project=my-proj --force --quiet
        """,
    ),
    "qr-resume": (
        "qr_resume.sh --name dasd-q --zone us-east5-a --accelerator-type v5p-64 --tier spot --stage 2 --run-id s2 --workers 1 run_dir=gs://bkt/runs/s2 --dry-run",
        f"""
        gcloud compute tpus queued-resources describe dasd-q --zone=us-east5-a '--format=value(state.state)'
        gcloud compute tpus queued-resources create dasd-q --zone=us-east5-a --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-id=dasd-q --spot
        gcloud compute tpus queued-resources describe dasd-q --zone=us-east5-a '--format=value(state.state)'
        {TAR}
        gcloud compute tpus tpu-vm scp {{tmp}}/dasd_jax-dasd-q.tar.gz dasd-q:dasd_jax.tar.gz --zone=us-east5-a --worker=all
        gcloud compute tpus tpu-vm ssh dasd-q --zone=us-east5-a --worker=all '--command={INSTALL_REMOTE}'
        gcloud compute tpus tpu-vm ssh dasd-q --zone=us-east5-a --worker=all '--command=cd dasd_jax && mkdir -p logs/s2 && set -o pipefail && DASD_DISTRIBUTED=1 .venv/bin/python -m dasd_jax.launch --stage=2 run_dir=gs://bkt/runs/s2 2>&1 | tee -a logs/s2/$(hostname).log'
        mkdir -p runs/tpu_logs/s2
        gcloud compute tpus tpu-vm scp 'dasd-q:dasd_jax/logs/s2/*.log' runs/tpu_logs/s2/ --zone=us-east5-a --worker=0
        """,
    ),
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_dry_run_prints_exactly_the_expected_commands(sh, case):
    args, expected = GOLDEN[case]
    args = shlex.split(args)
    if "--dry-run" not in args:
        args = [*args, "--dry-run"]
    proc = sh(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == _golden(expected, sh.tmp)
    assert sh.calls() == []  # gcloud was never called
    assert not (sh.tmp / "t" / "dasd_jax-dasd-q.tar.gz").exists()  # nor anything else


def test_every_script_is_covered_by_a_golden_case():
    assert {args.split()[0] for args, _ in GOLDEN.values()} == set(SCRIPTS)


def test_settings_come_from_the_environment(sh):
    env = {
        "DASD_TPU_NAME": "dasd-env",
        "DASD_ZONE": "europe-west4-a",
        "DASD_PROJECT": "p-env",
        "DASD_ACCELERATOR_TYPE": "v6e-16",
    }
    proc = sh("create.sh", "--dry-run", env=env)
    assert proc.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create dasd-env --zone=europe-west4-a --project=p-env "
        "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e"
    ]
    proc = sh("teardown.sh", "--dry-run", "--zone=us-east5-a", env=env)  # a flag wins
    assert proc.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm delete dasd-env --zone=us-east5-a --project=p-env --quiet"
    ]


# --------------------------------------------------------------------------- usage errors

BAD = [
    ("create.sh --zone z --accelerator-type v6e-8", "--name is required"),
    ("create.sh --name a --accelerator-type v6e-8", "--zone is required"),
    ("create.sh --name a --zone z", "--accelerator-type is required"),
    ("create.sh --name Bad_Name --zone z --accelerator-type v6e-8", "--name must be lowercase"),
    ("create.sh --name a --zone z --accelerator-type v6e-8 --tier cheap", "--tier must be"),
    (
        "create.sh --name a --zone z --accelerator-type v6e-8 --tier best-effort",
        "best-effort needs --queued",
    ),
    ("create.sh --name a --zone z --accelerator-type v6e-8 --node-count 2", "needs --queued"),
    ("create.sh --name a --zone z --accelerator-type v9x-8", "no default runtime for 'v9x-8'"),
    (
        "create.sh --name a --zone z --accelerator-type v6e-8 --node-count 0 --queued",
        "--node-count must be >= 1",
    ),
    ("create.sh --name a --zone z --bogus", "unknown flag: --bogus"),
    ("create.sh --name a --zone", "--zone needs a value"),
    ("create.sh --name= --zone z", "--name needs a non-empty value"),
    ("create.sh --name a --zone z --dry-run=yes", "--dry-run takes no value"),
    ("create.sh --name a --zone z stray", "unexpected argument: stray"),
    ("wait.sh --name a --zone z --timeout 1h", "--timeout must be a whole"),
    ("wait.sh --name a --zone z --stage 2", "unknown flag: --stage"),
    ("install.sh --name a --zone z --source git", "--source=git needs"),
    ("install.sh --name a --zone z --repo-url u", "--repo-url needs"),
    ("install.sh --name a --zone z --source svn", "--source must be"),
    ("install.sh --name a --zone z --remote-dir '~/x'", "--remote-dir"),
    ("run.sh --name a --zone z", "--stage is required"),
    ("run.sh --name a --zone z --stage 2 --dry-run", "--dry-run needs --workers"),
    ("run.sh --name a --zone z --stage 2 --env 1X=2", "--env needs"),
    ("run.sh --name a --zone z --stage 2 --run-id 'a b'", "--run-id"),
    ("fetch_logs.sh --name a --zone z", "--run-id is required"),
    ("teardown.sh --name a --zone z -- x=1", "unexpected arguments after"),
    ("qr_resume.sh --name a --zone z --accelerator-type v5p-8", "--stage is required"),
    ("qr_resume.sh --name a --zone z --stage 2", "--accelerator-type is required"),
    (
        "qr_resume.sh --name a --zone z --stage 2 --accelerator-type v5p-8 --max-attempts x",
        "--max-attempts must be",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=[f"{a.split()[0]}:{m}" for a, m in BAD])
def test_bad_flags_are_usage_errors(sh, args, message):
    proc = sh(*shlex.split(args))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "--help" in proc.stderr
    assert proc.stdout == "" and sh.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(sh, script):
    proc = sh(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}")
    assert "--dry-run" in proc.stdout and "--name" in proc.stdout
    assert sh(script, "-h").stdout == proc.stdout


def test_scripts_are_strict_executable_and_documented():
    readme = (LAUNCH / "README.md").read_text()
    for name in SCRIPTS:
        text = (LAUNCH / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name
        assert os.access(LAUNCH / name, os.X_OK), name
        assert f"## `{name}`" in readme, f"launch/README.md has no section for {name}"


# --------------------------------------------------------------------------- real runs, fake gcloud


def _dry_then_real(sh, *args, env=None):
    """The commands --dry-run prints and the gcloud calls a real run makes, side by side."""
    printed = sh(*args, "--dry-run", env=env)
    assert printed.returncode == 0, printed.stderr
    real = sh(*args, env=env)
    gcloud_lines = [shlex.split(x) for x in printed.stdout.splitlines() if x.startswith("gcloud ")]
    return real, [x[1:] for x in gcloud_lines], sh.calls()


def test_a_real_run_makes_exactly_the_printed_gcloud_calls(sh, tmp_path):
    states = tmp_path / "states"
    states.write_text("CREATING\nACTIVE\n")
    env = {"FAKE_STATES": str(states)}
    args = [
        "create.sh",
        "--name=dasd-q",
        "--zone=us-east5-a",
        "--accelerator-type=v5p-8",
        "--queued",
        "--tier=spot",
        "--wait",
        "--interval=0",
    ]
    real, printed, calls = _dry_then_real(sh, *args, env=env)
    assert real.returncode == 0, real.stderr
    # The describe poll repeats until ACTIVE; otherwise the calls are the printed ones.
    assert calls == [printed[0], printed[1], printed[1]]
    assert "dasd-q is ACTIVE" in real.stderr


def test_wait_reports_terminal_states_and_timeouts(sh, tmp_path):
    states = tmp_path / "states"
    states.write_text("PROVISIONING\nSUSPENDED\n")
    args = ["wait.sh", "--name=dasd-q", "--zone=z", "--queued", "--interval=0"]
    proc = sh(*args, env={"FAKE_STATES": str(states)})
    assert proc.returncode == 3 and "reached SUSPENDED" in proc.stderr
    states.write_text("CREATING\n" * 50)
    proc = sh(*args, "--timeout=0", env={"FAKE_STATES": str(states)})
    assert proc.returncode == 4 and "not ACTIVE after 0s" in proc.stderr


def _fake_worker(tmp_path):
    home = tmp_path / "worker"
    venv_bin = home / "dasd_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (venv_bin / "python").chmod(0o755)
    return home


def test_run_quotes_overrides_for_the_remote_shell_and_gathers_logs(sh, tmp_path):
    home = _fake_worker(tmp_path)
    tricky = ["run_dir=gs://bkt/runs/s2", 'train.note=it\'s $HOME `x` "q" \\z', "a.b=[1, 2]"]
    args = [
        "run.sh",
        "--name=dasd-q",
        "--zone=z",
        "--stage=2",
        "--config=configs/c.yaml",
        "--run-id=r1",
        "--workers=2",
        "--env",
        "XLA_FLAGS=--x=1 --y",
        *tricky,
    ]
    real, printed, calls = _dry_then_real(sh, *args, env={"FAKE_HOME": str(home)})
    assert real.returncode == 0, real.stderr
    assert calls == printed
    # What the stage received on the worker: every override byte for byte.
    seen = json.loads(real.stdout.splitlines()[0])
    assert seen == {
        "argv": ["-m", "dasd_jax.launch", "--stage=2", "--config=configs/c.yaml", *tricky],
        "distributed": "1",
        "xla": "--x=1 --y",
    }
    # Each worker's log was written there and copied back here.
    logs = list((tmp_path / "runs" / "tpu_logs" / "r1").glob("*.log"))
    assert len(logs) == 1 and json.loads(logs[0].read_text()) == seen


def test_run_fails_when_a_worker_fails_and_still_fetches_logs(sh, tmp_path):
    rcs = tmp_path / "rcs"
    rcs.write_text("1\n")
    proc = sh(
        "run.sh",
        "--name=dasd-q",
        "--zone=z",
        "--stage=2",
        "--run-id=r1",
        env={"FAKE_SSH_RCS": str(rcs), "FAKE_STATES": str(tmp_path / "none")},
    )
    assert proc.returncode == 1
    verbs = [c[2] + " " + c[3] for c in sh.calls()]
    # no --workers: the worker count came from describe (two endpoints), then two copies
    assert verbs == ["tpu-vm ssh", "tpu-vm describe", "tpu-vm scp", "tpu-vm scp"]


QR_ARGS = [
    "qr_resume.sh",
    "--name=dasd-q",
    "--zone=z",
    "--accelerator-type=v5p-8",
    "--tier=spot",
    "--stage=2",
    "--run-id=s2",
    "--workers=1",
    "--interval=0",
    "run_dir=gs://bkt/s2",
]


def _verbs(calls):
    out = []
    for c in calls:
        verb = c[c.index("tpus") + 2]
        if verb == "ssh":
            command = next(a for a in c if a.startswith("--command="))
            verb = "ssh:run" if "dasd_jax.launch --stage" in command else "ssh:install"
            verb += "+kill" if "pkill" in command else ""
        out.append(verb)
    return out


def test_qr_resume_recreates_after_preemption_and_reruns_the_same_command(sh, tmp_path):
    states, rcs = tmp_path / "states", tmp_path / "rcs"
    # not found -> created -> ACTIVE; the run is cut (ssh 255) and the resource is SUSPENDED;
    # it is deleted and re-created, ACTIVE again, and the second run finishes.
    states.write_text("MISSING\nACTIVE\nSUSPENDED\nSUSPENDED\nACTIVE\nACTIVE\n")
    rcs.write_text("0\n255\n0\n0\n")
    proc = sh(*QR_ARGS, env={"FAKE_STATES": str(states), "FAKE_SSH_RCS": str(rcs)})
    assert proc.returncode == 0, proc.stderr
    assert _verbs(sh.calls()) == [
        "describe",
        "create",
        "describe",
        "scp",
        "ssh:install",
        "ssh:run",
        "scp",
        "describe",
        "describe",
        "delete",
        "create",
        "describe",
        "scp",
        "ssh:install",
        "ssh:run+kill",
        "scp",
        "describe",
    ]
    runs = [c for c in sh.calls() if _verbs([c])[0].startswith("ssh:run")]
    strip = [
        next(a for a in c if a.startswith("--command=")).replace(
            '{ pkill -f "^[^ ]*python[0-9.]* -m dasd_jax[.]launch" && sleep 10 || true; } && ', ""
        )
        for c in runs
    ]
    assert strip[0] == strip[1]  # the same stage command, the same run id
    assert "stage 2 finished (run s2)" in proc.stderr


def test_qr_resume_reruns_a_stage_stopped_by_sigterm_on_the_same_nodes(sh, tmp_path):
    states, rcs = tmp_path / "states", tmp_path / "rcs"
    states.write_text("ACTIVE\n" * 6)
    rcs.write_text("0\n143\n0\n0\n")  # 143: the stage saved a checkpoint and exited on SIGTERM
    proc = sh(*QR_ARGS, env={"FAKE_STATES": str(states), "FAKE_SSH_RCS": str(rcs)})
    assert proc.returncode == 0, proc.stderr
    assert _verbs(sh.calls()) == [
        "describe",
        "describe",
        "scp",
        "ssh:install",
        "ssh:run",
        "scp",
        "describe",
        "describe",
        "describe",
        "scp",
        "ssh:install",
        "ssh:run+kill",
        "scp",
        "describe",
    ]


def test_qr_resume_stops_on_a_real_failure(sh, tmp_path):
    states, rcs = tmp_path / "states", tmp_path / "rcs"
    states.write_text("ACTIVE\nACTIVE\nACTIVE\nACTIVE\n")
    rcs.write_text("0\n1\n")
    proc = sh(*QR_ARGS, env={"FAKE_STATES": str(states), "FAKE_SSH_RCS": str(rcs)})
    assert proc.returncode == 1
    assert "not a preemption, not retried" in proc.stderr
    assert _verbs(sh.calls()) == [
        "describe",
        "describe",
        "scp",
        "ssh:install",
        "ssh:run",
        "scp",
        "describe",
        "describe",
    ]


def test_qr_resume_gives_up_after_max_attempts(sh, tmp_path):
    states = tmp_path / "states"
    states.write_text("FAILED\nFAILED\n" * 3)
    proc = sh(*QR_ARGS, "--max-attempts=2", env={"FAKE_STATES": str(states)})
    assert proc.returncode == 1 and "gave up after 2 attempts" in proc.stderr
    assert _verbs(sh.calls()) == ["describe", "delete", "create", "describe"] * 2


# --------------------------------------------------------------------------- shellcheck


def test_shellcheck_passes_on_launch_scripts():
    shellcheck = shutil.which(
        "shellcheck",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run(
        [shellcheck, "-x", *sorted(map(str, LAUNCH.glob("*.sh")))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
