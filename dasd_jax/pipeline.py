"""The pipeline: stage order, the run directory's manifest, and `--stage=all`.

Consumes a `Config` and the stage modules' `run(cfg) -> summary` functions (the launcher's
table). Produces `<run_dir>/manifest.json`: one entry per step that ran in this run directory,
with the step's config (the sections it reads), a fingerprint of every input and output path,
the code version, start/end times, the counts it reports (rows in = out + rejected) and its
summary; plus `<run_dir>/pipeline.md`, a table of the last `--stage=all`.

Steps of `--stage=all`, in order (a step is a stage with a few overrides):

    sample -> score -> select (low T) -> select_high_t -> 1 -> 2 -> mixed_policy -> 3
           -> evaluate -> export

- `sample` runs only when `score.input` is empty: score then reads `<run_dir>/sample`. With
  `score.input` set (e.g. the released Superior-Reasoning data), the pipeline starts at score.
- `select` runs twice: `select_stage.temperatures=low_t` into `<run_dir>/select` (stage 1's
  data) and `high_t` into `<run_dir>/select_high_t` (stage 2's).

Re-runs. A step whose manifest entry is `complete` and whose inputs and config still have the
recorded fingerprints is skipped by `--stage=all`; a step that was running when the job died
runs again and resumes inside (each stage keeps its finished shards / checkpoints). When the
inputs or the config of a complete step changed, the step's outputs were made from something
else: the run stops and names what changed, unless `--force`, which moves the step's outputs
aside (`<path>.old-<time>`) and runs it and every later step again. A single `--stage=X` run
checks the same way.

Fingerprints are cheap: for every file under an input or output path, its relative name, its
size and the SHA-256 of its first and last MiB (whole file when smaller than 2 MiB).
Multi-host: every process runs every step; process 0 alone writes the manifest.

gs:// run directories and paths (`dasd_jax.storage`): paths are `pathlib.Path`s when local and
`epath.Path`s on gs:// (the same operations); the manifest and pipeline.md are read and
written through storage (atomically). A gs:// path is fingerprinted like a local one: its
objects are listed (`storage.walk_files`, one listing per prefix level) with their sizes, and
the first and last MiB of each are read (two ranged reads) and hashed, so a folder has the
same fingerprint on the bucket as on a disk. We do not use the objects' MD5/CRC32C from the
listing: composite objects have no MD5, CRC32C is not a content hash we compare elsewhere,
and the edge hash keeps one rule for both. `--force` moves a gs:// output aside by copying
each object to `<path>.old-<time>` (server-side), then deleting the originals (Cloud Storage
has no rename); a kill in between leaves the step's manifest entry as it was, so the next
`--force` run moves what is left.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etils import epath

from dasd_jax import faults, runlock, storage
from dasd_jax.config import Config, load_config, to_dict
from dasd_jax.records import write_json
from dasd_jax.resume import diff_keys

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_EDGE = 1 << 20  # bytes hashed at each end of a large file


class PipelineError(RuntimeError):
    """A step cannot run: a missing upstream output, or inputs changed under finished work."""


# --------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Step:
    name: str  # manifest key
    stage: str  # the launcher's stage
    sections: tuple[str, ...]  # config sections whose values the step's output depends on
    overrides: tuple[str, ...] = ()  # dotted overrides ({run_dir} expanded) in `--stage=all`


STEPS: tuple[Step, ...] = (
    Step("sample", "sample", ("seed", "teacher", "sample", "bad_rows")),
    Step(
        "score",
        "score",
        ("student", "teacher", "score", "bad_rows"),
        ("score.input={run_dir}/sample",),
    ),
    Step(
        "select",
        "select",
        ("select", "filters", "select_stage", "bad_rows"),
        ("select_stage.temperatures=low_t", "select_stage.output={run_dir}/select"),
    ),
    Step(
        "select_high_t",
        "select",
        ("select", "filters", "select_stage", "bad_rows"),
        ("select_stage.temperatures=high_t", "select_stage.output={run_dir}/select_high_t"),
    ),
    Step("1", "1", ("seed", "student", "train", "stage1", "bad_rows")),
    Step("2", "2", ("seed", "train", "stage2", "bad_rows")),
    Step(
        "mixed_policy",
        "mixed_policy",
        ("seed", "teacher", "sample", "filters", "mixed_policy", "bad_rows"),
    ),
    Step("3", "3", ("seed", "train", "stage3", "bad_rows")),
    Step("evaluate", "evaluate", ("seed", "student", "sample", "evaluate")),
    Step("export", "export", ("export",), ("export.stage=3",)),
)
STEP_BY_NAME = {s.name: s for s in STEPS}


AnyPath = Path | epath.Path


def _p(path: str | os.PathLike) -> AnyPath:
    """A `pathlib.Path` for a local path; an `epath.Path` (same operations) for gs://."""
    return storage.as_path(path) if storage.is_remote(path) else Path(path)


