"""Ingest: cross-tokenizer alignment on the real Qwen3 and gpt-oss vocabularies, the released
log-prob join (index, bad rows), OpenAI server dumps, the harmony adapter."""

import json

import numpy as np
import pytest

from dasd_jax import chat, ingest
from dasd_jax.records import BadRow
from dasd_jax.select.filters import harmony_to_think, think_to_harmony
from dasd_jax.select.sentences import assign_tokens, split_sentences
from dasd_jax.tokenizer import (
    build_gpt_oss_tokenizer,
    build_qwen3_tokenizer,
    encode_with_offsets,
    load_tokenizer,
)

# Unicode (accents, CJK, emoji incl. a ZWJ sequence), LaTeX inline and display, code, decimals.
RESPONSE = (
    "<think>\nWe need $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$ for n = 3.14? No: n is whole. "
    "Café déjà vu — 日本語のテキスト。 Emoji 👩‍💻 and 🙂!\n"
    "\\[ x^2 + y^2 = r^2 \\],\nThen code:\n```python\ndef f(x):\n    return x * 2  # ok.\n```\n"
    "Done. The end\n</think>\n\nThe answer is $\\boxed{6}$. Thanks 🎉."
)
PROMPT = "Sum 1..3 — quickly 🙂"


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(build_qwen3_tokenizer())


@pytest.fixture(scope="module")
def oss_bytes():
    return ingest.TokenBytes(build_gpt_oss_tokenizer())


def _teacher_spans(oss_bytes, harmony_text, response, drop_prefix=0):
    ids, _ = encode_with_offsets(oss_bytes.tokenizer, harmony_text)
    ids = ids[drop_prefix:]
    pieces = oss_bytes(ids)
    markers = ingest.harmony_markers(pieces, [i in oss_bytes.special for i in ids])
    return ids, pieces, markers, ingest.align_teacher_tokens(pieces, markers, response)


def _cut_at_next_start(spans):
    """Each span cut at the next one's start: a character split across tokens goes to the last
    token holding its bytes (the tiling the byte rule's overlapping spans give back)."""
    nxt = [s for s, _ in spans[1:]] + [spans[-1][1]]
    return [(a, max(a, min(b, c))) for (a, b), c in zip(spans, nxt, strict=True)]


def _expected_sentence(offsets, spans, text):
    """Brute force of the documented rule: the sentence holding the token's first
    non-whitespace character (a whitespace-only token: its first character); -1 if empty."""
    out = []
    for s, e in offsets:
        if e <= s:
            out.append(-1)
            continue
        anchor = next((c for c in range(s, e) if not text[c].isspace()), s)
        out.append(next(i for i, (a, b) in enumerate(spans) if a <= anchor < b))
    return np.array(out)


