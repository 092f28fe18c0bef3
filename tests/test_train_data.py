"""SFT data pipeline: loss mask token by token, packing, mixing proportions, over-long policy,
bad input. Real Qwen3 tokenizer (built offline), no model."""

import numpy as np
import pytest

from dasd_jax import embedded
from dasd_jax.config import load_config
from dasd_jax.schema import SFTRecord, write_sft_records
from dasd_jax.tokenizer import (
    IM_END,
    build_qwen3_tokenizer,
    encode_with_offsets,
    load_tokenizer,
    render_chat,
)
from dasd_jax.train import data
from dasd_jax.train.config import SourceConfig, StageConfig, TrainConfig

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(build_qwen3_tokenizer())


def _records(tag="r", n=None, prefix=False):
    rows = embedded.demo_rows()
    recs = [
        SFTRecord(
            id=f"{tag}{i}",
            prompt=r["input"],
            response=r["output"],
            source=tag,
            student_prefix_chars=len(r["output"]) // 3 if prefix else 0,
        )
        for i, r in enumerate(rows)
    ]
    # a response that starts with newlines and holds emoji / CJK (merges across the boundary)
    recs.append(SFTRecord(f"{tag}x", "Say hi 👋", "\n\n<think>\n嗨 🙂\n</think>\n\nhi 👋🏽", tag))
    return recs[:n] if n else recs


def _write(tmp_path, name, recs):
    path = tmp_path / f"{name}.array_record"
    write_sft_records(path, recs)
    return str(path)


def _pipeline(tok, tmp_path, sources: dict, tcfg=None, scfg_kw=None, seed=0):
    scfg = StageConfig(
        sources={k: SourceConfig(p, w) for k, (p, w) in sources.items()}, **(scfg_kw or {})
    )
    tcfg = tcfg or TrainConfig(seq_len=512, global_batch=4, data_threads=2)
    return data.Pipeline(data.resolve_sources(scfg, str(tmp_path), 1), tok, tcfg, scfg, seed)


def _text(text, offsets, idx):
    """The text of tokens `idx`, a character split across tokens given to the last one that
    holds its bytes (each span cut at the next token's start: the byte rule's spans share
    such a character)."""
    nxt = [s for s, _ in offsets[1:]] + [len(text)]
    return "".join(text[offsets[i][0] : min(offsets[i][1], nxt[i])] for i in idx)


@pytest.mark.parametrize("mask_prefix", [False, True])
def test_loss_mask_token_by_token(tok, mask_prefix):
    """Loss tokens spell exactly the response (or its teacher part) + <|im_end|>; every other
    token, checked one by one, lies in the system/user turns or the assistant header."""
    for rec in _records(prefix=True):
        ids, mask = data.encode_record(rec, tok, SYSTEM, mask_prefix)
        r = render_chat(rec.prompt, rec.response, SYSTEM)
        ref_ids, offsets = encode_with_offsets(tok, r.text)
        assert ids.tolist() == ref_ids
        loss = np.flatnonzero(mask)
        assert np.all(np.diff(loss) == 1), "loss tokens are one contiguous run"
        start = r.response_start + (rec.student_prefix_chars if mask_prefix else 0)
        s0, e0 = offsets[loss[0]]
        # the first loss token starts the answer (or its teacher part), or straddles that
        # boundary: a token holding any answer character is trained on ("\n" + "\n\n" of
        # the header and a response starting with newlines merge into one token)
        assert s0 == start or s0 < start < e0, (rec.id, s0, e0, start)
        assert _text(r.text, offsets, loss) == r.text[s0 : r.response_end] + IM_END
        assert ids[loss[-1]] == tok.convert_tokens_to_ids(IM_END)
        for i in np.flatnonzero(mask == 0):  # token by token: nothing of the answer
            s, e = offsets[i]
            assert e <= start or s >= r.response_end + len(IM_END), (rec.id, i, r.text[s:e])
            assert e <= start or i > loss[-1]
        assert _text(r.text, offsets, range(loss[-1] + 1, len(ids))) == "\n"


