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
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...); False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: pathlib operations (`/`, `.parent`, `.name`) for local and gs://."""
    return epath.Path(path)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


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
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)  # the content reaches the disk before the rename
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