def _rd(cfg: Config) -> AnyPath:
    return _p(cfg.run_dir)


def _stage_outputs(n: int) -> Callable[[Config], list[AnyPath]]:
    return lambda cfg: [_rd(cfg) / f"stage{n}" / "final.json", _rd(cfg) / f"stage{n}" / "export"]


def _select_out(cfg: Config) -> AnyPath:
    return _p(cfg.select_stage.output) if cfg.select_stage.output else _rd(cfg) / "select"


def _export_out(cfg: Config) -> list[AnyPath]:
    return [_p(cfg.export.output)] if cfg.export.output else [_rd(cfg) / "export"]


def _eval_out(cfg: Config) -> list[AnyPath]:
    return [_p(cfg.evaluate.output) if cfg.evaluate.output else _rd(cfg) / "evaluate"]


def _mp_out(cfg: Config) -> list[AnyPath]:
    out = cfg.mixed_policy.output
    return [_p(out) if out else _rd(cfg) / "mixed_policy"]


# Outputs: what the step writes (fingerprinted when it completes; moved aside by --force).
OUTPUTS: dict[str, Callable[[Config], list[AnyPath]]] = {
    "sample": lambda cfg: [_rd(cfg) / "sample"],
    "score": lambda cfg: [_rd(cfg) / "score"],
    "select": lambda cfg: [_select_out(cfg)],
    "1": _stage_outputs(1),
    "2": _stage_outputs(2),
    "mixed_policy": _mp_out,
    "3": _stage_outputs(3),
    "evaluate": _eval_out,
    "export": _export_out,
}


def _glob_or_path(spec: str) -> list[AnyPath]:
    if not glob.has_magic(spec):
        return [_p(spec)]
    if storage.is_remote(spec):
        return [_p(p) for p in storage.glob(spec)]
    return [Path(p) for p in sorted(glob.glob(spec))]


def _train_inputs(n: int) -> Callable[[Config], list[AnyPath]]:
    def inputs(cfg: Config) -> list[AnyPath]:
        scfg = getattr(cfg, f"stage{n}")
        out: list[AnyPath] = []
        for src in scfg.sources.values():
            out += _glob_or_path(src.path.replace("{run_dir}", cfg.run_dir))
        if scfg.init_from:
            out.append(_p(scfg.init_from))
        elif n == 1:
            if cfg.student.path:
                out.append(_p(cfg.student.path))
        else:
            out.append(_rd(cfg) / f"stage{n - 1}" / "final.json")
        return out

    return inputs


def _mp_inputs(cfg: Config) -> list[AnyPath]:
    mp = cfg.mixed_policy
    out: list[AnyPath] = []
    for spec in getattr(mp, "sources", ()):
        out += _glob_or_path(spec.replace("{run_dir}", cfg.run_dir))
    student = getattr(mp, "student", "")
    out.append(_p(student) if student else _rd(cfg) / "stage2" / "final.json")
    if cfg.teacher.path:
        out.append(_p(cfg.teacher.path))
    return out


