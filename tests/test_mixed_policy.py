"""Mixed-policy stage: cut points, verbatim student prefixes, teacher continuations, counts,
resume after a kill, and the stage-3 loss mask on its records. Tiny random Qwen3 models."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dasd_jax import embedded
from dasd_jax.config import ConfigError, load_config
from dasd_jax.mixed_policy import cut, shards, stage
from dasd_jax.records import BadRow, TooManyBadRows
from dasd_jax.schema import SFTRecord, read_sft_records, write_sft_records
from dasd_jax.select.sentences import split_sentences
from dasd_jax.tokenizer import (
    IM_END,
    build_qwen3_tokenizer,
    encode_with_offsets,
    load_tokenizer,
    render_chat,
    token_bytes,
)

TEXTS = [r["output"] for r in embedded.demo_rows()] + [
    "<think>\n嗨 🙂 ok... two  spaces.\n\n\nx = 12345.678 etc. Done! Next? Yes.\n</think>"
    "\n\nhi 👋🏽"
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(build_qwen3_tokenizer())


# --------------------------------------------------------------------------- pure pieces


def test_cut_points_fall_strictly_inside_the_interval():
    rng = np.random.default_rng(0)
    for seed in range(3):
        for L in [1, 2, 3, 4, 5, 7, 10, 33, 100, 1001]:
            for low, high, min_tokens in [(0.5, 1.0, 1), (0.2, 0.7, 1), (0.5, 1.0, 4)]:
                iv = cut.cut_interval(L, low, high, min_tokens)
                ks = list(range(L + 1))
                inside = [k for k in ks if low * L < k < high * L and k >= min_tokens]
                assert (iv is None) == (not inside)
                if iv is None:
                    got = cut.choose_cut(L, "q", seed, low=low, high=high, min_tokens=min_tokens)
                    assert got == "too_short"
                    continue
                assert (iv[0], iv[1]) == (inside[0], inside[-1])
                clean = rng.random(L + 1) < 0.8
                sent = rng.random(L + 1) < 0.2
                for q in range(30):
                    c = cut.choose_cut(
                        L,
                        f"q{q}",
                        seed,
                        low=low,
                        high=high,
                        min_tokens=min_tokens,
                        clean=clean,
                        sentences=sent,
                    )
                    if isinstance(c, str):
                        assert not clean[iv[0] : iv[1] + 1].any()
                        continue
                    assert low * L < c.k < high * L and c.k >= min_tokens and clean[c.k]
                    assert low * L < c.drawn < high * L
                    window = clean[iv[0] : iv[1] + 1] & sent[iv[0] : iv[1] + 1]
                    assert c.snapped == bool(window.any())
                    if c.snapped:  # the nearest clean sentence boundary to the draw
                        assert sent[c.k]
                        best = min(
                            abs(k - c.drawn) for k in range(iv[0], iv[1] + 1) if window[k - iv[0]]
                        )
                        assert abs(c.k - c.drawn) == best


def test_cut_draw_is_uniform_and_keyed_by_the_question():
    L = 40  # (20, 40) -> k in 21..39
    ks = [cut.choose_cut(L, f"q{i}", 7).k for i in range(19000)]
    counts = Counter(ks)
    assert sorted(counts) == list(range(21, 40))
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts  # ~4.7 sigma
    again = [cut.choose_cut(L, f"q{i}", 7).k for i in range(200)]
    assert again == ks[:200]  # a resumed run draws the same cut
    other = [cut.choose_cut(L, f"q{i}", 8).k for i in range(200)]
    assert other != ks[:200]


def test_questions_are_a_seeded_sample_of_unique_keys():
    keys = [f"k{i:03d}" for i in range(50)]
    a = cut.choose_questions(keys, 20, seed=3)
    assert len(set(a)) == 20 and all(0 <= i < 50 for i in a)
    shuffled = keys[::-1]
    b = cut.choose_questions(shuffled, 20, seed=3)
    assert [shuffled[i] for i in b] == [keys[i] for i in a]  # file order does not matter
    assert cut.choose_questions(keys, 20, seed=4) != a
    assert sorted(cut.choose_questions(keys, 99, seed=3)) == list(range(50))
    with pytest.raises(ValueError, match="unique"):
        cut.choose_questions(["a", "a"], 1, 0)
    assert cut.student_cap(10, 1.5) == 15 and cut.student_cap(11, 1.5) == 17
    assert cut.student_cap(0, 1.5) == 1


def test_student_prefix_tokens_are_kept_verbatim(tok):
    """At every cut the stage can choose, the prefix text is the decode of exactly the first k
    tokens, re-tokenising it gives back those ids, and a split character is never cut."""
    n_cuts = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = token_bytes(tok, ids)
        clean = cut.clean_boundaries(pieces)
        for k in range(len(ids) + 1):
            whole = b"".join(pieces[:k])
            try:
                whole.decode("utf-8")
                assert clean[k], k
            except UnicodeDecodeError:
                assert not clean[k], k
        for q in range(40):
            c = cut.choose_cut(len(ids), f"{text[:8]}{q}", 0, clean=clean)
            prefix = cut.prefix_of(pieces, c.k)
            assert prefix.encode("utf-8") == b"".join(pieces[: c.k])
            assert text.startswith(prefix)
            assert tok.encode(prefix, add_special_tokens=False) == ids[: c.k]
            n_cuts += 1
    assert n_cuts == 40 * len(TEXTS)
    # the emoji split over two byte-level tokens in the last text is never cut inside
    ids = tok.encode(TEXTS[-1], add_special_tokens=False)
    pieces = token_bytes(tok, ids)
    assert not cut.clean_boundaries(pieces).all()


def test_sentence_snapping_cuts_between_sentences(tok):
    for text in TEXTS:
        ids, offsets = encode_with_offsets(tok, text)
        spans = split_sentences(text)
        starts = {s for s, _ in spans}
        at = cut.sentence_boundaries(text, offsets)
        assert at.any()
        for k in np.flatnonzero(at[: len(ids)]):
            p = offsets[k][0]
            # only whitespace between the cut and the next sentence's first character
            nxt = min(s for s in starts | {len(text)} if s >= p)
            assert nxt in starts and not text[p:nxt].strip(), (text[p - 5 : p + 5], k)
            assert text[:p].rstrip() and p > 0
        pieces = token_bytes(tok, ids)
        clean = cut.clean_boundaries(pieces)
        for q in range(20):
            c = cut.choose_cut(len(ids), f"s{q}", 1, clean=clean, sentences=at)
            assert 0.5 * len(ids) < c.k < len(ids)
            if c.snapped:
                assert at[c.k]


def test_teacher_view_and_continuation_in_think_form():
    """A harmony teacher reads the `<think>` prefix as open channels; what it adds maps back
    to `<think>` text right after the prefix. ChatML teachers read the text verbatim."""
    prefix = "<think>\nLet me compute 17 * 24.\nSplit it"
    view = stage.teacher_view(prefix, harmony=True)
    assert view == "<|channel|>analysis<|message|>Let me compute 17 * 24.\nSplit it"
    generated = ": 340 + 68 = 408.<|end|><|start|>assistant<|channel|>final<|message|>**408**"
    cont, seen = stage.continuation_of(view, generated, harmony=True)
    assert seen == prefix and prefix + cont == (
        "<think>\nLet me compute 17 * 24.\nSplit it: 340 + 68 = 408.\n</think>\n\n**408**"
    )
    # a prefix cut in the answer continues the open final message
    past = "<think>\nSo 408.\n</think>\n\nThe answer"
    view = stage.teacher_view(past, harmony=True)
    assert view.endswith("<|channel|>final<|message|>The answer")
    cont, seen = stage.continuation_of(view, " is 408.", harmony=True)
    assert seen == past and cont == " is 408."
    assert stage.teacher_view("no think tag", harmony=True) is None
    wrapped = stage.teacher_view("no think tag", harmony=True, wrap=True)
    assert wrapped == "<|channel|>analysis<|message|>no think tag"
    assert stage.teacher_view(prefix, harmony=False) == prefix
    assert stage.continuation_of(prefix, " 17 * 20", harmony=False) == (" 17 * 20", prefix)
    with pytest.raises(stage.MalformedContinuation, match="final_before_analysis"):
        # a new analysis message after a final one: malformed harmony, named
        stage.continuation_of(
            view, "<|end|><|start|>assistant<|channel|>analysis<|message|>x", harmony=True
        )


def test_config_errors_name_the_key():
    for bad, key in [
        ("mixed_policy.cut_low=0.6", "cut_low"),  # with cut_high 0.5 below
        ("mixed_policy.snap=paragraph", "mixed_policy.snap"),
        ("mixed_policy.questions=0", "mixed_policy.questions"),
        ("mixed_policy.length_factor=-1", "mixed_policy.length_factor"),
        ("mixed_policy.teacher_max_prefill_length=100", "teacher_max_prefill_length"),
        ("mixed_policy.teacher_temperature=-1", "teacher_temperature"),
        ("mixed_policy.non_think_prefix=keep", "non_think_prefix"),
    ]:
        extra = ["mixed_policy.cut_high=0.5"] if "cut_low" in bad else []
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad, *extra])
    assert load_config(None, []).mixed_policy.sources[0] == "{run_dir}/select/*.array_record"


# --------------------------------------------------------------------------- the stage


def _model_copy(src: Path, dst: Path, eos_ids: list[int]) -> Path:
    """A tiny random checkpoint whose EOS is any of `eos_ids`: random weights hit one of
    them at a known rate, so answers both stop early and run into their budget."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "generation_config.json").unlink()
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny Qwen3 student that stops at ~2.6% of its tokens, and the embedded tiny
    gpt-oss teacher (harmony channels, trained on the demo rows: it stops by itself)."""
    root = tmp_path_factory.mktemp("models")
    student = _model_copy(embedded.tiny_student(), root / "student", list(range(1000, 5000)))
    return student, embedded.tiny_teacher()


def _sources(folder: Path) -> Path:
    """The demo rows as selected low-T records, plus the same prompts again as high-T records
    (a prompt counts once: its first record)."""
    rows = embedded.demo_rows()[:6]
    low = [SFTRecord(r["uuid"], r["input"], r["output"], "low_t", r["domain"]) for r in rows]
    high = [SFTRecord(f"{r['uuid']}-h", r["input"], r["output"][:40], "high_t") for r in rows]
    write_sft_records(folder / "select" / "train-00000.array_record", low)
    write_sft_records(folder / "select_high_t" / "train-00000.array_record", high)
    return folder


def _overrides(run_dir, models, *extra):
    student, teacher = models
    return [
        f"run_dir={run_dir}",
        f"mixed_policy.student={student}",
        f"teacher.path={teacher}",
        "mixed_policy.demo=false",
        "mixed_policy.questions=6",
        "mixed_policy.length_factor=0.2",
        # The embedded teacher is trained at build time, so it is another model on each machine
        # (XLA:CPU rounding): reading a random student's prefix it may stop, derail or write
        # malformed harmony. A budget of 8 tokens, cut continuations kept, gives kept records
        # on any such teacher; the rejection of cut ones is tested on its own.
        "mixed_policy.teacher_max_tokens=8",
        "mixed_policy.keep_truncated=true",
        "mixed_policy.non_think_prefix=as_thinking",  # a random student writes no <think>
        "mixed_policy.snap=sentence",
        "mixed_policy.questions_per_shard=2",
        "filters.structure=false",  # random weights never write <think>...</think>
        "student.dtype=float32",
        "teacher.dtype=float32",
        "student.attention=xla",
        "teacher.attention=xla",
        "mesh.data=1",
        "sample.slots=4",
        "sample.decode_steps=4",
        *extra,
    ]


def _cfg(run_dir, models, *extra):
    return load_config(None, _overrides(run_dir, models, *extra))


def _outputs(folder: Path) -> dict[str, bytes]:
    names = sorted(folder.glob("train-*.array_record")) + [
        folder / "samples.jsonl",
        folder / "rejects.jsonl",
    ]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    run_dir = _sources(tmp_path_factory.mktemp("ref"))
    summary = stage.run(_cfg(run_dir, models))
    return run_dir, summary


def test_stage_counts_and_record_contract(reference, models, tok):
    run_dir, summary = reference
    out = run_dir / "mixed_policy"
    c = summary["counts"]
    assert c["in"] == 6 and c["in"] == c["out"] + c["rejected"]
    assert sum(summary["rejected"].values()) == c["rejected"]
    assert summary["unique_prompts"] == 6 and summary["source_records"] == 12
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rejects) == c["rejected"] and len(samples) == c["out"]
    assert Counter(r["reason"] for r in rejects) == Counter(summary["rejected"])
    # both outcomes of the student (EOS before the budget / budget used) and of the teacher
    assert summary["rejected"].get("not_capped", 0) >= 1 and c["out"] >= 1
    questions = {r["question"] for r in rejects} | {s["question"] for s in samples}
    assert len(questions) == 6  # every drawn question once, kept or rejected
    plan = json.loads((out / "plan.json").read_text())
    from dasd_jax.ingest import prompt_hash

    keys = [prompt_hash(r["input"]) for r in embedded.demo_rows()[:6]][::-1]
    assert [q["id"] for q in plan["questions"]] == [
        keys[i] for i in cut.choose_questions(keys, 6, seed=0)
    ]
    assert set(keys) == questions
    records = [r for f in sorted(out.glob("train-*.array_record")) for r in read_sft_records(f)]
    assert len(records) == c["out"] and summary["train_files"]
    for r in rejects:
        if r["reason"] == "not_capped":
            assert r["student_tokens"] < r["cap"] and r["finish"] == "stop"
    for rec, s in zip(records, samples, strict=True):
        m = rec.meta
        assert rec.source == "mixed_policy" and m["question"] == s["question"]
        assert rec.student_prefix_chars == m["cut_chars"] == s["prefix_chars"]
        assert m["L"] == m["cap"] and m["student_finish"] == "length"
        assert 0.5 * m["L"] < m["cut_token"] < m["L"]
        # kept with keep_truncated=true: a cut continuation used the whole budget
        assert m["teacher_finish"] == "stop" or m["continuation_tokens"] == 8
        assert len(rec.response) == s["prefix_chars"] + s["continuation_chars"]
        assert m["student"] == str(models[0]) and m["teacher"] == str(models[1])


def test_cut_continuations_are_rejected_by_default(tmp_path, models):
    """keep_truncated=false (the default): a continuation that hits teacher_max_tokens is a
    reject; with a 2-token budget the teacher (any build of it) is cut on every question it
    continues, rather than writing its whole answer."""
    cut = ("mixed_policy.keep_truncated=false", "mixed_policy.teacher_max_tokens=2")
    summary = stage.run(_cfg(_sources(tmp_path), models, *cut))
    assert summary["counts"]["out"] == 0
    rejected = summary["rejected"]
    assert rejected.get("continuation_truncated", 0) >= 1
    allowed = {"not_capped", "continuation_truncated", "empty_continuation"}
    assert all(r in allowed or r.startswith("harmony_") for r in rejected), rejected
    rejects = (tmp_path / "mixed_policy" / "rejects.jsonl").read_text().splitlines()
    for r in map(json.loads, rejects):
        if r["reason"] == "continuation_truncated":
            assert r["continuation_tokens"] == 2


def test_prefix_and_continuation_match_the_models(reference, models):
    """Independent reference: the student's own sample with the recorded seed, cut at the
    recorded token, is the prefix; `TeacherSampler.continue_` on that prefix with the same
    seed is the continuation; response == prefix_text + continuation_text."""
    from dasd_jax.sample.driver import Request, generate
    from dasd_jax.sample.stage import TeacherSampler

    run_dir, summary = reference
    out = run_dir / "mixed_policy"
    eng = summary["engines"]
    cfg = _cfg(run_dir, models)
    records = [r for f in sorted(out.glob("train-*.array_record")) for r in read_sft_records(f)]
    scfg = load_config(
        None,
        _overrides(
            run_dir,
            models,
            f"teacher.path={models[0]}",
            f"sample.max_tokens={eng['student_decode']}",
            f"sample.max_prefill_length={eng['student_prefill']}",
        ),
    )
    student = TeacherSampler(models[0], scfg)
    reqs = [
        Request(
            r.id,
            student.encode_prompt(r.prompt),
            [student.params(1.0, r.meta["student_seed"], r.meta["cap"])],
        )
        for r in records
    ]
    answers = generate(student.engine, reqs, student.token_text)
    prefixes = {}
    for r in records:
        (a,) = answers[r.id]
        assert a.finish_reason == "length" and len(a.token_ids) == r.meta["L"]
        k = r.meta["cut_token"]
        prefix, _ = student.token_text.text(a.token_ids[:k])
        assert r.response[: r.student_prefix_chars] == prefix
        assert len(prefix) == r.student_prefix_chars
        prefixes[r.id] = prefix
    del student
    tcfg = load_config(
        None,
        _overrides(
            run_dir,
            models,
            "sample.max_tokens=8",
            f"sample.max_prefill_length={eng['teacher_prefill']}",
        ),
    )
    teacher = TeacherSampler(models[1], tcfg)
    for r in records:
        # the teacher reads the random prefix as thinking (non_think_prefix=as_thinking)
        (cand,) = teacher.continue_(
            r.prompt, "<think>\n" + prefixes[r.id], temperature=1.0, seed=cfg.seed, max_tokens=8
        )
        assert cand.meta["seed"] == r.meta["teacher_seed"]
        cont = cand.response[cand.meta["student_prefix_chars"] :]
        assert r.response == prefixes[r.id] + cont
        assert (
            cand.teacher.token_ids and len(cand.teacher.token_ids) == r.meta["continuation_tokens"]
        )


def test_resume_after_kills_gives_identical_files(reference, models, tmp_path, monkeypatch):
    """Killed once while the student answers, once while the teacher continues and once
    between a shard's done marker and its journal's removal: each restart redoes no journaled
    work, leaves no dead journal, and the end result equals an uninterrupted run."""
    ref_dir, _ = reference
    ref = _outputs(ref_dir / "mixed_policy")
    run_dir = _sources(tmp_path)
    out = run_dir / "mixed_policy"
    real_append = shards.Shard.append

    class Killed(BaseException):
        pass

    def run_until(stop) -> list[dict]:
        seen = []

        def append_then_die(self, entry):
            real_append(self, entry)  # journaled (fsync) before the kill
            seen.append(entry)
            if stop(entry, seen):
                raise Killed  # nothing after this line runs: no cleanup of any kind

        monkeypatch.setattr(shards.Shard, "append", append_then_die)
        with pytest.raises(Killed):
            stage.run(_cfg(run_dir, models))
        monkeypatch.setattr(shards.Shard, "append", real_append)
        assert list((out / "shards").glob("*.journal")) and not (out / "summary.json").exists()
        for f in out.glob("train-*.array_record"):  # a shard written before the kill is final
            assert f.read_bytes() == ref[f.name]
        return seen

    first = run_until(lambda e, seen: sum(x["phase"] == "student" for x in seen) == 2)
    second = run_until(lambda e, seen: "record" in e)
    cut_before = {e["q"] for e in first if e["phase"] == "student"}
    assert len(cut_before) == 2
    assert not cut_before & {e["q"] for e in second if e["phase"] == "student"}  # not redone
    decided = {e["q"] for e in first + second if e["phase"] == "final"}
    # killed between a shard's done marker and its journal's removal: a dead journal
    real_unlink = Path.unlink

    def unlink_or_die(self, *a, **k):
        if self.suffix == ".journal" and self.exists():
            raise Killed
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink_or_die)
    with pytest.raises(Killed):
        stage.run(_cfg(run_dir, models))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    dead = [
        j
        for j in (out / "shards").glob("*.journal")
        if (out / "shards" / j.name.replace("shard-", "done-")).with_suffix(".json").exists()
    ]
    assert len(dead) == 1
    summary = stage.run(_cfg(run_dir, models))
    assert _outputs(out) == ref
    assert not list((out / "shards").glob("*.journal"))
    assert summary["counts"] == reference[1]["counts"]
    resumed = sum(
        json.loads(p.read_text())["resumed_questions"] for p in (out / "shards").glob("done-*")
    )
    assert 1 <= resumed <= len(decided)
    # a restart with other settings is refused, naming them
    with pytest.raises(stage.StageError, match="mixed_policy"):
        stage.run(_cfg(run_dir, models, "mixed_policy.cut_low=0.6"))


def test_stage3_loss_covers_the_whole_response_unless_masked(reference, tok):
    from dasd_jax.train import data

    run_dir, _ = reference
    cfg = load_config(None, [f"run_dir={run_dir}"])
    assert cfg.stage3.mask_student_prefix is False  # the paper's better variant
    (src,) = data.resolve_sources(cfg.stage3, str(run_dir), 3)
    assert src.name == "mixed_policy" and all("mixed_policy/train-" in f for f in src.files)
    records = [r for f in src.files for r in read_sft_records(f)]
    assert records
    system = cfg.train.system_prompt
    for rec in records:
        rendered = render_chat(rec.prompt, rec.response, system)
        _, offsets = encode_with_offsets(tok, rendered.text)
        for masked in (False, True):
            ids, mask = data.encode_record(rec, tok, system, masked)
            loss = np.flatnonzero(mask)
            start = rendered.response_start + (rec.student_prefix_chars if masked else 0)
            s0, e0 = offsets[loss[0]]
            assert s0 == start or s0 < start < e0, (masked, s0, e0, start)
            # every token before the loss run ends at or before the boundary
            assert all(offsets[i][1] <= start for i in range(loss[0]))
            assert np.all(np.diff(loss) == 1)
            assert ids[loss[-1]] == tok.convert_tokens_to_ids(IM_END)
        unmasked = data.encode_record(rec, tok, system, False)[1].sum()
        assert data.encode_record(rec, tok, system, True)[1].sum() < unmasked


# --------------------------------------------------------------------------- inputs


def test_missing_inputs_name_the_stage_to_run(tmp_path, models):
    cfg = load_config(None, [f"run_dir={tmp_path}", f"teacher.path={models[1]}"])
    with pytest.raises(stage.StageError, match="--stage=2"):
        stage.run(cfg)
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "final.json").write_text(
        json.dumps({"step": 3, "export": str(models[0]), "embedded": False})
    )
    assert stage.resolve_student(cfg) == (models[0], False)
    with pytest.raises(stage.StageError, match="--stage=select"):
        stage.run(load_config(None, _overrides(tmp_path, models, "mixed_policy.student=")))


def test_bad_source_records_are_located_or_skipped(tmp_path, models, tok):
    from array_record.python.array_record_module import ArrayRecordWriter

    _sources(tmp_path)
    bad = tmp_path / "select" / "train-00001.array_record"
    w = ArrayRecordWriter(str(bad), "group_size:1")
    w.write(SFTRecord("ok", "A new prompt?", "<think>\nx\n</think>\n\ny").to_bytes())
    w.write(b"{not json")
    w.close()
    with pytest.raises(BadRow, match=r"train-00001.array_record:1: not an SFTRecord"):
        stage.run(_cfg(tmp_path, models, "mixed_policy.on_bad_row=error"))
    # the pipeline-wide policy: counted, but 1 of 14 records is more than 5%
    with pytest.raises(TooManyBadRows, match=r"mixed_policy: 1 of 14 rows are bad.*SFTRecord"):
        stage.run(_cfg(tmp_path, models))
    shutil.rmtree(tmp_path / "mixed_policy", ignore_errors=True)
    plan_only = _cfg(tmp_path, models, "bad_rows.max_bad_fraction=0.1")
    records = stage.SourceRecords(stage.source_files(plan_only))
    from dasd_jax.mixed_policy.plan import build_plan

    plan = build_plan(plan_only, records, tok, {}, None)  # the student's tokenizer
    assert plan["unique_prompts"] == 7 and plan["source_records"] == 14
    assert [b["record"] for b in plan["bad_records"]] == [1]
    assert len(plan["questions"]) == 6
