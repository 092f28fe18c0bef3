"""Ingest: every input the `score` stage reads, turned into `schema.Candidate`s, streaming.

Consumes JSONL files of three kinds (`score.input_format`, `auto` detects it from each file's
first row) and produces, line by line, `Candidate`s or `BadRow`s located by file and line.
`input_files(score.input)` names the files, read in that order as one stream: one file; a
folder (the sample stage's `t<T>/part-*.jsonl`, or the score stage's `part-*.jsonl`, or else
every `*.jsonl` in it but `rejects.*` and `metrics.jsonl`); or a glob. Paths may be local or
gs:// (`dasd_jax.storage`).

- `sft`: the released SFT data, `uuid, input, output, domain, meta` (field names configurable).
  Optionally joined by uuid with the released teacher log-prob rows
  `sample_uuid, token_ids, logprobs` (`score.teacher_logprobs`; gpt-oss token ids).
- `candidates`: the sample stage's Candidate JSONL (`schema.Candidate.to_dict()` per line).
- `openai`: dumps of OpenAI-compatible servers (vLLM, SGLang, tpu-inference): a chat
  completion per line (or an OpenAI batch-output line whose `response.body` is one), with
  `choices[].logprobs.content[]` = `{token, logprob, bytes}`; the prompt from `prompt`,
  `messages`, `request.messages` or `request.body.messages` (last user message). Each choice
  is one candidate: prompt id from `prompt_id` / `custom_id`, else a hash of the prompt text;
  candidate index = the line's `candidate` (default 0) + the choice index, so a dump of
  repeated n=1 requests numbers its samples with `candidate`.

Nothing is loaded whole. The log-prob join uses an on-disk index: one streaming pass over the
log-prob file records `sample_uuid -> (byte offset, length, line)` in a SQLite file (standard
library) cached in a local folder (`<run_dir>/cache/`, or `storage.local_dir` of it when
run_dir is gs://), keyed by the file's path, size and mtime, built under a temporary name
and renamed into place (the log-prob file itself may be on gs://: lookups seek in it); a
lookup is one indexed query, one seek and one JSON parse of that row. A sorted merge would
need both files sorted by uuid (they are not) and an external sort; the index costs one pass
and ~100 bytes per row on disk.

Teacher token offsets (`align_teacher_tokens`): teacher tokens are turned into their bytes
(`tokenizer.token_bytes` for ids, the server's `bytes` for dumps). gpt-oss writes harmony:
`analysis` content, `<|end|><|start|>assistant<|channel|>final<|message|>`, `final` content,
`<|return|>`. Special tokens, and every token of a message header (from `<|start|>` or
`<|channel|>` up to `<|message|>`), are channel markers; the runs of other tokens between
them are content segments. Each segment's text is found in the response text
(`<think>\\n{analysis}\\n</think>\\n\\n{final}`) at or after the end of the previous one
(verbatim; else with its leading/trailing whitespace stripped, those tokens then clipped to
the match); its tokens get their character spans there by the byte rule of
`tokenizer.spans_from_bytes` (a token's span covers every character any of its bytes belongs
to). Marker tokens get an empty span at the current position, so they fall in no sentence
(`select.assign_tokens` gives -1). The result is monotone (starts and ends non-decreasing)
and overlaps only where a token boundary splits a character, which lies in the span of each
token holding its bytes; characters the teacher never produced as tokens (`<think>`,
`</think>`) are covered by no teacher token. A segment that cannot be found is a
`teacher_text_mismatch`. Generated harmony with its special tokens (server dumps) is read by
the one parser of generated harmony instead (`models.harmony.parse_generated`).

The chat formats used to score (Qwen3 ChatML, gpt-oss harmony) are in `chat.py`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dasd_jax import storage
from dasd_jax.records import BadRow, decode_line
from dasd_jax.schema import Candidate, TokenScores

FORMATS = ("sft", "candidates", "openai")

HARMONY_HEADER_OPEN = (b"<|start|>", b"<|channel|>")
HARMONY_MESSAGE = b"<|message|>"
HARMONY_STOPS = (b"<|end|>", b"<|return|>", b"<|call|>")
_SPECIAL_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>\Z")


# ------------------------------------------------------------------------- reading lines


log = logging.getLogger(__name__)

SAMPLE_PARTS = "part-*.jsonl"  # what the sample and score stages call their data files
_NOT_DATA = ("rejects.*", "metrics.jsonl")  # JSONL beside the data in a stage's folder


def input_files(spec: str | Path) -> list[str]:
    """The JSONL files `spec` names, in reading order (sorted by path), local or gs://.

    A glob (`*`, `?`, `[...]`): the files it matches. A folder: the part files of the sample
    stage (`t<T>/part-*.jsonl`) or of the score stage (`part-*.jsonl`) when it has any (their
    stats, rejects and journals are skipped), else every `*.jsonl` in it except `rejects.*`
    and `metrics.jsonl`. Anything else: that one file.
    """
    spec = os.fspath(spec)
    if any(c in spec for c in "*?["):
        files = storage.glob(spec)
        if not files:
            raise FileNotFoundError(f"score.input={spec!r}: no file matches this pattern")
        return files
    if storage.isdir(spec):
        parts = storage.glob(storage.join(spec, SAMPLE_PARTS)) + storage.glob(
            storage.join(spec, "*", SAMPLE_PARTS)
        )
        journals = storage.glob(storage.join(spec, "*", "part-*.journal"))
        if journals:
            log.warning(
                "%s has %d unfinished sample shards (%s ...): their candidates are not read",
                spec,
                len(journals),
                journals[0],
            )
        if parts:
            return sorted(parts)
        files = [
            f
            for f in storage.glob(storage.join(spec, "*.jsonl"))
            if not any(fnmatch.fnmatch(os.path.basename(f), p) for p in _NOT_DATA)
        ]
        if not files:
            raise FileNotFoundError(f"score.input={spec!r}: a folder with no JSONL file")
        return files
    if not storage.exists(spec):
        raise FileNotFoundError(f"input file {spec} does not exist")
    return [spec]


def iter_lines(path: str | Path) -> Iterator[tuple[int, str | bytes]]:
    """(1-based line number, raw text) of each non-empty line, streaming; a line that is not
    UTF-8 comes as its bytes, for `parse_line` to reject with its file and line."""
    with storage.open_read(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield n, raw


def count_lines(path: str | Path) -> int:
    """Non-empty lines, read in binary blocks (fast enough for multi-GB files)."""
    n = 0
    with storage.open_read(path, "rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


def parse_line(raw: str | bytes, path: str | Path, line: int) -> dict[str, Any]:
    if isinstance(raw, bytes):  # not UTF-8 (iter_lines)
        raw = decode_line(raw, path, line)
    try:
        row = json.loads(raw)
    except ValueError as e:
        raise BadRow(path, line, f"malformed JSON: {e}") from None
    if not isinstance(row, dict):
        raise BadRow(path, line, f"malformed JSON: expected an object, got {type(row).__name__}")
    return row


def sniff_format(path: str | Path) -> str | None:
    """`sft`, `candidates` or `openai`, from the first line that parses; None when no line
    holds a JSON object (an empty file, e.g. a shard all of whose rows were rejected)."""
    for _, raw in iter_lines(path):
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        body = _openai_body(row)
        if body is not None:
            return "openai"
        if {"prompt_id", "candidate", "response"} <= set(row):
            return "candidates"
        return "sft"
    return None


def detect_format(path: str | Path) -> str:
    """`sniff_format`, or an error naming the file when it has no JSON object to tell from."""
    fmt = sniff_format(path)
    if fmt is not None:
        return fmt
    raise ValueError(f"{path}: no JSON object found to detect the input format from")


def prompt_hash(prompt: str) -> str:
    """Stable prompt id from its text: candidates of the same prompt group together."""
    return "h" + hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).hexdigest()


# --------------------------------------------------------------------- log-prob join index

_INDEX_VERSION = 1
_UUID_RE = re.compile(rb'"sample_uuid"\s*:\s*("(?:[^"\\]|\\.)*")')


class LogprobIndex:
    """Random access by uuid into the released teacher log-prob JSONL, via a cached SQLite
    index (`uuid -> offset, length, line`). Duplicated uuids keep their first row."""

    def __init__(self, path: str | Path, cache_dir: str | Path):
        self.path = os.fspath(path)  # local or gs://
        if not storage.exists(self.path):
            raise FileNotFoundError(f"teacher log-prob file {self.path} does not exist")
        size, mtime_ns = storage.stat(self.path)
        where = self.path if storage.is_remote(self.path) else str(Path(self.path).resolve())
        key = f"{where}|{size}|{mtime_ns}|{_INDEX_VERSION}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        # SQLite needs a local file: the cache folder is local (storage.local_dir of gs://)
        self.index_path = Path(storage.local_dir(cache_dir)) / f"logprob-index-{digest}.sqlite"
        if not self.index_path.exists():
            self._build()
        self._db = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True)
        self.stats = dict(self._db.execute("SELECT key, value FROM stats").fetchall())
        self._fh = storage.open_read(self.path, "rb")

    def _build(self) -> None:
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.index_path.name}.", dir=self.index_path.parent)
        os.close(fd)
        try:
            db = sqlite3.connect(tmp)
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute(
                "CREATE TABLE rows (uuid TEXT PRIMARY KEY, offset INTEGER, "
                "length INTEGER, line INTEGER)"
            )
            db.execute("CREATE TABLE stats (key TEXT PRIMARY KEY, value INTEGER)")
            rows = duplicates = unreadable = 0
            batch: list[tuple[str, int, int, int]] = []
            offset = 0
            with storage.open_read(self.path, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    size = len(raw)
                    if raw.strip():
                        m = _UUID_RE.search(raw)
                        uuid = None
                        if m is not None:
                            try:
                                uuid = json.loads(m.group(1))
                            except ValueError:
                                uuid = None
                        if uuid is None:
                            unreadable += 1  # reported at lookup time only if asked for
                        else:
                            rows += 1
                            batch.append((uuid, offset, size, n))
                    offset += size
                    if len(batch) >= 10000:
                        duplicates += _insert(db, batch)
                        batch = []
            duplicates += _insert(db, batch)
            db.executemany(
                "INSERT INTO stats VALUES (?, ?)",
                [("rows", rows), ("duplicates", duplicates), ("unreadable", unreadable)],
            )
            db.commit()
            db.close()
            os.replace(tmp, self.index_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, uuid: str) -> tuple[list[int], list[float], int] | None:
        """(token_ids, logprobs, line) of `uuid`, None if absent; BadRow on a bad row."""
        hit = self._db.execute(
            "SELECT offset, length, line FROM rows WHERE uuid = ?", (uuid,)
        ).fetchone()
        if hit is None:
            return None
        offset, length, line = hit
        self._fh.seek(offset)
        row = parse_line(self._fh.read(length).decode("utf-8"), self.path, line)
        ids, lps = row.get("token_ids"), row.get("logprobs")
        for name, v in (("token_ids", ids), ("logprobs", lps)):
            if not isinstance(v, list):
                raise BadRow(self.path, line, f"missing field {name!r} (a list)")
        if len(ids) != len(lps):
            raise BadRow(
                self.path,
                line,
                f"logprob_length_mismatch: token_ids has {len(ids)} "
                f"entries, logprobs has {len(lps)}",
            )
        if not all(isinstance(t, int) for t in ids):
            raise BadRow(self.path, line, "field 'token_ids' should hold integers")
        return ids, [_logprob(x, self.path, line) for x in lps], line

    def close(self) -> None:
        self._db.close()
        self._fh.close()


def _insert(db: sqlite3.Connection, batch: list) -> int:
    before = db.total_changes
    db.executemany("INSERT OR IGNORE INTO rows VALUES (?, ?, ?, ?)", batch)
    return len(batch) - (db.total_changes - before)


def _logprob(x: Any, path, line) -> float:
    if x is None:  # a server may return null; DAS ignores NaN tokens
        return math.nan
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise BadRow(path, line, f"log-prob {x!r} is not a number")
    return float(x)


# ---------------------------------------------------------------- teacher token offsets


class TokenBytes:
    """Token id -> raw bytes and 'is a special token', for one tokenizer folder (cached)."""

    def __init__(self, folder: str | Path):
        from dasd_jax.tokenizer import load_tokenizer

        self.folder = str(folder)
        self.tokenizer = load_tokenizer(folder)
        self.special = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self.size = len(self.tokenizer)
        self._cache: dict[int, bytes] = {}

    def __call__(self, ids: list[int]) -> list[bytes]:
        from dasd_jax.tokenizer import token_bytes

        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the teacher vocabulary "
                f"({self.size} ids, {self.folder})"
            )
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            self._cache.update(zip(missing, token_bytes(self.tokenizer, missing), strict=True))
        return [self._cache[i] for i in ids]


def harmony_markers(pieces: list[bytes], special: list[bool]) -> list[bool]:
    """Which tokens are channel markers: special tokens, and every token of a message header
    (from `<|start|>` / `<|channel|>` up to `<|message|>`). Text before the first marker is
    content (released rows start inside the analysis message)."""
    out, header = [], False
    for piece, sp in zip(pieces, special, strict=True):
        if sp:
            out.append(True)
            if piece in HARMONY_HEADER_OPEN:
                header = True
            elif piece == HARMONY_MESSAGE:
                header = False
            continue
        out.append(header)
    return out


def align_teacher_tokens(
    pieces: list[bytes], markers: list[bool], response: str, breaks: frozenset[int] = frozenset()
) -> list[tuple[int, int]]:
    """Response-relative character spans of teacher tokens (rule in the module docstring).

    `pieces`: each token's bytes; `markers`: channel-marker tokens (empty spans); `breaks`:
    token indices that start a new content segment although no marker precedes them.
    Raises ValueError when a content segment is not found in `response`.
    """
    from dasd_jax.tokenizer import spans_from_bytes

    n = len(pieces)
    spans: list[tuple[int, int]] = [(0, 0)] * n
    cursor = 0
    i = 0
    while i < n:
        if markers[i]:
            spans[i] = (cursor, cursor)
            i += 1
            continue
        j = i + 1
        while j < n and not markers[j] and j not in breaks:
            j += 1
        seg = pieces[i:j]
        raw = b"".join(seg)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # a sample cut inside a character: drop the tail
            text = raw[: e.start].decode("utf-8", errors="replace")
        stripped = text.strip()
        if not stripped:
            for k in range(i, j):
                spans[k] = (cursor, cursor)
            i = j
            continue
        lead = len(text) - len(text.lstrip())
        pos = response.find(text, cursor)
        if pos >= 0:
            lo, hi, base = pos, pos + len(text), pos
        else:
            pos = response.find(stripped, cursor)
            if pos < 0:
                raise ValueError(
                    f"teacher_text_mismatch: teacher tokens {i}..{j - 1} spell "
                    f"{stripped[:60]!r}, not found in the response after character {cursor}"
                )
            lo, hi, base = pos, pos + len(stripped), pos - lead
        for k, (s, e) in enumerate(spans_from_bytes(seg, text)):
            a = min(max(base + s, lo), hi)
            b = min(max(base + e, lo), hi)
            spans[i + k] = (a, b)
        cursor = hi
        i = j
    return spans


# ------------------------------------------------------------------------ the three kinds


@dataclass
class IngestOptions:
    """What the readers need (from `ScoreConfig`)."""

    prompt_field: str = "input"
    response_field: str = "output"
    id_field: str = "uuid"
    domain_field: str = "domain"
    answer_field: str = ""
    temperature: float | None = None
    teacher_name: str = "teacher"


class Reader:
    """Turns one input file's lines into Candidates. `candidates(line, raw)` raises BadRow."""

    def __init__(
        self,
        path: str | Path,
        fmt: str,
        opts: IngestOptions,
        logprobs: LogprobIndex | None = None,
        teacher_bytes=None,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
        if logprobs is not None and fmt != "sft":
            raise ValueError("score.teacher_logprobs joins the released SFT format only")
        self.path, self.fmt, self.opts = os.fspath(path), fmt, opts
        self.logprobs = logprobs
        self._teacher_bytes = teacher_bytes  # callable () -> TokenBytes, loaded when needed

    def candidates(self, line: int, raw: str) -> list[Candidate]:
        row = parse_line(raw, self.path, line)
        try:
            if self.fmt == "sft":
                return [self._sft(row, line)]
            if self.fmt == "candidates":
                return [self._candidate(row, line)]
            return self._openai(row, line)
        except BadRow:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise BadRow(self.path, line, str(e)) from None

    # -- released SFT rows (+ joined teacher log-probs)
    def _sft(self, row: dict, line: int) -> Candidate:
        o = self.opts
        for name in (o.prompt_field, o.response_field):
            _require_str(row, name, self.path, line)
        prompt, response = row[o.prompt_field], row[o.response_field]
        uuid = row.get(o.id_field)
        meta: dict[str, Any] = {"line": line, "input": str(self.path)}
        if uuid is not None:
            meta["uuid"] = str(uuid)
        if "meta" in row:
            meta["meta"] = row["meta"]
        teacher = None
        if self.logprobs is not None:
            if uuid is None:
                raise BadRow(
                    self.path,
                    line,
                    f"missing field {o.id_field!r} (needed for the teacher log-prob join)",
                )
            try:
                hit = self.logprobs.get(str(uuid))
            except BadRow as e:  # name both rows: the SFT line and the log-prob line
                raise BadRow(
                    self.path, line, f"{e.reason} (teacher log-prob row {e.path}:{e.line})"
                ) from None
            if hit is None:
                raise BadRow(
                    self.path,
                    line,
                    f"unknown_uuid: {uuid!r} is not in the teacher "
                    f"log-prob file {self.logprobs.path}",
                )
            ids, lps, lp_line = hit
            tb = self._teacher_bytes()
            pieces = tb(ids)
            markers = harmony_markers(pieces, [i in tb.special for i in ids])
            try:
                spans = align_teacher_tokens(pieces, markers, response)
            except ValueError as e:
                raise BadRow(
                    self.path, line, f"{e} (log-prob row {self.logprobs.path}:{lp_line})"
                ) from None
            teacher = TokenScores(o.teacher_name, tb.folder, ids, lps, spans)
            meta["logprob_line"] = lp_line
        return Candidate(
            prompt_id=prompt_hash(prompt),
            candidate=line,
            prompt=prompt,
            response=response,
            temperature=o.temperature,
            domain=_opt_str(row.get(o.domain_field)),
            reference_answer=_opt_str(row.get(o.answer_field)) if o.answer_field else None,
            teacher=teacher,
            meta=meta,
        )

    # -- the sample stage's candidates
    def _candidate(self, row: dict, line: int) -> Candidate:
        for name in ("prompt_id", "prompt", "response"):
            _require_str(row, name, self.path, line)
        if not isinstance(row.get("candidate"), int):
            raise BadRow(self.path, line, "field 'candidate' should be an integer")
        c = Candidate.from_dict(row)
        if c.temperature is None and self.opts.temperature is not None:
            c.temperature = self.opts.temperature
        c.meta = {**c.meta, "line": line, "input": str(self.path)}
        t = c.teacher
        if t is not None and t.offsets is None:
            tb = self._teacher_bytes()
            pieces = tb(t.token_ids)
            markers = harmony_markers(pieces, [i in tb.special for i in t.token_ids])
            t.offsets = align_teacher_tokens(pieces, markers, c.response)
        return c

    # -- OpenAI-compatible server dumps
    def _openai(self, row: dict, line: int) -> list[Candidate]:
        from dasd_jax.sample.text import map_harmony

        body = _openai_body(row)
        if body is None:
            raise BadRow(self.path, line, "missing field 'choices' (an OpenAI chat completion)")
        prompt = _dump_prompt(row)
        if prompt is None:
            raise BadRow(
                self.path,
                line,
                "no prompt: expected 'prompt', 'messages', "
                "'request.messages' or 'request.body.messages'",
            )
        pid = row.get("prompt_id") or row.get("custom_id")
        pid = str(pid) if pid is not None else prompt_hash(prompt)
        request = row.get("request") if isinstance(row.get("request"), dict) else {}
        temp = row.get(
            "temperature",
            request.get("temperature", (request.get("body") or {}).get("temperature")),
        )
        if temp is None:
            temp = self.opts.temperature
        out = []
        for k, ch in enumerate(body["choices"]):
            if not isinstance(ch, dict):
                raise BadRow(self.path, line, f"choices[{k}] is not an object")
            index = ch.get("index", k)
            msg = ch.get("message") or {}
            text = msg.get("content") if isinstance(msg, dict) else None
            text = text if text is not None else ch.get("text")
            reasoning = msg.get("reasoning_content") or msg.get("reasoning") if msg else None
            content = (
                (ch.get("logprobs") or {}).get("content")
                if isinstance(ch.get("logprobs"), dict)
                else None
            )
            teacher = None
            meta: dict[str, Any] = {"line": line, "input": str(self.path), "choice": k}
            if content:
                pieces, lps, ids, special = [], [], [], []
                for j, tok in enumerate(content):
                    if not isinstance(tok, dict) or "token" not in tok or "logprob" not in tok:
                        raise BadRow(
                            self.path,
                            line,
                            f"choices[{k}].logprobs.content[{j}] lacks 'token' or 'logprob'",
                        )
                    b = tok.get("bytes")
                    piece = bytes(b) if b is not None else str(tok["token"]).encode("utf-8")
                    pieces.append(piece)
                    lps.append(_logprob(tok["logprob"], self.path, line))
                    m = re.fullmatch(r"token_id:(\d+)", str(tok["token"]))
                    ids.append(int(m.group(1)) if m else -1)
                    special.append(bool(_SPECIAL_RE.match(str(tok["token"]))))
                if any(special):  # harmony: the one parser of generated harmony
                    finish = ch.get("finish_reason")
                    stop = ch.get("stop_reason")
                    ended = "" if finish == "length" or isinstance(stop, str) else None
                    mapped = map_harmony(pieces, special, ended)
                    if mapped.reason is not None:
                        raise BadRow(
                            self.path,
                            line,
                            f"{mapped.reason}: choices[{k}]: malformed harmony, "
                            f"{mapped.detail}",
                        )
                    response, spans = mapped.response, mapped.offsets
                    del pieces[mapped.keep :], lps[mapped.keep :], ids[mapped.keep :]
                    meta["harmony"] = mapped.harmony
                else:
                    decoded = b"".join(pieces).decode("utf-8", errors="replace")
                    breaks: frozenset[int] = frozenset()
                    if reasoning:
                        response = f"<think>\n{reasoning}\n</think>\n\n{text or ''}"
                        breaks = _break_at(pieces, len(reasoning.encode("utf-8")))
                    else:
                        response = decoded
                    markers = harmony_markers(pieces, special)
                    try:
                        spans = align_teacher_tokens(pieces, markers, response, breaks)
                    except ValueError as e:
                        raise BadRow(self.path, line, f"choices[{k}]: {e}") from None
                model = str(body.get("model") or self.opts.teacher_name)
                teacher = TokenScores(model, model, ids, lps, spans)
            else:
                if text is None:
                    raise BadRow(
                        self.path, line, f"choices[{k}] has neither message content nor logprobs"
                    )
                response = f"<think>\n{reasoning}\n</think>\n\n{text}" if reasoning else text
            out.append(
                Candidate(
                    prompt_id=pid,
                    candidate=int(row.get("candidate", 0)) + int(index),
                    prompt=prompt,
                    response=response,
                    temperature=temp,
                    finish_reason=ch.get("finish_reason"),
                    domain=_opt_str(row.get("domain")),
                    reference_answer=_opt_str(row.get("reference_answer")),
                    teacher=teacher,
                    meta=meta,
                )
            )
        return out


def _break_at(pieces: list[bytes], nbytes: int) -> frozenset[int]:
    total = 0
    for i, p in enumerate(pieces):
        if total == nbytes:
            return frozenset({i})
        total += len(p)
    return frozenset()


def _openai_body(row: dict) -> dict | None:
    if isinstance(row.get("choices"), list):
        return row
    resp = row.get("response")
    if isinstance(resp, dict):
        body = resp.get("body", resp)
        if isinstance(body, dict) and isinstance(body.get("choices"), list):
            return body
    return None


def _dump_prompt(row: dict) -> str | None:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    request = row.get("request") if isinstance(row.get("request"), dict) else {}
    for messages in (
        row.get("messages"),
        request.get("messages"),
        (request.get("body") or {}).get("messages"),
    ):
        if isinstance(messages, list):
            users = [
                m.get("content")
                for m in messages
                if isinstance(m, dict) and m.get("role") == "user"
            ]
            if users and isinstance(users[-1], str):
                return users[-1]
    return None


def _require_str(row: dict, name: str, path, line: int) -> None:
    if name not in row:
        raise BadRow(path, line, f"missing field {name!r} (has {sorted(row)})")
    if not isinstance(row[name], str):
        raise BadRow(path, line, f"field {name!r} should be a string")


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)