# Inputs: what the step reads (fingerprinted when it starts).
INPUTS: dict[str, Callable[[Config], list[AnyPath]]] = {
    "sample": lambda cfg: [_p(p) for p in (cfg.sample.input, cfg.teacher.path) if p],
    "score": lambda cfg: [
        _p(p) for p in (cfg.score.input, cfg.score.teacher_logprobs, cfg.student.path) if p
    ],
    "select": lambda cfg: [
        _p(cfg.select_stage.input) if cfg.select_stage.input else _rd(cfg) / "score"
    ],
    "1": _train_inputs(1),
    "2": _train_inputs(2),
    "mixed_policy": _mp_inputs,
    "3": _train_inputs(3),
    "evaluate": lambda cfg: [
        *(_p(b) for b in getattr(cfg.evaluate, "benchmarks", ()) if b),
        *(p for n in (1, 2, 3) if (p := _rd(cfg) / f"stage{n}" / "final.json").exists()),
    ],
    "export": lambda cfg: [_rd(cfg) / f"stage{n}" / "checkpoints" for n in (1, 2, 3)],
}

# What a step needs from an earlier one: (path, the stage that writes it). Checked before a
# step runs, so the message names the stage to run first.
REQUIRES: dict[str, Callable[[Config], list[tuple[AnyPath, str]]]] = {
    "score": lambda cfg: (
        [(_rd(cfg) / "sample", "sample")]
        if cfg.score.input and _p(cfg.score.input) == _rd(cfg) / "sample"
        else []
    ),
    "select": lambda cfg: [] if cfg.select_stage.input else [(_rd(cfg) / "score", "score")],
    "2": lambda cfg: [] if cfg.stage2.init_from else [(_rd(cfg) / "stage1" / "final.json", "1")],
    "3": lambda cfg: [] if cfg.stage3.init_from else [(_rd(cfg) / "stage2" / "final.json", "2")],
    "mixed_policy": lambda cfg: (
        [] if getattr(cfg.mixed_policy, "student", "") else [(_rd(cfg) / "stage2" / "export", "2")]
    ),
}


def step_for(stage: str, cfg: Config) -> Step:
    """The manifest step of a single `--stage=X` run (select is keyed by its output folder)."""
    if stage == "select":
        name = _select_out(cfg).name
        return STEP_BY_NAME.get(name, Step(name, "select", STEP_BY_NAME["select"].sections))
    return STEP_BY_NAME.get(stage, Step(stage, stage, ()))


def single_step(
    stage: str, cfg: Config, config_path: str | None, overrides: list[str]
) -> tuple[Step, Config]:
    """The step and config of a single `--stage=X` run: as `--stage=all` would run it where
    the run directory already holds what that step reads (a standalone `--stage=score` with
    no `score.input` scores `<run_dir>/sample` when the sample stage finished there), so the
    manifest records the same config whichever way the step ran."""
    step = step_for(stage, cfg)
    if stage == "score" and not cfg.score.input:
        from dasd_jax.score import input_spec  # raises on an unfinished sample output

        if input_spec(cfg):
            cfg = with_overrides(cfg, step, config_path, overrides)
    return step, cfg


# --------------------------------------------------------------------------- fingerprints


def _file_digest(path: str | os.PathLike, size: int) -> str:
    h = hashlib.sha256()
    with storage.open_read(path, "rb") as f:  # local or gs:// (ranged reads)
        if size <= 2 * _EDGE:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()


def _ignored(full: str) -> bool:
    """Our own temporaries and moved-aside outputs: not part of what a step read or wrote."""
    return os.path.basename(full).startswith(".") or ".old-" in full


