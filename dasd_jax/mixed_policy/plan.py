"""The mixed-policy stage's inputs and plan: which questions, their budgets, engine sizes.

Consumes the selected training set (ArrayRecord files of `SFTRecord`s, `SourceRecords`) and
the student's tokenizer; produces the plan (`build_plan`), a JSON-able dict written once to
`<output>/plan.json`: the drawn questions (`cut.choose_questions` over unique prompts, each
with its first record, its prompt and teacher-response lengths in student tokens and its
budget `cut.student_cap`), unreadable records (`on_bad_row=skip`), and engine sizes derived
from the questions only, so every process and every restart builds the same engines. The
plan's `fingerprint` holds every setting the stage's results depend on; a restart under other
settings is refused (`load_or_build_plan`) instead of mixing two runs in one folder.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from pathlib import Path

from dasd_jax import storage
from dasd_jax.config import Config, to_dict
from dasd_jax.mixed_policy import cut as cutlib
from dasd_jax.records import BadRow, BadRows, reason_key, write_json
from dasd_jax.schema import SFTRecord


class StageError(RuntimeError):
    """The stage cannot start: an input is missing or the output belongs to other settings."""


class SourceRecords:
    """Random access to the SFTRecords of several ArrayRecord files (global indices)."""

    def __init__(self, files: list[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.files = files
        self.readers = [ArrayRecordReader(f) for f in files]
        counts = [r.num_records() for r in self.readers]
        self.starts = [sum(counts[:i]) for i in range(len(counts) + 1)]

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        f = bisect.bisect_right(self.starts, i) - 1
        return f, i - self.starts[f]

    def parse(self, i: int, raw: bytes) -> SFTRecord:
        f, local = self.locate(i)
        try:
            rec = SFTRecord.from_bytes(raw)
        except (ValueError, TypeError) as e:
            raise BadRow(self.files[f], local, f"not an SFTRecord: {e}") from None
        for name in ("prompt", "response"):
            v = getattr(rec, name)
            if not isinstance(v, str) or not v.strip():
                raise BadRow(self.files[f], local, f"empty or non-string {name}")
        return rec

    def get(self, i: int) -> SFTRecord:
        f, local = self.locate(i)
        return self.parse(i, self.readers[f].read([local])[0])

    def scan(self, chunk: int = 1024):
        """(global index, raw bytes) of every record, in file order."""
        for f, r in enumerate(self.readers):
            n = r.num_records()
            for a in range(0, n, chunk):
                for j, raw in enumerate(r.read(a, min(a + chunk, n))):
                    yield self.starts[f] + a + j, raw

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _pow2(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def fingerprint(cfg: Config, files: list[str], student: Path, teacher: str, demo: bool) -> dict:
    mp = to_dict(cfg.mixed_policy)
    for k in ("output", "report", "progress_every_s", "on_bad_row"):
        mp.pop(k)
    sc = cfg.sample
    return {
        "mixed_policy": mp,
        "seed": cfg.seed,
        "sources": files,
        "student": str(student),
        "teacher": teacher,
        "demo": demo,
        "filters": to_dict(cfg.filters),
        "sampling": {
            "top_p": sc.top_p,
            "top_k": sc.top_k,
            "stop": list(sc.stop),
            "harmony_repair": sc.harmony_repair,
            "teacher_system_prompt": sc.system_prompt,
            "student_system_prompt": cfg.train.system_prompt,
            "prompt_format": sc.prompt_format,
            "reasoning_effort": sc.reasoning_effort,
        },
        "splitter": to_dict(cfg.select.splitter),
    }


def build_plan(
    cfg: Config,
    records: SourceRecords,
    student_tok,
    fingerprint: dict,
    cap_limit: int | None,
    rejects: str = "rejects.jsonl",
) -> dict:
    """The drawn questions (deterministic), with budgets and engine sizes. `rejects`: where
    the stage lists unreadable records (named when too many are)."""
    from dasd_jax.ingest import prompt_hash
    from dasd_jax.tokenizer import render_chat

    mp = cfg.mixed_policy
    first: dict[str, int] = {}
    bad: list[dict] = []
    policy = cfg.bad_rows.for_stage(mp.on_bad_row)
    bad_rows = BadRows("mixed_policy", policy, rejects)
    for i, raw in records.scan():
        try:
            rec = records.parse(i, raw)
        except BadRow as e:
            if policy.on_bad_row == "error":
                raise
            bad.append(
                {"file": e.path, "record": e.line, "reason": "bad_record", "detail": e.reason}
            )
            continue
        first.setdefault(prompt_hash(rec.prompt), i)
    bad_rows.check(len(records), len(bad), Counter(reason_key(b["detail"]) for b in bad))
    keys = list(first)
    chosen = [keys[j] for j in cutlib.choose_questions(keys, mp.questions, cfg.seed)]
    questions = []
    for q, key in enumerate(chosen):
        rec = records.get(first[key])
        prompt = render_chat(rec.prompt, None, cfg.train.system_prompt or None).text
        n_teacher = len(student_tok.encode(rec.response, add_special_tokens=False))
        cap = cutlib.student_cap(n_teacher, mp.length_factor)
        questions.append(
            {
                "q": q,
                "id": key,
                "record": first[key],
                "prompt_tokens": len(student_tok.encode(prompt, add_special_tokens=False)),
                "teacher_tokens": n_teacher,
                "cap": cap if cap_limit is None else min(cap, cap_limit),
            }
        )
    fit = [x for x in questions if x["cap"] <= mp.max_student_tokens] or [{"cap": 1}]
    longest = max([x["prompt_tokens"] for x in questions] or [1])
    max_cap = max(x["cap"] for x in fit)
    teacher_prefill = mp.teacher_max_prefill_length or _pow2(math.ceil(1.25 * (longest + max_cap)))
    return {
        "fingerprint": fingerprint,
        "source_records": len(records),
        "unique_prompts": len(keys),
        "bad_records": bad,
        "questions": questions,
        "engines": {
            "student_prefill": _pow2(longest),
            "student_decode": max_cap,
            "teacher_prefill": teacher_prefill,
        },
    }


def load_or_build_plan(cfg: Config, out: Path, records, student_tok, fp: dict, cap_limit) -> dict:
    path = out / "plan.json"
    if path.exists():
        plan = json.loads(storage.read_text(path))  # local or gs://
        old = plan["fingerprint"]
        if old != fp:
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            raise StageError(
                f"{out} holds a mixed-policy run with other settings ({', '.join(diff)} "
                f"differ; see {path}): set mixed_policy.output to a new folder, or delete "
                "that one to start over"
            )
        return plan
    plan = build_plan(cfg, records, student_tok, fp, cap_limit, str(out / "rejects.jsonl"))
    write_json(path, plan)
    return plan
