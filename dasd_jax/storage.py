"""Paths that may be local or on Cloud Storage (`gs://`): open, atomic write, exists, glob.

Consumes path strings (or `os.PathLike`s) naming local files or objects (`gs://bucket/key`,
through `etils.epath`, which uses `gcsfs` or `tf.io.gfile`) and produces file objects and
existence/listing answers, so a stage's inputs, outputs and checkpoints may live on either.

The guarantee stages rely on, for both kinds of path: **a file that exists under its final
name is complete.** `atomic_write(path)` never lets a reader (or a restarted run) see a
partial file under `path`:
- local: the content goes to a temporary sibling (`.NAME.XXXX.tmp`), is fsynced, then
  `os.replace`d onto `path` (a POSIX rename: atomic within one filesystem);
- gs://: Cloud Storage has no rename, but each object write is atomic (an object appears
  only when its upload is finalised) and listing and reads are strongly consistent. The
  content is written to a local temporary file; only when it is complete is it uploaded, to
  a temporary object `.NAME.<random>.tmp` in the same folder; that finished object is then
  copied server-side onto `path` (one atomic object write) and the temporary object deleted.
  The final name is never the target of a streaming upload, so an upload cut short (crash,
  preemption, an exception in the writer) can leave at most a `.NAME.*.tmp` object, never a
  partial `path`. Leftover `.*.tmp` objects match no `part-*` glob and may be deleted.

`atomic_path(path)` gives the same guarantee to writers that need a file name rather than a
file object (ArrayRecordWriter, safetensors): they write a local temporary file, which is
published the same way. A restarted run that finds `path` may therefore skip the work that
produced it.

Object stores have no folders: `makedirs` is a no-op there and a "folder" exists once an
object is under it. `glob` does not take `**` (it could mean thousands of listing requests).
Cloud Storage has no append either: a file that grows (metrics.jsonl) is written locally or
rewritten whole.

What a stage must keep local lives under `local_dir(path)`: `path` itself when local, else a
mirror folder under the local cache (`$DASD_JAX_CACHE`, default `~/.cache/dasd_jax/remote/`,
then the bucket and key). SQLite indexes, progress/metrics files and TensorBoard event files
go there; `copy(local, remote)` and `upload_dir` publish them with the same atomic rule.
A folder published with `upload_dir(..., last=NAME)` is complete once NAME exists in it.
How a stage does its file I/O with these helpers: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from etils import epath

from dasd_jax import faults

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...); False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: pathlib operations (`/`, `.parent`, `.name`) for local and gs://."""
    return epath.Path(path)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: PathLike) -> bool:
    """A local folder, or a gs:// prefix with objects under it."""
    if not is_remote(path):
        return os.path.isdir(path)
    return as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
    """`mkdir -p` locally; nothing on object stores (a prefix needs no creating)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def glob(pattern: PathLike) -> list[str]:
    """Sorted paths matching `pattern` (`*`, `?`, `[...]`, not `**`), local or gs://."""
    pattern = os.fspath(pattern)
    if "**" in pattern:
        raise ValueError(f"glob pattern {pattern!r}: '**' is not supported")
    parts = pattern.split("/")
    first = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    if first == len(parts):  # no wildcard: the path itself, if present
        return [pattern] if exists(pattern) else []
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    if not is_remote(root) and not os.path.isdir(root):
        return []
    found = [os.fspath(p) for p in as_path(root).glob("/".join(parts[first:]))]
    if not pattern.startswith(("/", "./")) and root == ".":
        found = [f.removeprefix("./") for f in found]
    return sorted(found)


