"""Every command the docs show runs, as typed: the shell blocks of README.md and docs/*.md.

Each `python -m dasd_jax.launch ...` line of a ```bash / ```sh / ``` block (backslash
continuations joined, comments dropped, `&&` chains split) is run by bash in a scratch folder,
after the shell assignments that precede it on the same page (`S=...`, `T="..."`), with the
user's paths swapped for tiny stand-ins: `/ckpt/NAME` and `/data/...` become folders of the
`world` fixture (a random tiny Qwen3 built by transformers with the real Qwen3 tokenizer; the
`*.json` files of a tiny gpt-oss with the real o200k_harmony tokenizer, what the quick start
downloads of gpt-oss-120b; released-format SFT rows and their gpt-oss log-prob rows). `configs/`
is the repository's.

How each command runs is decided in LAUNCH, one row per doc command: a command that no row (or
more than one) matches, and a row that matches no command, fail
test_every_doc_command_is_handled, so a new doc command cannot go untested by accident. RUN runs
it for real (only the cheap ones: the whole file stays within ~3 minutes on 2 cores). CONFIG
appends `--print-config`, which parses the command line, loads the YAML and applies every
override (unknown keys and bad values are errors) without running the stage, and then checks
that each `key=value` bash passed is in the printed config: for commands that need an
accelerator, a trained stage, a teacher server or minutes of CPU. A bare `...` in a CONFIG
command stands for the reader's other overrides and is dropped (`key=...` is no placeholder:
YAML cannot parse `...`).
Non-launch commands (pip, hf download, gcloud, launch/*.sh, ...) are not run; NOT_RUN names
each kind and why, and they too must match a row. No page may mention `huggingface-cli` (the
pinned huggingface_hub ships `hf`), and the options of every `hf download` must be options
of the installed `hf download`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from dasd_jax import launch

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}  # and unlabelled blocks, see _doc_commands
LAUNCHER = re.compile(r"(?:\.venv/bin/)?python3? -m dasd_jax\.launch(?: (?P<args>.*))?")
USER_PATH = re.compile(r"(?<![\w./-])/(ckpt|data)/")
DEMO_ROWS = 12  # len(embedded.demo_rows()): the rows of every /data/*.jsonl stand-in

RUN, CONFIG = "run", "config"


class Row(NamedTuple):
    args: str  # regex, full match of what follows `-m dasd_jax.launch` (spaces collapsed)
    how: str  # RUN or CONFIG
    why: str
    check: Callable[[subprocess.CompletedProcess, Path], None] | None = None  # RUN only
    instead: str | None = None  # a syntax line: the instance of it that is run


def _summary(proc: subprocess.CompletedProcess) -> dict:
    """The stage summary the launcher prints last (after the stage's own table, if any)."""
    lines = proc.stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{") :]))


def _scored_with_released_logprobs(proc, cwd):
    s = _summary(proc)
    assert s["counts"] == {"in": DEMO_ROWS, "out": DEMO_ROWS, "rejected": 0}, s["counts"]
    assert s["teacher_from"]["logprobs"] == DEMO_ROWS, s["teacher_from"]  # joined, not computed


def _selected_into_dasd_select(proc, cwd):
    s = _summary(proc)
    assert s["counts"]["in"] == DEMO_ROWS and s["counts"]["out"] > 0, s["counts"]
    assert list((cwd / "runs/dasd/select").glob("*.array_record")), "no SFT records written"


def _lists_stages(proc, cwd):
    assert all(f"  {stage} " in proc.stdout for stage in launch.STAGES), proc.stdout


def _prints_student_path(proc, cwd):
    assert yaml.safe_load(proc.stdout)["student"]["path"].endswith("/ckpt/Qwen3-4B")


TRAIN_4B = "64K-token rows, global batch 64 (configs/train_qwen3_4b.yaml): an accelerator job"
NEEDS_STAGES = "needs the earlier stages' outputs in its run_dir"

# doc -> one row per launch command, in page order. The table is the test's specification.
LAUNCH: dict[str, list[Row]] = {
    "README.md": [
        Row(r"--stage=all", CONFIG, "the embedded run, ~5 min: tests/test_pipeline_e2e.py"),
        Row(
            r"--stage=STAGE \[--config=configs/FILE\.yaml\] \[key=value \.\.\.\]",
            CONFIG,
            "a syntax line: one instance of it",
            instead="--stage=score --config=configs/score_qwen3_4b.yaml run_dir=runs/x",
        ),
        Row(r"--help", RUN, "cheap", _lists_stages),
        Row(
            r"--stage=score --print-config student\.path=/ckpt/Qwen3-4B",
            RUN,
            "prints the config already",
            _prints_student_path,
        ),
        Row(
            r"--stage=score --config=configs/score_qwen3_4b\.yaml student\.path=\S+ "
            r"score\.input=/data/stage1\.jsonl score\.teacher_logprobs=/data/stage1-logprob\.jsonl",
            CONFIG,
            "docs/quickstart.md's RUN row is this run (same config, inputs of the same kind)",
        ),
    ],
    "docs/evaluate.md": [
        Row(r"--stage=evaluate", CONFIG, "the embedded demo: tests/test_evaluate.py"),
        Row(r"--stage=evaluate run_dir=runs/x .*", CONFIG, "a 4B model, 100K-token answers"),
        Row(r"--stage=evaluate 'evaluate\.benchmarks=\[data/gpqa_diamond.*", CONFIG, "same"),
    ],
    "docs/export.md": [
        Row(r"--stage=export run_dir=runs/dasd", CONFIG, "needs a trained stage checkpoint"),
        Row(r"--stage=export run_dir=runs/dasd export\.stage=2 .*", CONFIG, "same"),
    ],
    "docs/mixed_policy.md": [
        Row(r"--stage=2 \.\.\.", CONFIG, "a stage-2 SFT run"),
        Row(r"--stage=mixed_policy teacher\.path=\S+", CONFIG, NEEDS_STAGES),
        Row(r"--stage=3", CONFIG, NEEDS_STAGES),
    ],
    "docs/quickstart.md": [
        Row(r"--stage=all", CONFIG, "the embedded run, ~5 min: tests/test_pipeline_e2e.py"),
        Row(
            r"--stage=score --config=configs/score_qwen3_4b\.yaml run_dir=runs/lowt .*",
            RUN,
            "the paper's data path: student forward only, ~30 s",
            _scored_with_released_logprobs,
        ),
        Row(
            r"--stage=select run_dir=runs/lowt select_stage\.output=runs/dasd/select",
            RUN,
            "reads the score run above, ~5 s",
            _selected_into_dasd_select,
        ),
        Row(r"--stage=1 \$T", CONFIG, TRAIN_4B),
        Row(r"--stage=2 \$T", CONFIG, TRAIN_4B),
        Row(r"--stage=mixed_policy \$T teacher\.path=\S+", CONFIG, "the teacher generates"),
        Row(r"--stage=3 \$T", CONFIG, TRAIN_4B),
        Row(r"--stage=evaluate \$T evaluate\.benchmarks=\S+", CONFIG, "4B decoding"),
        Row(r"--stage=all run_dir=runs/mine .*", CONFIG, "every stage at full size"),
    ],
    "docs/sample.md": [
        Row(r"--stage=sample", CONFIG, "trains the embedded teacher, ~1 min: test_sample_stage"),
        Row(r"--stage=sample teacher\.path=\S+ .*mesh\.tensor=8", CONFIG, "gpt-oss-120b decode"),
        Row(r"--stage=sample sample\.backend=openai .*", CONFIG, "needs a running server"),
    ],
    "docs/score.md": [
        Row(
            r"--stage=score student\.path=\S+ score\.input=/data/stage1\.jsonl "
            r"score\.teacher_logprobs=/data/stage1-logprob\.jsonl score\.temperature=0\.6",
            RUN,
            "student forward only, ~20 s",
            _scored_with_released_logprobs,
        ),
        Row(
            r"--stage=score student\.path=\S+ teacher\.path=\S+ score\.input=/data/dump\.jsonl",
            CONFIG,
            "computes teacher log-probs: needs the teacher's weights",
        ),
    ],
    "docs/select_stage.md": [
        Row(r"--stage=score \.\.\.", CONFIG, "elided arguments"),
        Row(r"--stage=select", CONFIG, NEEDS_STAGES),
        Row(r"--stage=select select\.rule=random .*", CONFIG, NEEDS_STAGES),
    ],
    "docs/train.md": [
        Row(r"--stage=1", CONFIG, "the embedded demo, ~1 min: tests/test_train_stage.py"),
        Row(r"--stage=1 --config=configs/train_qwen3_4b\.yaml", CONFIG, TRAIN_4B),
        Row(r"--stage=2 --config=configs/train_qwen3_4b\.yaml", CONFIG, TRAIN_4B),
        Row(r"--stage=3 --config=configs/train_qwen3_4b\.yaml", CONFIG, TRAIN_4B),
    ],
}

# The other commands of the shell blocks: matched (full match), never run.
ASSIGNMENT = re.compile(r"(?:export )?[A-Za-z_]\w*=.*")  # context for the commands after it
NOT_RUN: dict[str, str] = {
    r"python3 -m venv \.venv": "this test runs in one",
    r"(?:\.venv/bin/)?pip install .*": "installs; .ci/run installs from scratch",
    r"\.venv/bin/python -m pytest.*": "the test suite itself",
    r"hf download .*": "needs the Hub; its options are checked against the installed `hf`",
    r"gcloud .*": "Google Cloud",
    r"launch/\w+\.sh(?: .*)?": "TPU-VM glue: tests/test_launch_scripts.py",
    r"python bench/replication/run\.py .*": "tests/test_replication.py runs its CI form",
}


class Command(NamedTuple):
    doc: str
    text: str  # as written, continuations joined
    key: str  # spaces collapsed: what the tables match


def _split_shell(line: str) -> list[str]:
    """One line -> its commands: split at `&&` and `;` and cut at a `#` comment, outside quotes."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                cur += line[i : i + 2]
                i += 2
                continue
            quote = None if c == quote else quote
        elif c == "\\":
            cur += line[i : i + 2]
            i += 2
            continue
        elif c in "'\"":
            quote = c
        elif c == "#" and (not cur or cur[-1].isspace()):
            break
        elif line.startswith("&&", i) or c == ";":
            parts.append(cur)
            cur, i = "", i + (2 if c == "&" else 1)
            continue
        cur += c
        i += 1
    return [p.strip() for p in [*parts, cur] if p.strip()]


FENCE = re.compile(
    r"^[ \t]*```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.M | re.S
)


def _doc_commands(doc: str) -> list[Command]:
    """The commands of a page's shell blocks, in order. Unlabelled blocks also hold layouts and
    outputs: only their lines that call dasd_jax.launch count."""
    out = []
    for m in FENCE.finditer((REPO / doc).read_text()):
        lang = m["lang"].lower()
        if lang and lang not in SHELL_LANGS:
            continue
        body = textwrap.dedent(m["body"]).replace("\\\n", " ")
        for line in body.splitlines():
            for text in _split_shell(line):
                if lang or "dasd_jax.launch" in text:
                    out.append(Command(doc, text, " ".join(text.split())))
    return out


def _launch_args(cmd: Command) -> str | None:
    """What follows `-m dasd_jax.launch`, or None for another command. A form of calling the
    launcher that LAUNCHER does not know is an error, not a command to skip."""
    if "dasd_jax.launch" not in cmd.key:
        return None
    m = LAUNCHER.fullmatch(cmd.key)
    assert m, f"{cmd.doc}: unknown way of calling the launcher: {cmd.text!r} (extend LAUNCHER)"
    return m["args"] or ""


def _row(cmd: Command) -> Row:
    args = _launch_args(cmd)
    rows = [r for r in LAUNCH.get(cmd.doc, []) if re.fullmatch(r.args, args)]
    assert len(rows) == 1, (
        f"{cmd.doc}: {cmd.text!r} matches {len(rows)} rows of LAUNCH; give it exactly one "
        "(RUN if it is cheap on a CPU, else CONFIG) with the reason"
    )
    return rows[0]


def test_every_doc_command_is_handled():
    """Each launch command has exactly one LAUNCH row, each other command a NOT_RUN row or is
    an assignment; no row is stale. Runs nothing: a new doc command fails here at once."""
    commands = [c for doc in DOCS for c in _doc_commands(doc)]
    assert any(_launch_args(c) is not None for c in commands), "no launch commands found"
    used, not_run_used, unknown = set(), set(), []
    for cmd in commands:
        if _launch_args(cmd) is not None:
            row = _row(cmd)
            used.add((cmd.doc, row.args))
            assert row.how in (RUN, CONFIG)
            assert row.how == CONFIG or "..." not in cmd.key.split(), cmd.text
            continue
        if ASSIGNMENT.fullmatch(cmd.key):
            continue
        hits = [p for p in NOT_RUN if re.fullmatch(p, cmd.key)]
        not_run_used.update(hits)
        if not hits:
            unknown.append(f"{cmd.doc}: {cmd.text}")
    assert not unknown, "commands neither run nor listed in NOT_RUN:\n" + "\n".join(unknown)
    stale = [
        f"{d}: {r.args}" for d, rows in LAUNCH.items() for r in rows if (d, r.args) not in used
    ]
    assert not stale, "LAUNCH rows that match no doc command:\n" + "\n".join(stale)
    assert set(NOT_RUN) == not_run_used, f"stale NOT_RUN rows: {set(NOT_RUN) - not_run_used}"


def test_docs_use_hf_not_huggingface_cli():
    """No page names huggingface-cli (gone from the pinned huggingface_hub, which ships `hf`),
    and every option of a doc's `hf download` is one the installed `hf download` has."""
    launch_dir = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "launch").glob("*"))
    pages = [*DOCS, *(p for p in launch_dir if (REPO / p).is_file())]
    cli = [p for p in pages if "huggingface-cli" in (REPO / p).read_text()]
    assert not cli, f"huggingface-cli is gone from huggingface_hub (use `hf`): {cli}"
    hf = Path(sys.executable).with_name("hf")
    assert hf.is_file(), "the `hf` command of huggingface_hub is not installed"
    options = subprocess.run(
        [hf, "download", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    downloads = [c for doc in DOCS for c in _doc_commands(doc) if c.key.startswith("hf download")]
    assert downloads, "no hf download commands found"
    for cmd in downloads:
        for word in shlex.split(cmd.text):
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{cmd.doc}: {word} in {cmd.text!r}"


def test_launch_takes_overrides_before_between_and_after_flags(capsys):
    """docs/quickstart.md's `--stage=mixed_policy $T teacher.path=...`, with --config= inside
    $T, failed with argparse's "unrecognized arguments"; an unknown flag still fails."""
    argv = ["--stage=mixed_policy", "run_dir=r", "--config=configs/train_qwen3_4b.yaml"]
    assert launch.main([*argv, "teacher.path=/t", "--print-config", "student.path=/s"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["teacher"]["path"], printed["student"]["path"]) == ("/t", "/s")
    with pytest.raises(SystemExit) as exc:
        launch.main([*argv, "--no-such-flag", "teacher.path=/t"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The stand-ins for /ckpt/... and /data/... (see the module docstring)."""
    import transformers
    from conftest import make_hf_qwen3

    from dasd_jax import embedded
    from dasd_jax.select.filters import think_to_harmony
    from dasd_jax.tokenizer import (
        build_gpt_oss_tokenizer,
        build_qwen3_tokenizer,
        encode_with_offsets,
        load_tokenizer,
    )

    root = tmp_path_factory.mktemp("world")
    qwen3 = root / "ckpt/Qwen3-4B-Instruct-2507"
    ids = dict(bos_token_id=151643, eos_token_id=151645)  # the real vocabulary's
    make_hf_qwen3(qwen3, vocab_size=151936, tie_word_embeddings=True, **ids)
    shutil.copytree(build_qwen3_tokenizer(), qwen3, dirs_exist_ok=True)
    (root / "ckpt/Qwen3-4B").symlink_to(qwen3)
    # `hf download openai/gpt-oss-120b --include "*.json"`: config and tokenizer, no weights
    gpt_oss = root / "ckpt/gpt-oss-120b"
    tiny = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, head_dim=16)
    transformers.GptOssConfig(vocab_size=201088, **tiny).save_pretrained(gpt_oss)
    shutil.copytree(build_gpt_oss_tokenizer(), gpt_oss, dirs_exist_ok=True)

    # the released SFT rows and, in gpt-oss ids, their teacher log-prob rows (harmony tokens
    # from inside the analysis channel on, as released)
    rows = embedded.demo_rows()
    assert len(rows) == DEMO_ROWS
    oss = load_tokenizer(gpt_oss)
    skip = len(encode_with_offsets(oss, "<|channel|>analysis<|message|>")[0])
    logprobs = []
    for r in rows:
        token_ids = encode_with_offsets(oss, think_to_harmony(r["output"]))[0][skip:]
        lps = [-0.5] * len(token_ids)
        logprobs.append(dict(sample_uuid=r["uuid"], token_ids=token_ids, logprobs=lps))
    released = "sr/Superior-Reasoning-SFT-gpt-oss-120b-stage1-train-data.jsonl"
    for sft, lp in [
        ("stage1.jsonl", "stage1-logprob.jsonl"),
        (released, "sr-logprob/stage1.jsonl"),
    ]:
        for name, data in [(sft, rows), (lp, logprobs)]:
            path = root / "data" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(x) + "\n" for x in data))
    return root


def _script(context: list[str], cmd: Command, row: Row, root: Path) -> str:
    """The bash text that runs `cmd`: the page's assignments so far, then the command with the
    launcher as this interpreter, the user's paths as the world's, --print-config for CONFIG.
    The arguments as bash expanded them are also written to `.argv` (NUL-separated)."""
    args = row.instead if row.instead is not None else cmd.text.split("dasd_jax.launch", 1)[1]
    if row.how == CONFIG:
        args = " ".join(w for w in args.split(" ") if w != "...")
    lines = [
        *context,
        f"set -- {args.strip()}",
        "printf '%s\\0' \"$@\" > .argv",
        '"$PY" -m dasd_jax.launch "$@"' + (" --print-config" if row.how == CONFIG else ""),
    ]
    return "\n".join(USER_PATH.sub(f"{root}/\\1/", s) for s in lines) + "\n"


def _check_overrides_applied(printed: dict, argv: list[str]) -> None:
    """Each `key=value` of the command line is in the printed config, with that value."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, raw = arg.split("=", 1)
        node = printed
        for part in key.split("."):
            node = node[part]
        given = yaml.safe_load(raw)  # a str field keeps the text (export.stage=2 -> "2")
        assert node == given or node == raw, f"{key}: printed {node!r}, given {raw!r}"


@pytest.mark.parametrize("doc", sorted(LAUNCH))
def test_doc_commands_run(doc, world, tmp_path):
    """Runs the page's launch commands in page order, in one scratch folder (a later command
    may read an earlier one's output, as a reader following the page would)."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # as a user runs them: one CPU device
    context, failures = [], []
    for cmd in _doc_commands(doc):
        if _launch_args(cmd) is None:
            if ASSIGNMENT.fullmatch(cmd.key):
                context.append(cmd.text)
            continue
        row = _row(cmd)
        script = _script(context, cmd, row, world)
        timeout = 300 if row.how == RUN else 60
        proc = subprocess.run(
            ["bash", "-euc", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            assert proc.returncode == 0, f"exit {proc.returncode}"
            if row.how == CONFIG:
                argv = (tmp_path / ".argv").read_text().split("\0")[:-1]
                _check_overrides_applied(yaml.safe_load(proc.stdout), argv)
            elif row.check:
                row.check(proc, tmp_path)
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            failures.append(f"{cmd.text}\n  as: {script.strip()}\n  {e!r}\n{proc.stderr[-3000:]}")
    assert not failures, f"{len(failures)} commands of {doc} fail:\n\n" + "\n\n".join(failures)
