"""Stage inputs of the pipeline: score reads the sample stage's folder (or a glob, or any folder
of JSONL) as one stream equal to the concatenated files; select takes one temperature class
(low_t / high_t), the two runs partition the candidates and the counts balance."""

import json
import math
import shutil

import grain
import pytest

from dasd_jax import embedded, ingest, score
from dasd_jax.config import ConfigError, load_config
from dasd_jax.records import BadRow
from dasd_jax.schema import Candidate, SFTRecord, TokenScores
from dasd_jax.select import stage as select_stage
from dasd_jax.select.sentences import split_sentences
from dasd_jax.tokenizer import encode_with_offsets, load_tokenizer


@pytest.fixture(scope="module")
def student():
    return embedded.tiny_student()  # the user cache the CLI demo uses (built once)


def _sampled(student, temperature: float, rows: list[dict], first: int) -> list[str]:
    """Candidate JSONL lines as the sample stage writes them: teacher tokens with log-probs
    and offsets (here the tiny student's tokens and made-up log-probs)."""
    tok = load_tokenizer(student)
    out = []
    for k, r in enumerate(rows):
        ids, offs = encode_with_offsets(tok, r["output"])
        lps = [-0.1 - 0.01 * ((i + first + k) % 7) for i in range(len(ids))]
        c = Candidate(
            prompt_id=r["uuid"],
            candidate=0,
            prompt=r["input"],
            response=r["output"],
            temperature=temperature,
            finish_reason="stop",
            domain=r.get("domain"),
            teacher=TokenScores("teacher", "tok", ids, lps, offs),
        )
        out.append(json.dumps(c.to_dict()) + "\n")
    return out


def _sample_folder(tmp_path, student):
    """<run_dir>/sample as the sample stage leaves it, with its non-data files around the
    part files; returns (folder, [part files in reading order])."""
    rows = embedded.demo_rows()[:5]
    root = tmp_path / "sample"
    parts = {
        root / "t0.6" / "part-000000.jsonl": _sampled(student, 0.6, rows[:2], 0),
        root / "t0.6" / "part-000001.jsonl": _sampled(student, 0.6, rows[2:3], 2),
        root / "t1" / "part-000000.jsonl": _sampled(student, 1.0, rows[3:5], 3),
    }
    for path, lines in parts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))
    # what is not candidate data; each would be a bad candidate if it were read
    (root / "t0.6" / "part-000000.stats.json").write_text('{"shard": 0}\n')
    (root / "t0.6" / "rejects.part-000000.jsonl").write_text('{"line": 1, "reason": "x"}\n')
    (root / "t1" / "part-000001.journal").write_text('{"line": 1, "candidates": []}\n')
    (root / "metrics.jsonl").write_text('{"time": 1.0}\n')
    (root / "summary.json").write_text("{}\n")
    return root, sorted(parts)


def _cfg(run_dir, student, data, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            f"score.input={data}",
            "score.rows_per_shard=2",  # shards that span two files
            "student.dtype=float32",
            "student.attention=xla",
            "mesh.data=1",
            *extra,
        ],
    )


def _scored(folder):
    out = []
    for f in sorted(folder.glob("part-*.jsonl")):
        out += [Candidate.from_dict(json.loads(x)) for x in f.open()]
    return out


def _without_location(c: Candidate) -> dict:
    d = c.to_dict()
    d["meta"] = {k: v for k, v in d["meta"].items() if k not in ("line", "input")}
    return d