def test_student_and_teacher_tokens_land_in_the_right_sentences(qwen, oss_bytes):
    spans = split_sentences(RESPONSE)
    # student: Qwen3 ChatML, response verbatim
    r = chat.render_chatml(PROMPT, RESPONSE, "You are a helpful assistant.")
    ids, offs = encode_with_offsets(qwen, r.text)
    first, n, s_spans = chat.response_offsets(offs, r)
    # the byte rule: spans meet, or share the one character a token boundary splits; cut at
    # the next start (a split character to the last token holding its bytes), they tile
    assert "".join(RESPONSE[a:b] for a, b in _cut_at_next_start(s_spans)) == RESPONSE
    shared = [b - a for (_, b), (a, _) in zip(s_spans, s_spans[1:], strict=False) if b != a]
    assert shared and set(shared) == {1}
    # teacher: gpt-oss harmony tokens, as the released rows (starting inside the analysis)
    harmony = think_to_harmony(RESPONSE)
    assert harmony_to_think(harmony) == RESPONSE
    prefix = len(encode_with_offsets(oss_bytes.tokenizer, "<|channel|>analysis<|message|>")[0])
    t_ids, pieces, markers, t_spans = _teacher_spans(oss_bytes, harmony, RESPONSE, prefix)
    assert not any(markers[:3]) and sum(markers) == 7  # <|end|><|start|>assistant<|channel|>
    # final<|message|> ... <|return|>: 5 markers + 2 header words
    cut = _cut_at_next_start(t_spans)
    content = [RESPONSE[a:b] for (a, b), m in zip(cut, markers, strict=True) if not m]
    think = RESPONSE[len("<think>\n") : RESPONSE.index("\n</think>")]
    answer = RESPONSE[RESPONSE.index("</think>\n\n") + len("</think>\n\n") :]
    assert "".join(content) == think + answer
    assert all(a == b for (a, b), m in zip(t_spans, markers, strict=True) if m)

    for offsets in (s_spans, t_spans):
        got = assign_tokens(offsets, spans, RESPONSE)
        np.testing.assert_array_equal(got, _expected_sentence(offsets, spans, RESPONSE))
    t_sent = assign_tokens(t_spans, spans, RESPONSE)
    s_sent = assign_tokens(s_spans, spans, RESPONSE)
    # channel markers get no sentence; the <think> tags get no teacher token
    assert all(t_sent[np.array(markers)] == -1)
    tags = [i for i, (a, b) in enumerate(spans) if RESPONSE[a:b].strip() in ("<think>", "</think>")]
    assert len(tags) == 2 and not set(tags) & set(t_sent.tolist())
    assert set(tags) <= set(s_sent.tolist())  # the student reads them as tokens
    # both tokenizations reach every content sentence
    content_sentences = set(range(len(spans))) - set(tags)
    assert content_sentences <= set(t_sent.tolist()) and content_sentences <= set(s_sent.tolist())

    # a straddling token: " The" (space in "Done. ", word in "The end") follows its word
    the = RESPONSE.index("Done. The end") + len("Done.")
    k_the = next(i for i, (a, b) in enumerate(s_spans) if a == the)
    assert RESPONSE[slice(*s_spans[k_the])] == " The"
    sent_the = next(i for i, (a, b) in enumerate(spans) if a <= the + 1 < b)
    assert spans[sent_the][0] == the + 1 and s_sent[k_the] == sent_the
    k_the_t = next(i for i, (a, b) in enumerate(t_spans) if a == the)
    assert t_sent[k_the_t] == sent_the
    # a byte-level token holding only part of a character spans it, so it lies in that
    # character's sentence (the brute force above); only markers fall in no sentence
    partial = [bool(len(p) and not p.decode("utf-8", "ignore")) for p in pieces]
    assert any(partial)  # split emoji
    for (a, b), part in zip(t_spans, partial, strict=True):
        assert not part or (b > a and all(len(c.encode()) > 1 for c in RESPONSE[a:b]))
    assert (t_sent[~np.array(markers)] >= 0).all()


def test_align_strips_whitespace_and_reports_mismatch():
    pieces = [b"\n", b"Hello", b" world", b"\n"]
    spans = ingest.align_teacher_tokens(pieces, [False] * 4, "<think>Hello world</think>")
    assert spans == [(7, 7), (7, 12), (12, 18), (18, 18)]
    with pytest.raises(ValueError, match="teacher_text_mismatch.*'Hello world'"):
        ingest.align_teacher_tokens(pieces, [False] * 4, "<think>Hello there</think>")


def test_render_harmony_pieces_map_back_to_the_response(oss_bytes):
    for response in (RESPONSE, "<think>\nonly thinking, cut off", "plain answer"):
        r = chat.render_harmony(PROMPT, response, "Be brief.")
        for ts, te, rs in r.pieces:
            assert r.text[ts:te] == response[rs : rs + te - ts]
        ids, offs = encode_with_offsets(oss_bytes.tokenizer, r.text)
        first, n, spans = chat.response_offsets(offs, r)
        assert ids[first] == 200005  # <|channel|>: the response starts with its channel
        covered = "".join(response[a:b] for a, b in _cut_at_next_start(spans))
        assert covered == "".join(response[rs : rs + te - ts] for ts, te, rs in r.pieces)
    assert r.text.endswith("<|channel|>final<|message|>plain answer<|return|>")
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in r.text


