"""An in-memory stand-in for Cloud Storage, for tests: no network, no credentials.

- `FakeGCS`: an fsspec filesystem with gcsfs's path form ("bucket/key") that etils.epath (and
  so `dasd_jax.storage`) uses for gs:// once `install` has patched it in: flat objects, an
  object appears only when its upload is finalised (when the file is closed, even by an
  exception, as fsspec does), rename is a server-side copy then a delete, and an operation
  log. `fail_upload(path) -> bool` makes an upload break half way.
- `serve(fake)`: the same objects over the Cloud Storage JSON API's media download
  (`GET /storage/v1/b/<bucket>/o/<object>?alt=media`, with Range), through
  `CLOUD_STORAGE_EMULATOR_ENDPOINT`: what array_record's C++ reader (and so Grain's
  `ArrayRecordDataSource`) uses to read gs:// files. Read-only.
"""

from __future__ import annotations

import io
import os
import re
import threading
import urllib.parse
from http import server

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class _Upload(io.BytesIO):
    """An object upload: the object appears (finalised) when the file is closed."""

    def __init__(self, fs, path):
        super().__init__()
        self.fs, self.path = fs, path

    def write(self, data):
        if self.fs.fail_upload is not None and self.fs.fail_upload(self.path):
            super().write(bytes(data)[: max(1, len(data) // 2)])
            raise OSError("connection reset during upload")
        return super().write(data)

    def close(self):
        if not self.closed:
            self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.getvalue())
            self.fs.log.append(("finalize", self.path, self.getvalue()))
        super().close()


class FakeGCS(MemoryFileSystem):
    """In-memory Cloud Storage with gcsfs's path form ("bucket/key") and an operation log."""

    protocol = ("gs", "gcs")
    root_marker = ""

    def __init__(self):
        super().__init__(global_store=False)
        self.log, self.fail_upload = [], None

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        return path.removeprefix("gs://").removeprefix("gcs://").rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if mode == "rb":
            return io.BytesIO(self.cat_file(path))
        assert mode == "wb", mode
        return _Upload(self, path)

    def cp_file(self, path1, path2, **kwargs):  # server-side copy (GCS rewrite)
        self.log.append(("copy", self._strip_protocol(path1), self._strip_protocol(path2)))
        return super().cp_file(path1, path2, **kwargs)

    def _rm(self, path):
        self.log.append(("delete", self._strip_protocol(path)))
        return super()._rm(path)

    def makedirs(self, path, exist_ok=False):
        raise AssertionError("object stores need no folders: makedirs must not be called")

    def objects(self):
        return {k: v.getvalue() for k, v in self.store.items()}


def install(monkeypatch, staging) -> FakeGCS:
    """A fresh FakeGCS behind every gs:// path of etils.epath for this test; local staging
    files (storage.atomic_path) go to `staging`."""
    fake = FakeGCS.__new__(FakeGCS)  # bypass fsspec's instance cache
    fake.__init__()
    real_fs = epath_backend._FileSystemSpecBackend.fs

    def fs(self, path):
        return fake if os.fspath(path).startswith("gs://") else real_fs(self, path)

    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", fs)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # the fsspec backend
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    return fake


class _Server:
    """One HTTP server per test process (the C++ client may keep its first endpoint); it
    serves whichever FakeGCS `serve` last pointed it at."""

    current: FakeGCS | None = None
    endpoint: str | None = None
    requests: list = []

    @classmethod
    def start(cls) -> str:
        if cls.endpoint is None:
            srv = server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            cls.endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
        return cls.endpoint


class _Handler(server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urllib.parse.urlparse(self.path)
        m = re.fullmatch(r"/(?:download/)?storage/v1/b/([^/]+)/o/(.+)", url.path)
        key = f"{m.group(1)}/{urllib.parse.unquote(m.group(2))}" if m else None
        fake = _Server.current
        _Server.requests.append(key)
        if fake is None or key not in fake.store:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = fake.store[key].getvalue()
        total, start, end, status = len(data), 0, len(data) - 1, 200
        rng = self.headers.get("Range") or ""
        if m := re.fullmatch(r"bytes=-(\d+)", rng):
            start, status = max(0, total - int(m.group(1))), 206
        elif m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng):
            start, status = int(m.group(1)), 206
            end = min(end, int(m.group(2))) if m.group(2) else end
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(fake: FakeGCS, monkeypatch) -> list:
    """Serve `fake`'s objects to array_record's gs:// reader; returns the request log."""
    _Server.current = fake
    _Server.requests = []
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", _Server.start())
    return _Server.requests