def _remote_fingerprint(path: str) -> dict[str, Any]:
    """`fingerprint` of a gs:// file or folder: the same fields, computed the same way."""
    if storage.isdir(path):
        # in pathlib's order (by path parts), as the local walk sorts
        kind, rels = "dir", sorted(storage.walk_files(path), key=lambda r: r.split("/"))
    elif storage.exists(path):
        kind, rels = "file", [""]
    else:
        return {"path": path, "kind": "missing"}
    h = hashlib.sha256()
    total = n = 0
    for rel in rels:
        full = storage.join(path, rel) if rel else path
        if _ignored(full):
            continue
        size = storage.stat(full)[0]
        total, n = total + size, n + 1
        h.update(f"{rel or os.path.basename(path)}\0{size}\0{_file_digest(full, size)}\n".encode())
    return {"path": path, "kind": kind, "files": n, "bytes": total, "sha256": h.hexdigest()}


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{path, kind, files, bytes, sha256} of a file or folder (missing: kind 'missing'),
    local or gs://."""
    if storage.is_remote(path):
        return _remote_fingerprint(os.fspath(path))
    path = Path(path)
    if not path.exists():
        return {"path": str(path), "kind": "missing"}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    # ignore our own temporaries and logs that change without changing the data
    files = [f for f in files if not _ignored(str(f))]
    h = hashlib.sha256()
    total = 0
    for f in files:
        rel = f.name if f == path else str(f.relative_to(path))
        size = f.stat().st_size
        total += size
        h.update(f"{rel}\0{size}\0{_file_digest(f, size)}\n".encode())
    return {
        "path": str(path),
        "kind": "file" if path.is_file() else "dir",
        "files": len(files),
        "bytes": total,
        "sha256": h.hexdigest(),
    }