def open_read(path: PathLike, mode: str = "r") -> IO[Any]:
    """Open for reading; text is UTF-8 with universal newlines, as `open()` does locally."""
    if mode not in ("r", "rb"):
        raise ValueError(f"open_read mode must be 'r' or 'rb', got {mode!r}")
    if not is_remote(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file {os.fspath(path)} does not exist")
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    p = as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"input file {os.fspath(path)} does not exist")
    raw = p.open("rb")
    # fsspec would decode text with the locale's encoding: decode UTF-8 ourselves.
    return raw if "b" in mode else io.TextIOWrapper(raw, encoding="utf-8")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Write `path` so that it appears complete or not at all (see the module docstring)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A local file name to write `path` through, published as `atomic_write` does.

    For writers that want a file name rather than a file object (ArrayRecordWriter,
    safetensors): write the file at the yielded name; when the block ends without an
    exception it becomes `path` (a rename locally, an upload then a server-side copy on
    gs://). On an exception nothing is published and the temporary file is removed.
    """
    if is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix="dasd-upload-", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            _publish_remote(tmp, as_path(path))
            faults.tick("publish")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    with _naming(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    try:
        with _naming(path):  # the writer's own OSError (disk full, quota) names the file
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)  # the content reaches the disk before the rename
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        faults.tick("publish")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _naming(path: PathLike) -> Iterator[None]:
    """An OSError without a file name (ENOSPC from write(), EDQUOT from close()) re-raised as
    the same error type and errno naming `path`: "No space left on device" alone does not say
    which disk."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        where = os.fspath(path)
        raise type(e)(e.errno, f"{e.strerror or e} (writing {where})", where) from e


# `atomic_path`'s temporaries: `.NAME.XXXXXXXX.tmp` (mkstemp) and `.NAME.<uuid hex>.tmp` (gs://)
_TEMPORARY = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|[0-9a-f]{32})\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of `atomic_path`'s temporaries (a write that never finished
    when its process was killed: `atomic_path` removes its own on any exception)."""
    return bool(_TEMPORARY.match(os.path.basename(name)))


def sweep_temporaries(path: PathLike, recursive: bool = True) -> list[str]:
    """Delete `atomic_path` temporaries under folder `path` (or beside file `path`), local or
    gs://; returns what was deleted. Only for a folder no live process writes to (the run
    lock's holder sweeps its step's outputs when the step starts)."""
    path = os.fspath(path)
    if not isdir(path):
        if recursive:  # a file output (e.g. stage1/final.json): its folder, not below it
            return sweep_temporaries(os.path.dirname(path.rstrip("/")), recursive=False)
        return []
    if recursive:
        names = walk_files(path)
    else:
        names = [p.name for p in as_path(path).iterdir() if not p.is_dir()]
    gone = []
    for rel in names:
        if is_temporary(rel):
            full = join(path, *rel.split("/"))
            unlink(full)
            gone.append(full)
    return gone


def _publish_remote(local_file: str, dst: epath.Path) -> None:
    """Upload a finished local file whole under a temporary object name, then make the final
    object with one server-side copy (GCS object writes are atomic)."""
    tmp_obj = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    try:
        epath.Path(local_file).copy(tmp_obj, overwrite=True)
        tmp_obj.replace(dst)
    except BaseException:  # an interrupted upload may have left a (partial) temporary object
        with contextlib.suppress(Exception):
            if tmp_obj.exists():
                tmp_obj.unlink()
        raise


def join(path: PathLike, *parts: str) -> str:
    """`path/part/...` as a string (keeps `gs://`; `pathlib.Path` would fold it to `gs:/`)."""
    return os.fspath(as_path(path).joinpath(*parts)) if parts else os.fspath(path)


def walk_files(path: PathLike) -> list[str]:
    """Sorted relative names ("sub/name") of every file under folder `path`, local or gs://
    (one listing per prefix level; [] when there is nothing there)."""
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(
            os.path.relpath(os.path.join(root, f), path)
            for root, _, files in os.walk(path)
            for f in files
        )
    if not isdir(path):
        return []
    base = path.split("://", 1)[1].rstrip("/")
    names = []
    for root, _, files in as_path(path).walk():
        root = os.fspath(root)  # fsspec yields "bucket/key", without the scheme
        rel = root.split("://", 1)[-1].rstrip("/").removeprefix(base).lstrip("/")
        names += [f"{rel}/{f}" if rel else f for f in files if f]
    return sorted(names)


def read_text(path: PathLike) -> str:
    with open_read(path) as f:
        return f.read()


def unlink(path: PathLike, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    if not is_remote(path):
        Path(path).unlink(missing_ok=missing_ok)
        return
    p = as_path(path)
    if missing_ok and not p.exists():
        return
    p.unlink()


def stat(path: PathLike) -> tuple[int, int]:
    """(size in bytes, modification time in ns; 0 where the store does not say)."""
    if not is_remote(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = as_path(path).stat()
    return int(st.length or 0), int(st.mtime or 0) * 10**9


def cache_root() -> str:
    """The local cache of this machine: `$DASD_JAX_CACHE`, else `~/.cache/dasd_jax`."""
    return os.environ.get("DASD_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dasd_jax"
    )


def local_dir(path: PathLike) -> str:
    """A local folder standing for `path`: `path` itself when local; for `gs://b/k` the
    mirror `<cache_root>/remote/gs/b/k` (created), where a stage keeps what must be local."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    scheme, rest = path.split("://", 1)
    parts: list[str] = []
    for p in rest.split("/"):  # `..` resolved as the store would; never above the bucket
        if p in ("", "."):
            continue
        if p == "..":
            if len(parts) <= 1:
                raise ValueError(f"{path}: '..' climbs out of the bucket")
            parts.pop()
        else:
            parts.append(p)
    if not parts or not scheme.isalnum():
        raise ValueError(f"{path}: not a bucket path")
    base = os.path.join(cache_root(), "remote")
    local = os.path.join(base, scheme, *parts)
    if os.path.commonpath([os.path.realpath(base), os.path.realpath(local)]) != os.path.realpath(
        base
    ):
        raise ValueError(f"{path}: its cache mirror {local} would lie outside {base}")
    os.makedirs(local, exist_ok=True)
    return local