def test_packed_rows_hold_documents_with_their_masks(tok, tmp_path):
    """Every segment of a packed row is one whole record (tokens and mask as encoded alone),
    positions restart at 0, padding has segment 0 and no loss."""
    recs = _records()
    pl = _pipeline(tok, tmp_path, {"a": (_write(tmp_path, "a", recs), 1.0)})
    encoded = {
        tuple(ids.tolist()): mask
        for ids, mask in (data.encode_record(r, tok, SYSTEM, False) for r in recs)
    }
    it = iter(pl.dataset())
    n_docs = 0
    for _ in range(3):
        b = next(it)
        assert b["tokens"].shape == (4, 512)
        for row in range(4):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            assert np.all(b["loss_mask"][row][seg == 0] == 0)
            for s in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == s)
                assert np.all(np.diff(where) == 1)
                assert pos[where].tolist() == list(range(len(where)))
                doc = tuple(b["tokens"][row][where].tolist())
                assert doc in encoded
                assert b["loss_mask"][row][where].tolist() == encoded[doc].tolist()
                n_docs += 1
    assert n_docs > 12  # several documents per row: packing happened

    unmasked = _pipeline(
        tok,
        tmp_path,
        {"a": (str(tmp_path / "a.array_record"), 1.0)},
        TrainConfig(seq_len=512, global_batch=4, data_threads=2, packing="unmasked"),
    )
    b = next(iter(unmasked.dataset()))
    real = b["source"] > 0
    assert np.all(b["segment_ids"][real] == 1) and np.all(b["segment_ids"][~real] == 0)
    assert b["positions"][0][real[0]].tolist() == list(range(int(real[0].sum())))


def _source_counts(pl, n):
    it = iter(pl.mixed())
    names = {s.index: s.name for s in pl.sources}
    out = {}
    for _ in range(n):
        name = names[int(next(it)["source"][0])]
        out[name] = out.get(name, 0) + 1
    return out


def _chi2(counts: dict, weights: dict) -> float:
    n = sum(counts.values())
    total = sum(weights.values())
    return sum(
        (counts.get(k, 0) - n * w / total) ** 2 / (n * w / total) for k, w in weights.items()
    )


def test_mixing_proportions_match_weights_and_change_between_stages(tok, tmp_path):
    paths = {k: _write(tmp_path, k, _records(k, n=4)) for k in ("low_t", "high_t", "mixed")}
    cfg = load_config(
        None,
        [
            f"stage2.sources.high_t.path={paths['high_t']}",
            "stage2.sources.high_t.weight=0.7",
            f"stage2.sources.low_t.path={paths['low_t']}",
            "stage2.sources.low_t.weight=0.3",
            f"stage3.sources.mixed_policy.path={paths['mixed']}",
            "stage3.sources.mixed_policy.weight=0.5",
            f"stage3.sources.replay.path={paths['high_t']}",
            "stage3.sources.replay.weight=0.2",
            f"stage3.sources.old.path={paths['low_t']}",
            "stage3.sources.old.weight=0.3",
        ],
    )
    tcfg = TrainConfig(seq_len=512, global_batch=4, data_threads=2)
    n = 1000
    # chi-square critical values at p = 0.001: 10.83 (1 dof), 13.82 (2 dof)
    for stage, crit in ((2, 10.83), (3, 13.82)):
        scfg = getattr(cfg, f"stage{stage}")
        pl = data.Pipeline(data.resolve_sources(scfg, str(tmp_path), stage), tok, tcfg, scfg, 0)
        counts = _source_counts(pl, n)
        weights = {k: s.weight for k, s in scfg.sources.items()}
        assert set(counts) == set(weights), counts
        assert _chi2(counts, weights) < crit, (stage, counts)
        # and not just any split: the other stage's weights do not fit these counts
        assert _chi2(counts, {k: 1.0 for k in weights}) > 50
    # a different seed changes the order, not the proportions
    pl0 = _pipeline(tok, tmp_path, {"a": (paths["low_t"], 0.5), "b": (paths["high_t"], 0.5)})
    pl1 = _pipeline(
        tok, tmp_path, {"a": (paths["low_t"], 0.5), "b": (paths["high_t"], 0.5)}, seed=1
    )

    def take(pl):
        it = iter(pl.mixed())
        return [next(it)["tokens"][:40].tolist() for _ in range(8)]

    assert take(pl0) == take(pl0) and take(pl0) != take(pl1)


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_policy_is_explicit_and_counted(tok, tmp_path, policy):
    recs = _records()
    lengths = [len(data.encode_record(r, tok, SYSTEM, False)[0]) for r in recs]
    seq_len = 130
    n_long = sum(n > seq_len for n in lengths)
    assert 0 < n_long < len(recs)
    tcfg = TrainConfig(seq_len=seq_len, global_batch=2, data_threads=1, overlong=policy)
    # one host slice of one epoch = every record once (shuffled): count over whole epochs
    pl = _pipeline(tok, tmp_path, {"a": (_write(tmp_path, "a", recs), 1.0)}, tcfg)
    it = iter(pl.mixed())
    kept = [next(it) for _ in range(3 * (len(recs) - (n_long if policy == "drop" else 0)))]
    events = np.sum([ex["events"].sum(0) for ex in kept], axis=0)
    counts = dict(zip(data.EVENTS, events.tolist(), strict=True))
    assert all(len(ex["tokens"]) <= seq_len for ex in kept)
    if policy == "drop":  # 3 epochs: each long record dropped 3 times (minus a trailing one)
        assert 3 * n_long - n_long <= counts["dropped_overlong"] <= 3 * n_long
        assert counts["truncated"] == 0
    else:
        assert counts["truncated"] == 3 * n_long and counts["dropped_overlong"] == 0