def config_of(cfg: Config, step: Step) -> dict[str, Any]:
    d = to_dict(cfg)
    return {k: d[k] for k in step.sections if k in d}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> dict[str, Any]:
    """Package version, git commit (and dirty flag) when run from a checkout, source hash."""
    import dasd_jax

    root = Path(dasd_jax.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    out: dict[str, Any] = {"version": dasd_jax.__version__, "source_sha256": h.hexdigest()}
    try:
        git = ["git", "-C", str(root.parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "dasd_jax"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# --------------------------------------------------------------------------- the manifest


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _is_writer() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no backend yet: a single process
        return True


class Manifest:
    """`<run_dir>/manifest.json`, rewritten atomically after every change."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = _p(run_dir) / MANIFEST
        if self.path.exists():
            try:
                self.data = json.loads(storage.read_text(self.path))
            except json.JSONDecodeError as e:
                msg = f"{self.path} is not valid JSON ({e}): fix or remove it"
                raise PipelineError(msg) from None
        else:
            self.data = {"run_dir": str(run_dir), "created": _now(), "steps": {}}

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.data["steps"].get(name)

    def save(self) -> None:
        if _is_writer():
            write_json(self.path, self.data)

    def set(self, name: str, entry: dict[str, Any]) -> None:
        self.data["steps"][name] = entry
        self.save()


def changes(entry: dict[str, Any], cfg: Config, step: Step) -> list[str]:
    """What differs between a complete step's record and now (empty: nothing)."""
    out = []
    if entry.get("config_sha256") != _hash(config_of(cfg, step)):
        old, new = entry.get("config", {}), config_of(cfg, step)
        keys = diff_keys(old, new)
        out.append("config: " + (", ".join(keys[:8]) if keys else "changed"))
    recorded = {i["path"]: i for i in entry.get("inputs", [])}
    for path in INPUTS.get(step.stage, lambda c: [])(cfg):
        now = fingerprint(path)
        was = recorded.get(str(path))
        if was is None:
            out.append(f"input {path}: new")
        elif was.get("sha256") != now.get("sha256") or was["kind"] != now["kind"]:
            out.append(f"input {path}: changed ({was.get('files')} -> {now.get('files')} files)")
    for path in set(recorded) - {str(p) for p in INPUTS.get(step.stage, lambda c: [])(cfg)}:
        out.append(f"input {path}: no longer read")
    return out


def counts_of(stage: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Rows in / out / rejected of a stage's summary (None where the notion does not apply)."""
    if isinstance(summary.get("counts"), dict):
        return summary["counts"]
    if stage == "sample" and "prompts_in" in summary:
        return {
            "in": summary["prompts_in"],
            "out": summary["prompts_out"],
            "rejected": summary["rejects"],
            "candidates": summary.get("candidates"),
        }
    return None


def counts_balance(counts: dict[str, Any] | None) -> bool:
    """in == out + rejected (+ other_temperature), where counts are given; for the sample
    stage also samples generated == candidates written + candidates rejected."""
    if not counts or "in" not in counts:
        return True
    if "samples" in counts and counts["samples"] != counts.get("candidates", 0) + counts.get(
        "candidates_rejected", 0
    ):
        return False
    return counts["in"] == counts.get("out", 0) + counts.get("rejected", 0) + counts.get(
        "other_temperature", 0
    )


def _move_aside(paths: list[AnyPath]) -> list[str]:
    moved = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for p in paths:
        if p.exists():
            dest = p.with_name(f"{p.name}.old-{stamp}")
            if storage.is_remote(p):
                _move_remote(os.fspath(p), os.fspath(dest))
            else:
                os.replace(p, dest)
            moved.append(str(dest))
    return moved


def _move_remote(src: str, dest: str) -> None:
    """A gs:// file or folder to `dest`: every object copied (server-side), then deleted."""
    rels = storage.walk_files(src) if storage.isdir(src) else [""]
    pairs = [(storage.join(src, r), storage.join(dest, r)) if r else (src, dest) for r in rels]
    for a, b in pairs:
        storage.copy(a, b)
    for a, _ in pairs:
        storage.unlink(a)


def _trim(summary: Any) -> Any:
    """The summary as stored in the manifest: JSON-able, long lists cut."""
    text = json.dumps(summary, default=str)
    if len(text) <= 20000:
        return json.loads(text)
    return {"truncated": True, "keys": sorted(summary) if isinstance(summary, dict) else None}


# --------------------------------------------------------------------------- running steps


def with_overrides(cfg: Config, step: Step, config_path: str | None, overrides: list[str]):
    """`cfg` with the step's overrides (user overrides win over them)."""
    if not step.overrides:
        return cfg
    user_keys = {o.split("=", 1)[0] for o in overrides}
    extra = [
        o.replace("{run_dir}", cfg.run_dir)
        for o in step.overrides
        if o.split("=", 1)[0] not in user_keys
    ]
    if step.name == "score" and cfg.score.input:  # the user's input: not the sample folder
        extra = [o for o in extra if not o.startswith("score.input=")]
    return load_config(config_path, [*extra, *overrides])


def check_required(cfg: Config, step: Step) -> None:
    for path, stage in REQUIRES.get(step.name, REQUIRES.get(step.stage, lambda c: []))(cfg):
        if not path.exists():
            raise PipelineError(
                f"step {step.name} needs {path}, which does not exist: run "
                f"`python -m dasd_jax.launch --stage={stage}` first with run_dir={cfg.run_dir}"
            )


def _lock(run_dir: str) -> contextlib.AbstractContextManager:
    """The run directory's lock (`runlock`), held by process 0 (the manifest's writer)."""
    return runlock.hold(run_dir) if _is_writer() else contextlib.nullcontext()


def run_step(
    cfg: Config, step: Step, run: Callable[[Config], dict], *, force: bool = False
) -> dict[str, Any]:
    """Run one step with its manifest bookkeeping; returns the stage's summary. Refuses
    (`runlock.RunLocked`) while another process holds the run directory."""
    with _lock(cfg.run_dir):
        return _run_step(cfg, step, run, force=force)


def _run_step(
    cfg: Config, step: Step, run: Callable[[Config], dict], *, force: bool = False
) -> dict[str, Any]:
    manifest = Manifest(cfg.run_dir)
    entry = manifest.entry(step.name)
    if entry and entry.get("status") == "complete":
        changed = changes(entry, cfg, step)
        if changed:
            if not force:
                raise PipelineError(
                    f"step {step.name} already completed in {cfg.run_dir}, but since then: "
                    + "; ".join(changed)
                    + ". Its outputs were made from something else: re-run with --force to "
                    "move them aside and redo the step, or use another run_dir"
                )
            moved = _move_aside(OUTPUTS.get(step.stage, lambda c: [])(cfg))
            log.warning("step %s: %s; moved aside: %s", step.name, "; ".join(changed), moved)
        elif force:
            _move_aside(OUTPUTS.get(step.stage, lambda c: [])(cfg))
    elif force:  # killed or failed: --force redoes it rather than resuming
        moved = _move_aside(OUTPUTS.get(step.stage, lambda c: [])(cfg))
        if moved:
            log.warning("step %s: --force: moved aside %s", step.name, moved)
    check_required(cfg, step)
    if _is_writer():  # what a killed earlier attempt left half-written
        swept = storage.sweep_temporaries(cfg.run_dir, recursive=False)  # the manifest's
        for out in OUTPUTS.get(step.stage, lambda c: [])(cfg):
            swept += storage.sweep_temporaries(out)
        if swept:
            log.info("step %s: removed %d temporaries of a killed run", step.name, len(swept))
    inputs = [fingerprint(p) for p in INPUTS.get(step.stage, lambda c: [])(cfg)]
    started, t0 = _now(), time.perf_counter()
    record = {
        "stage": step.stage,
        "status": "running",
        "started": started,
        "config": config_of(cfg, step),
        "config_sha256": _hash(config_of(cfg, step)),
        "inputs": inputs,
        "code_version": code_version(),
        "argv": sys.argv,
    }
    manifest.set(step.name, record)
    faults.step = step.name  # the stage's own writes; the manifest's below are not
    try:
        summary = run(cfg)
    except BaseException as e:
        faults.step = "-"
        record.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000], finished=_now())
        Manifest(cfg.run_dir).set(step.name, record)  # re-read: a stage may not touch it
        raise
    faults.step = "-"
    summary = summary if isinstance(summary, dict) else {"result": summary}
    counts = counts_of(step.stage, summary)
    preempted = bool(summary.get("preempted"))
    record.update(
        status="preempted" if preempted else "complete",
        finished=_now(),
        seconds=round(time.perf_counter() - t0, 2),
        counts=counts,
        counts_balance=counts_balance(counts),
        outputs=[fingerprint(p) for p in OUTPUTS.get(step.stage, lambda c: [])(cfg)],
        summary=_trim(summary),
    )
    if not counts_balance(counts):
        log.error("step %s: counts do not balance: %s", step.name, counts)
    Manifest(cfg.run_dir).set(step.name, record)
    return summary


def run_all(
    config_path: str | None,
    overrides: list[str],
    stage_fn: Callable[[str], Callable[[Config], dict]],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """`--stage=all`: every step in order, skipping complete ones; the summary of the run.
    The run directory is locked for the whole run (`runlock`)."""
    base = load_config(config_path, overrides)
    with _lock(base.run_dir):
        return _run_all(base, config_path, overrides, stage_fn, force=force)


def _run_all(
    base: Config,
    config_path: str | None,
    overrides: list[str],
    stage_fn: Callable[[str], Callable[[Config], dict]],
    *,
    force: bool,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    forced_from: str | None = None
    for step in STEPS:
        if step.name == "sample" and base.score.input:
            log.info("pipeline: score.input is set (%s): no teacher sampling", base.score.input)
            rows.append({"step": step.name, "status": "not used"})
            continue
        cfg = with_overrides(base, step, config_path, overrides)
        entry = Manifest(cfg.run_dir).entry(step.name)
        if entry and entry.get("status") == "complete" and forced_from is None:
            changed = changes(entry, cfg, step)
            if not changed:
                log.info("pipeline: %s complete (%ss), skipped", step.name, entry.get("seconds"))
                rows.append(_row(step, entry, "skipped"))
                continue
            if not force:
                raise PipelineError(
                    f"step {step.name} completed earlier, but since then: "
                    + "; ".join(changed)
                    + ". Re-run with --force to redo it and every later step, or use "
                    "another run_dir"
                )
            forced_from = step.name
            log.warning(
                "pipeline: %s changed (%s): redoing it and every later step",
                step.name,
                "; ".join(changed),
            )
        log.info("pipeline: step %s (--stage=%s) %s", step.name, step.stage, step.overrides)
        summary = run_step(cfg, step, stage_fn(step.stage), force=forced_from is not None)
        entry = Manifest(cfg.run_dir).entry(step.name) or {}
        rows.append(_row(step, entry, "ran"))
        if summary.get("preempted"):
            log.warning("pipeline: %s stopped by SIGTERM; re-run to continue", step.name)
            return _finish(base, rows, t0, preempted=True)
    return _finish(base, rows, t0)


def _row(step: Step, entry: dict[str, Any], how: str) -> dict[str, Any]:
    return {
        "step": step.name,
        "status": how,
        "seconds": entry.get("seconds"),
        "counts": entry.get("counts"),
        "balance": entry.get("counts_balance", True),
    }


def _finish(cfg: Config, rows: list[dict], t0: float, preempted: bool = False) -> dict:
    summary: dict[str, Any] = {
        "run_dir": cfg.run_dir,
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": rows,
        "manifest": str(_rd(cfg) / MANIFEST),
    }
    if preempted:
        summary["preempted"] = True
    report = render_report(cfg, rows, summary["seconds"])
    if _is_writer():
        from dasd_jax.records import atomic_write

        with atomic_write(_rd(cfg) / "pipeline.md") as f:
            f.write(report)
    summary["report"] = str(_rd(cfg) / "pipeline.md")
    print(report)
    return summary


def _fmt_counts(c: dict[str, Any] | None) -> str:
    if not c or "in" not in c:
        return ""
    parts = [f"{c['in']} in", f"{c.get('out', 0)} out", f"{c.get('rejected', 0)} rejected"]
    if c.get("other_temperature"):
        parts.append(f"{c['other_temperature']} other T")
    if "samples" in c:
        parts.append(
            f"samples: {c['samples']} -> {c.get('candidates', 0)} candidates, "
            f"{c.get('candidates_rejected', 0)} rejected"
        )
    return ", ".join(parts)


def render_report(cfg: Config, rows: list[dict], seconds: float) -> str:
    rd = _rd(cfg)
    lines = [
        f"# dasd_jax pipeline: {rd}",
        "",
        "| step | status | seconds | rows | balanced |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        bal = "" if not r.get("counts") else ("yes" if r.get("balance", True) else "NO")
        lines.append(
            f"| {r['step']} | {r['status']} | {sec} | {_fmt_counts(r.get('counts'))} | {bal} |"
        )
    lines += ["", f"total: {seconds:.1f} s", "", "Reports:"]
    for rel in (
        "sample/report.md",
        "score/summary.json",
        "select/report.md",
        "select_high_t/report.md",
        "stage1/metrics.jsonl",
        "stage2/metrics.jsonl",
        "mixed_policy/report.md",
        "stage3/metrics.jsonl",
        "evaluate/report.md",
        "export",
        MANIFEST,
    ):
        if (rd / rel).exists():
            lines.append(f"- {rd / rel}")
    table = rd / "evaluate" / "report.md"
    if table.exists():
        lines += ["", "## Evaluation", "", *_eval_table(table)]
    if not cfg.student.path:
        lines += [
            "",
            "This was the embedded default: a tiny gpt-oss teacher trained in seconds on the",
            "built-in answers, a tiny random Qwen3 student and a few SFT steps per stage. Every",
            "piece ran for real (tokenizers, log-probs, DAS, packing, checkpoints, sampling,",
            "math-verify), but a student this small and this briefly trained is not expected to",
            "solve anything: read the reports for their structure. docs/replication.md shows the",
            "method's effect on a task small enough for a CPU; docs/quickstart.md, a real run.",
        ]
    return "\n".join(lines) + "\n"


def _eval_table(path: AnyPath) -> list[str]:
    """The first markdown table of the evaluate report."""
    out: list[str] = []
    for line in storage.read_text(path).splitlines():
        if line.startswith("|"):
            out.append(line)
        elif out:
            break
    return out