def test_score_reads_the_sample_folder_as_the_concatenated_files(tmp_path, student):
    folder, parts = _sample_folder(tmp_path, student)
    bad = parts[2]  # t1/part-000000.jsonl: an unreadable line 2
    lines = bad.read_text().splitlines(keepends=True)
    bad.write_text(lines[0] + "{oops\n" + lines[1])
    assert ingest.input_files(folder) == [str(p) for p in parts]
    concat = tmp_path / "all.jsonl"
    concat.write_text("".join(p.read_text() for p in parts))

    strict = ("score.rows_per_shard=100", "score.on_bad_row=error")
    with pytest.raises(BadRow, match=r"t1/part-000000\.jsonl:2: malformed JSON"):
        score.run(_cfg(tmp_path / "e", student, folder, *strict))
    skip = ("score.on_bad_row=skip", "bad_rows.max_bad_fraction=1")  # 1 of these 6 is bad
    got = score.run(_cfg(tmp_path / "a", student, folder, *skip))
    ref = score.run(_cfg(tmp_path / "b", student, concat, *skip))
    a, b = _scored(tmp_path / "a" / "score"), _scored(tmp_path / "b" / "score")
    assert len(a) == 5 and [_without_location(x) for x in a] == [_without_location(y) for y in b]
    assert [x.temperature for x in a] == [0.6, 0.6, 0.6, 1.0, 1.0]
    assert all(x.student.logprobs and x.teacher.logprobs for x in a)
    # each candidate names its own file and line; shard 1 holds rows of two files
    assert [(x.meta["input"], x.meta["line"]) for x in a] == [
        (str(parts[0]), 1),
        (str(parts[0]), 2),
        (str(parts[1]), 1),
        (str(parts[2]), 1),
        (str(parts[2]), 3),
    ]
    rejects = [
        json.loads(x) for x in (tmp_path / "a" / "score" / "rejects.part-000002.jsonl").open()
    ]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(bad), 2)]
    assert got["counts"] == ref["counts"] == {"in": 6, "out": 5, "rejected": 1}
    assert got["files"] == {
        str(parts[0]): {"lines": 2, "bad_lines": 0, "candidates": 2, "rows_out": 2, "rejects": 0},
        str(parts[1]): {"lines": 1, "bad_lines": 0, "candidates": 1, "rows_out": 1, "rejects": 0},
        str(bad): {"lines": 3, "bad_lines": 1, "candidates": 2, "rows_out": 2, "rejects": 1},
    }
    assert got["input_files"] == 3 and got["input_format"] == "candidates"
    assert got["teacher_from"] == {"logprobs": 5, "model": 0, "none": 0}

    # a glob names the same stream; a resumed run skips the finished shards
    shutil.rmtree(tmp_path / "a" / "score")
    glob = score.run(_cfg(tmp_path / "a", student, f"{folder}/t*/part-*.jsonl", *skip))
    assert [x.to_dict() for x in _scored(tmp_path / "a" / "score")] == [x.to_dict() for x in a]
    (tmp_path / "a" / "score" / "part-000001.jsonl").unlink()
    again = score.run(_cfg(tmp_path / "a", student, folder, *skip))
    assert again["skipped_shards"] == 2 and again["counts"] == glob["counts"]


