"""Inter-stage records: JSON round trips, length checks, ArrayRecord files Grain can read."""

import grain
import pytest

from dasd_jax.schema import (
    Candidate,
    SFTRecord,
    TokenScores,
    read_sft_records,
    write_sft_records,
)


def test_candidate_round_trip_and_checks():
    c = Candidate(
        "p1",
        0,
        "Q?",
        "<think>a</think>b",
        temperature=0.6,
        finish_reason="stop",
        teacher=TokenScores("gpt-oss", "o200k", [1, 2], [-0.1, -0.2], [(0, 3), (3, 9)]),
    )
    assert Candidate.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="logprobs has 1 entries, token_ids has 2"):
        TokenScores("m", "t", [1, 2], [-0.1])
    with pytest.raises(ValueError, match="unknown candidate fields"):
        Candidate.from_dict({**c.to_dict(), "extra": 1})


def test_sft_records_array_record_round_trip_and_grain(tmp_path):
    recs = [
        SFTRecord(
            f"id{i}", f"q{i}", f"<think>r{i}</think>a", source="low_t", student_prefix_chars=i
        )
        for i in range(5)
    ]
    path = tmp_path / "sft.array_record"
    assert write_sft_records(path, recs) == 5
    assert list(read_sft_records(path)) == recs
    assert not list(tmp_path.glob(".*tmp"))
    src = grain.sources.ArrayRecordDataSource([str(path)])
    assert len(src) == 5
    assert SFTRecord.from_bytes(src[3]) == recs[3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_sft_records(tmp_path / "missing"))