def test_bad_input_errors_name_what_is_missing(tok, tmp_path):
    good = _write(tmp_path, "good", _records(n=3))
    empty_resp = _records(n=3) + [SFTRecord("no-answer-7", "What is 2+2?", "", "a")]
    bad = _write(tmp_path, "bad", empty_resp)
    # a record without assistant tokens: with on_bad_record=error (strict runs), the error
    # names the record, the source and the file
    strict = TrainConfig(seq_len=512, global_batch=4, data_threads=2, on_bad_record="error")
    pl = _pipeline(tok, tmp_path, {"a": (bad, 1.0)}, strict)
    with pytest.raises(data.DataError, match=r"'a'.*bad\.array_record.*no-answer-7.*no assistant"):
        it = iter(pl.mixed())
        for _ in range(8):
            next(it)
    with pytest.raises(data.DataError, match="no assistant tokens"):
        data.encode_record(SFTRecord("p", "q", "abc", student_prefix_chars=3), tok, SYSTEM, True)
    # ... or, with on_bad_record=skip, is counted and skipped
    tcfg = TrainConfig(seq_len=512, global_batch=2, data_threads=1, on_bad_record="skip")
    it = iter(_pipeline(tok, tmp_path, {"a": (bad, 1.0)}, tcfg).mixed())
    skipped = sum(int(next(it)["events"][:, 1].sum()) for _ in range(9))
    assert skipped >= 2
    # an empty dataset
    write_sft_records(tmp_path / "empty.array_record", [])
    with pytest.raises(data.DataError, match=r"source 'e': 0 records in .*empty\.array_record"):
        _pipeline(tok, tmp_path, {"e": (str(tmp_path / "empty.array_record"), 1.0)})
    # no files, and no source at all
    with pytest.raises(data.DataError, match=r"source 'x': no files match '.*nothing-\*"):
        _pipeline(tok, tmp_path, {"x": (str(tmp_path / "nothing-*"), 1.0), "g": (good, 1.0)})
    with pytest.raises(data.DataError, match="no source has weight > 0"):
        _pipeline(tok, tmp_path, {"g": (good, 0.0)})


def test_iterator_state_round_trips_and_eval_split_is_held_out(tok, tmp_path):
    recs = _records()
    tcfg = TrainConfig(seq_len=256, global_batch=2, data_threads=2, eval_rows=2)
    pl = _pipeline(tok, tmp_path, {"a": (_write(tmp_path, "a", recs), 1.0)}, tcfg)
    it = iter(pl.dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it)["tokens"] for _ in range(3)]
    it2 = iter(pl.dataset())
    it2.set_state(state)
    assert all(np.array_equal(a, next(it2)["tokens"]) for a in after)
    # held-out records never appear in training
    held = {tuple(data.encode_record(SFTRecord.from_bytes(pl.splits["a"][1][i]), tok, SYSTEM,
                                     False)[0].tolist()) for i in range(2)}  # fmt: skip
    seen = set()
    for b in [next(it) for _ in range(10)]:
        for row in range(2):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                seen.add(tuple(b["tokens"][row][seg == s].tolist()))
    assert len(held) == 2 and not (held & seen) and len(seen) == len(recs) - 2
    rows = pl.eval_rows(2)
    assert rows and len(rows) % 2 == 0
    assert {tuple(r["tokens"][r["segment_ids"] == s].tolist()) for r in rows
            for s in range(1, r["segment_ids"].max() + 1)} == held  # fmt: skip


def test_train_config_sections_and_source_subsets(tok, tmp_path):
    cfg = load_config(None, ["stage2.epochs=2", "stage3.sources.replay.path=x"])
    assert set(cfg.stage2.sources) == {"high_t"}  # a section given in part keeps its sources
    assert set(cfg.stage3.sources) == {"mixed_policy", "replay"}
    from dasd_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key stage2\.sources\.low_t\.wieght"):
        load_config(None, ["stage2.sources.low_t.wieght=1"])
    with pytest.raises(ConfigError, match="global_batch 64 is not a multiple of micro_batch 5"):
        load_config(None, ["train.micro_batch=5"])
    # max_records: a seeded subset (e.g. the paper's 20K off-policy replay)
    path = _write(tmp_path, "a", _records())
    scfg = StageConfig(sources={"a": SourceConfig(path, 1.0, max_records=3)})
    tcfg = TrainConfig(seq_len=512, global_batch=2, data_threads=1)
    pl = data.Pipeline(data.resolve_sources(scfg, str(tmp_path), 1), tok, tcfg, scfg, 0)
    it = iter(pl.mixed())
    assert len({tuple(next(it)["tokens"].tolist()) for _ in range(12)}) == 3