def test_input_files_of_a_plain_folder_a_glob_and_errors(tmp_path):
    d = tmp_path / "dumps"
    d.mkdir()
    for name in ("b.jsonl", "a.jsonl", "rejects.part-000000.jsonl", "metrics.jsonl", "x.txt"):
        (d / name).write_text("{}\n")
    assert ingest.input_files(d) == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    assert ingest.input_files(f"{d}/[b]*.jsonl") == [str(d / "b.jsonl")]
    assert ingest.input_files(d / "a.jsonl") == [str(d / "a.jsonl")]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        ingest.input_files(f"{d}/*.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest.input_files(d / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="a folder with no JSONL file"):
        ingest.input_files(tmp_path / "empty")


# ------------------------------------------------------------------ select by temperature


TEXT = "<think>\nA one. B two. C three.\n</think>\n\nD four."


def _candidate(pid, idx, temperature, p_teacher, p_student=(0.5, 0.5, 0.5, 0.5)):
    """Scored: counted sentence i gets one token with these probabilities per model."""
    spans = split_sentences(TEXT)
    content = [s for s in spans if TEXT[s[0] : s[1]].strip() not in ("<think>", "</think>")]

    def side(ps):
        lps = [math.log(p) for p in ps]
        return TokenScores("m", "t", list(range(len(content))), lps, content, n_prompt_tokens=5)

    t = "none" if temperature is None else f"{temperature:g}"
    return Candidate(
        pid, idx, f"prompt {pid}", TEXT, temperature=temperature, domain="math",
        teacher=side(p_teacher), student=side(p_student), meta={"uuid": f"{pid}-T{t}-{idx}"},
    )  # fmt: skip


def _write_scored(folder, cands):
    folder.mkdir(parents=True, exist_ok=True)
    half = len(cands) // 2
    for k, chunk in enumerate((cands[:half], cands[half:])):
        (folder / f"part-{k:06d}.jsonl").write_text(
            "".join(json.dumps(c.to_dict()) + "\n" for c in chunk)
        )


def _uuids(path):
    return [json.loads(x)["uuid"] for x in path.open()]


def test_select_low_t_and_high_t_partition_the_candidates(tmp_path):
    hi, lo = [0.9, 0.9, 0.5, 0.5], [0.9, 0.5, 0.5, 0.5]  # 2 vs 1 Teacher sentences
    cands = []
    for p in ("P0", "P1", "P2"):  # indices repeat across temperatures, as the sample stage's
        cands += [_candidate(p, 0, 0.6, lo), _candidate(p, 1, 0.6, hi)]
        cands += [_candidate(p, 0, 1.0, hi), _candidate(p, 1, 1.0, lo)]
    cands.append(_candidate("P3", 0, 0.8, hi))  # high_t_from=0.8 is high
    _write_scored(tmp_path / "run" / "score", cands)
    out = {}
    for cls in ("low_t", "high_t"):
        out[cls] = select_stage.run(
            load_config(
                None,
                [
                    f"run_dir={tmp_path / 'run'}",
                    f"select_stage.temperatures={cls}",
                    f"select_stage.output={tmp_path / cls}",
                ],
            )
        )
    low, high = (tmp_path / "low_t", tmp_path / "high_t")
    assert _uuids(low / "selected.jsonl") == ["P0-T0.6-1", "P1-T0.6-1", "P2-T0.6-1"]
    assert _uuids(high / "selected.jsonl") == ["P0-T1-0", "P1-T1-0", "P2-T1-0", "P3-T0.8-0"]
    seen_low = set(_uuids(low / "selected.jsonl")) | set(_uuids(low / "rejects.jsonl"))
    seen_high = set(_uuids(high / "selected.jsonl")) | set(_uuids(high / "rejects.jsonl"))
    assert not seen_low & seen_high  # no candidate in both
    assert seen_low | seen_high == {c.meta["uuid"] for c in cands}
    assert {json.loads(x)["reasons"][0] for x in (low / "rejects.jsonl").open()} == {
        "not_selected"
    }  # never duplicate_candidate: the other class's same indices are not considered
    assert out["low_t"]["counts"] == {"in": 13, "out": 3, "rejected": 3, "other_temperature": 7}
    assert out["high_t"]["counts"] == {"in": 13, "out": 4, "rejected": 3, "other_temperature": 6}
    for s in out.values():
        c = s["counts"]
        assert c["in"] == c["out"] + c["rejected"] + c["other_temperature"]
    for cls, folder, temps in (("low_t", low, {0.6}), ("high_t", high, {1.0, 0.8})):
        src = grain.sources.ArrayRecordDataSource([str(folder / "train-00000.array_record")])
        recs = [SFTRecord.from_bytes(src[i]) for i in range(len(src))]
        assert {r.source for r in recs} == {cls} and {r.temperature for r in recs} == temps
        assert [r.id for r in recs] == _uuids(folder / "selected.jsonl")
    assert out["low_t"]["rows"]["by_temperature"] == {"0.6": {"in": 6, "out": 3}}
    assert "Temperature class `high_t` only: 6 candidates" in (high / "report.md").read_text()


def test_select_class_needs_each_candidates_temperature(tmp_path):
    cands = [_candidate("P0", 0, 0.6, [0.9] * 4), _candidate("P0", 1, None, [0.9] * 4)]
    _write_scored(tmp_path / "run" / "score", cands)
    args = [f"run_dir={tmp_path / 'run'}", "select_stage.temperatures=low_t"]
    with pytest.raises(BadRow, match=r"part-000001\.jsonl:1: no_temperature"):
        select_stage.run(load_config(None, [*args, "select_stage.on_bad_row=error"]))
    skip = ["select_stage.on_bad_row=skip", "bad_rows.max_bad_fraction=1"]
    s = select_stage.run(load_config(None, [*args, *skip]))
    assert s["counts"] == {"in": 2, "out": 1, "rejected": 1, "other_temperature": 0}
    assert s["selected"] == 1 and s["bad_rows"] == 1
    assert select_stage.run(load_config(None, args[:1]))["counts"]["in"] == 2  # all: no check
    with pytest.raises(ConfigError, match="select_stage.temperatures must be all, low_t or high_t"):
        load_config(None, ["select_stage.temperatures=warm"])