def _harmony_ids(oss_bytes, response):
    prefix = len(encode_with_offsets(oss_bytes.tokenizer, "<|channel|>analysis<|message|>")[0])
    return encode_with_offsets(oss_bytes.tokenizer, think_to_harmony(response))[0][prefix:]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_released_logprob_join(tmp_path, oss_bytes):
    outs = [RESPONSE, "<think>\nshort\n</think>\n\n42", "<think>\nthird\n</think>\n\nx"]
    sft = _write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"uuid": f"u{i}", "input": PROMPT, "output": o, "domain": "math", "meta": "{}"}
            for i, o in enumerate(outs)
        ]
        + [{"uuid": "nope", "input": "q", "output": "a"}],
    )
    lp_rows = []
    for i, o in enumerate(outs):
        ids = _harmony_ids(oss_bytes, o)
        lps = [-0.01 * (k % 7) for k in range(len(ids))]
        if i == 2:
            lps = lps[:-1]  # length mismatch
        lp_rows.append({"sample_uuid": f"u{i}", "token_ids": ids, "logprobs": lps})
    lp_rows.insert(1, "{broken")  # a line the index cannot read: never looked up
    lp_rows.append({"sample_uuid": "u0", "token_ids": [1], "logprobs": [0.0]})  # duplicate
    lp = _write_jsonl(tmp_path / "lp.jsonl", lp_rows)
    index = ingest.LogprobIndex(lp, tmp_path / "cache")
    assert index.stats == {"rows": 4, "duplicates": 1, "unreadable": 1}
    built = index.index_path.stat().st_mtime_ns
    assert ingest.LogprobIndex(lp, tmp_path / "cache").index_path.stat().st_mtime_ns == built

    reader = ingest.Reader(
        sft, "sft", ingest.IngestOptions(temperature=0.6), index, lambda: oss_bytes
    )
    lines = list(ingest.iter_lines(sft))
    c = reader.candidates(*lines[0])[0]
    assert c.teacher.token_ids == lp_rows[0]["token_ids"] and c.temperature == 0.6
    assert c.prompt_id == ingest.prompt_hash(PROMPT) and c.candidate == 1
    assert c.meta["uuid"] == "u0" and c.meta["logprob_line"] == 1
    assert len(c.teacher.offsets) == len(c.teacher.token_ids)
    c1 = reader.candidates(*lines[1])[0]
    assert [c1.response[a:b] for a, b in c1.teacher.offsets if b > a] == ["short", "42"]
    with pytest.raises(
        BadRow, match=r"sft\.jsonl:3: logprob_length_mismatch: token_ids has .*lp\.jsonl:4\)"
    ):
        reader.candidates(*lines[2])
    with pytest.raises(BadRow, match=r"sft\.jsonl:4: unknown_uuid: 'nope'"):
        reader.candidates(*lines[3])
    with pytest.raises(BadRow, match=r"sft\.jsonl:9: malformed JSON"):
        reader.candidates(9, "{x")
    with pytest.raises(BadRow, match=r"sft\.jsonl:5: missing field 'output'"):
        reader.candidates(5, json.dumps({"uuid": "u1", "input": "q"}))
    index.close()


def _dump_tokens(oss_bytes, harmony_text):
    ids, _ = encode_with_offsets(oss_bytes.tokenizer, harmony_text)
    pieces = oss_bytes(ids)
    return [
        {
            "token": p.decode("utf-8", "replace"),
            "logprob": -0.5,
            "bytes": list(p),
            "top_logprobs": [],
        }
        for p in pieces
    ]


def test_openai_dump_lines(tmp_path, oss_bytes):
    harmony = think_to_harmony(RESPONSE)
    line1 = {
        "custom_id": "p1",
        "request": {
            "body": {
                "temperature": 1.0,
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": PROMPT},
                ],
            }
        },
        "response": {
            "body": {
                "model": "gpt-oss-120b",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": {"content": _dump_tokens(oss_bytes, harmony)},
                    },
                    {
                        "index": 1,
                        "finish_reason": "length",
                        "message": {"content": "Hi", "reasoning_content": "Think."},
                        "logprobs": {
                            "content": [
                                {"token": "Think", "logprob": -1.0, "bytes": None},
                                {"token": ".", "logprob": None, "bytes": [46]},
                                {"token": "Hi", "logprob": -2.0, "bytes": [72, 105]},
                            ]
                        },
                    },
                ],
            }
        },
    }
    line2 = {"prompt": "q", "choices": [{"index": 0, "message": {"content": "plain"}}]}
    path = _write_jsonl(
        tmp_path / "dump.jsonl",
        [
            line1,
            line2,
            {"choices": []},
            {"messages": [{"role": "user", "content": "q"}], "choices": [{"index": 0}]},
        ],
    )
    assert ingest.detect_format(path) == "openai"
    reader = ingest.Reader(path, "openai", ingest.IngestOptions())
    a, b = reader.candidates(*next(ingest.iter_lines(path)))
    assert a.prompt_id == "p1" and a.response == RESPONSE and a.temperature == 1.0
    assert a.teacher.model == "gpt-oss-120b" and a.finish_reason == "stop"
    content = [RESPONSE[s:e] for s, e in a.teacher.offsets if e > s]
    assert "".join(content).startswith("We need $") and content[-1] == "."
    assert b.response == "<think>\nThink.\n</think>\n\nHi" and b.candidate == 1
    assert [b.response[s:e] for s, e in b.teacher.offsets] == ["Think", ".", "Hi"]
    assert np.isnan(b.teacher.logprobs[1])
    c = reader.candidates(2, json.dumps(line2))[0]
    assert c.teacher is None and c.response == "plain" and c.prompt_id == ingest.prompt_hash("q")
    assert reader.candidates(3, json.dumps({"prompt": "q", "choices": []})) == []
    with pytest.raises(BadRow, match=r"dump\.jsonl:4: no prompt"):
        reader.candidates(4, json.dumps({"choices": [{"index": 0}]}))
    with pytest.raises(BadRow, match=r"dump\.jsonl:5: choices\[0\] has neither"):
        reader.candidates(5, json.dumps({"prompt": "q", "choices": [{"index": 0}]}))