def copy(src: PathLike, dst: PathLike) -> None:
    """Copy a finished file to `dst` (each local or gs://); `dst` is published atomically."""
    if is_remote(dst) and not is_remote(src):  # straight from the file: no second copy
        _publish_remote(os.fspath(src), as_path(dst))
        return
    with atomic_path(dst) as tmp, open_read(src, "rb") as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out)


def upload_dir(local: PathLike, dst: PathLike, last: str | None = None) -> list[str]:
    """Copy a local folder's files (recursively) under `dst`, each atomically, `last` (a
    relative name, the folder's completion marker) after every other file; returns the
    relative names copied, in order."""
    names = sorted(
        os.path.relpath(os.path.join(root, f), local)
        for root, _, files in os.walk(local)
        for f in files
    )
    if last is not None:
        if last not in names:
            raise FileNotFoundError(f"{last} is not in {os.fspath(local)}")
        names = [n for n in names if n != last] + [last]
    for name in names:
        copy(os.path.join(local, name), join(dst, *name.split(os.sep)))
    return names


def download_dir(src: PathLike, skip: tuple[str, ...] = ()) -> str:
    """A local copy of folder `src` (itself when local): each file directly under `src`
    whose name matches none of the `skip` patterns is copied to `local_dir(src)` unless a
    copy of the same size is there. For model folders read by local-only libraries
    (tokenizers, config.json)."""
    if not isdir(src):
        what = "is not a folder" if exists(src) else "does not exist"
        raise FileNotFoundError(f"model folder {os.fspath(src)} {what}")
    if not is_remote(src):
        return os.fspath(src)
    local = local_dir(src)
    for p in as_path(src).iterdir():
        if p.is_dir() or any(fnmatch.fnmatch(p.name, pat) for pat in skip):
            continue
        target = os.path.join(local, p.name)
        if os.path.exists(target) and os.path.getsize(target) == stat(p)[0]:
            continue
        with open_read(p, "rb") as f, atomic_write(target, "wb") as out:
            shutil.copyfileobj(f, out)
    return local