def test_openai_dumps_of_malformed_harmony(tmp_path, oss_bytes):
    """Dumps go through the one parser of generated harmony: a malformed completion is a bad
    row named by its reason; a final message ended by <|end|> is cut there exactly."""
    good = think_to_harmony(RESPONSE).removesuffix("<|return|>")
    dumps = [
        good + "<|end|> stray text",  # repaired
        good + "<|end|><|start|>assistant<|channel|>final<|message|>again<|return|>",
        "<|channel|>commentary<|message|>Let me look that up.<|end|>",
    ]
    rows = [
        {"prompt": PROMPT, "choices": [{"index": 0, "finish_reason": "stop",
                                        "logprobs": {"content": _dump_tokens(oss_bytes, d)}}]}
        for d in dumps
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "dump.jsonl", rows)
    reader = ingest.Reader(path, "openai", ingest.IngestOptions())
    lines = list(ingest.iter_lines(path))
    (a,) = reader.candidates(*lines[0])
    assert a.response == RESPONSE and a.meta["harmony"]["repair"] == "cut_at_final_end"
    n_good = len(_dump_tokens(oss_bytes, good + "<|end|>"))
    assert len(a.teacher.token_ids) == len(a.teacher.logprobs) == len(a.teacher.offsets) == n_good
    with pytest.raises(BadRow, match=r"dump\.jsonl:2: repeated_channel: choices\[0\]"):
        reader.candidates(*lines[1])
    with pytest.raises(BadRow, match=r"dump\.jsonl:3: commentary: choices\[0\]"):
        reader.candidates(*lines[2])


def test_sample_stage_candidates(tmp_path, oss_bytes):
    ids = _harmony_ids(oss_bytes, RESPONSE)
    good = {
        "prompt_id": "p",
        "candidate": 3,
        "prompt": PROMPT,
        "response": RESPONSE,
        "temperature": None,
        "teacher": {
            "model": "gpt-oss",
            "tokenizer": "o200k",
            "token_ids": ids,
            "logprobs": [-0.1] * len(ids),
        },
    }
    short = json.loads(json.dumps(good))
    short["teacher"]["logprobs"] = short["teacher"]["logprobs"][:-1]
    path = _write_jsonl(tmp_path / "cands.jsonl", [good, short, {"prompt_id": "p"}])
    assert ingest.detect_format(path) == "candidates"
    reader = ingest.Reader(
        path, "candidates", ingest.IngestOptions(temperature=1.0), None, lambda: oss_bytes
    )
    (line, raw), (line2, raw2), (line3, raw3) = ingest.iter_lines(path)
    c = reader.candidates(line, raw)[0]
    assert (c.prompt_id, c.candidate, c.temperature) == ("p", 3, 1.0)
    # offsets were absent: recomputed from the gpt-oss ids, markers empty, tags uncovered
    assert len(c.teacher.offsets) == len(ids)
    think = RESPONSE[len("<think>\n") : RESPONSE.index("\n</think>")]
    answer = RESPONSE[RESPONSE.index("</think>\n\n") + len("</think>\n\n") :]
    assert "".join(RESPONSE[a:b] for a, b in _cut_at_next_start(c.teacher.offsets)) == (
        think + answer
    )
    with pytest.raises(BadRow, match=r"cands\.jsonl:2: logprobs has \d+ entries, token_ids"):
        reader.candidates(line2, raw2)
    with pytest.raises(BadRow, match=r"cands\.jsonl:3: missing field 'prompt'"):
        reader.candidates(line3, raw3)
