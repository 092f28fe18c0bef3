"""External-teacher client against our engine behind a real OpenAI-compatible HTTP server on
127.0.0.1: same candidates as the engine stage, retries, bounded concurrency, resume."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dasd_jax import embedded
from dasd_jax.config import load_config
from dasd_jax.sample import openai_client, stage
from dasd_jax.sample.openai_server import EngineServer
from dasd_jax.schema import Candidate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    teacher = embedded.tiny_random_teacher(tmp / "cache")  # random tiny Qwen3
    rows = embedded.demo_rows()[:3]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, teacher, data


def _overrides(run_dir, teacher, data, *extra):
    return [
        f"run_dir={run_dir}",
        f"teacher.path={teacher}",
        f"sample.input={data}",
        "teacher.dtype=float32",
        "teacher.attention=xla",
        "mesh.data=1",
        "sample.n=2",
        "sample.slots=4",
        "sample.max_tokens=8",
        "sample.max_prefill_length=64",
        "sample.prompts_per_shard=2",
        "sample.decode_steps=4",
        'sample.stop=["\\n"]',
        *extra,
    ]


def _candidates(folder):
    out = {}
    for f in sorted(Path(folder).rglob("part-*.jsonl")):
        for raw in f.read_text().splitlines():
            c = Candidate.from_dict(json.loads(raw))
            out[(c.temperature, c.prompt_id, c.candidate)] = c
    return out


def _same(a: Candidate, b: Candidate):
    assert a.response == b.response and a.finish_reason == b.finish_reason
    assert a.teacher.token_ids == b.teacher.token_ids
    assert [tuple(o) for o in a.teacher.offsets] == [tuple(o) for o in b.teacher.offsets]
    np.testing.assert_allclose(a.teacher.logprobs, b.teacher.logprobs, atol=1e-4)
    np.testing.assert_allclose(a.teacher.sampling_logprobs, b.teacher.sampling_logprobs, atol=1e-4)
    assert a.meta["seed"] == b.meta["seed"] and a.meta["stop"] == b.meta["stop"]


def test_client_through_a_local_server_equals_the_engine_stage(setup):
    tmp, teacher, data = setup
    engine = stage.run(load_config(None, _overrides(tmp / "engine", teacher, data)))
    ref = _candidates(tmp / "engine" / "sample")
    # random tokens may spell text not in NFC (e.g. a CJK compatibility ideograph): refused
    assert len(ref) + engine["candidates_rejected"] == engine["samples"] == 3 * 2 * 2
    assert set(engine["candidate_reject_reasons"]) <= {"not_nfc"}

    cfg = load_config(None, _overrides(tmp / "server", teacher, data))
    sampler = stage.TeacherSampler(teacher, cfg)
    with EngineServer(sampler, fail_first=3, max_inflight=8) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        client_args = [
            f"sample.openai.base_url={server.base_url}",
            "sample.backend=openai",
            "sample.openai.max_concurrency=3",
            "sample.openai.backoff_s=0.01",
        ]
        summary = stage.run(
            load_config(None, _overrides(tmp / "client", teacher, data, *client_args))
        )
        assert summary["retries"] == 3 and summary["backend"] == "openai"
        assert summary["counts"] == engine["counts"]  # the same samples refused
        assert server.posts == 3 + 12  # 3 injected 503s, then one request per candidate
        assert 1 <= server.max_seen_inflight <= 3  # the client's bound
        got = _candidates(tmp / "client" / "sample")
        assert got.keys() == ref.keys()
        for k in ref:
            _same(got[k], ref[k])
            assert got[k].meta["backend"] == "openai"

        # resumable like the engine stage: a rerun finds every shard done, posts nothing
        again = stage.run(
            load_config(None, _overrides(tmp / "client", teacher, data, *client_args))
        )
        assert again["shards_written"] == 0 and server.posts == 15

        # the chat API: the server renders the same chat format, so the same tokens
        chat = stage.run(
            load_config(
                None,
                _overrides(
                    tmp / "chat",
                    teacher,
                    data,
                    *client_args,
                    "sample.openai.api=chat",
                    "sample.temperatures=[1.0]",
                ),
            )
        )
        assert chat["samples"] == 6
        t1 = engine["per_temperature"]["t1"]  # the same samples as the engine's at T=1.0
        assert (
            chat["candidates"] == t1["candidates"]
            and len(_candidates(tmp / "chat")) == t1["candidates"]
        )
        for k, c in _candidates(tmp / "chat" / "sample").items():
            _same(c, ref[k])


def _post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_validates_requests_and_binds_loopback_only(setup):
    tmp, teacher, data = setup
    cfg = load_config(None, _overrides(tmp / "v", teacher, data))
    sampler = stage.TeacherSampler(teacher, cfg)
    with pytest.raises(ValueError, match="loopback"):
        EngineServer(sampler, host="0.0.0.0")
    with EngineServer(sampler, max_body_bytes=4096) as server:
        url = server.base_url
        with urllib.request.urlopen(url + "/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == "dasd-teacher"
        ok, body = _post(
            url + "/completions", {"prompt": "Hello", "max_tokens": 3, "logprobs": 1, "seed": 5}
        )
        assert ok == 200 and len(body["choices"][0]["logprobs"]["token_logprobs"]) <= 3
        for bad, match in [
            ({"prompt": "", "max_tokens": 3}, "empty prompt"),
            ({"prompt": "x " * 100, "max_tokens": 3}, "prompt_too_long"),
            ({"prompt": "Hi", "temperature": -1}, "temperature"),
            ({"prompt": "Hi", "top_p": 2}, "top_p"),
            ({"prompt": "Hi", "n": 100}, "n must be"),
            ({"prompt": "Hi", "max_tokens": 10**6}, "max_tokens"),
            ({"prompt": {"a": 1}}, "prompt must be"),
        ]:
            code, body = _post(url + "/completions", bad)
            assert code == 400 and match in body["error"]["message"], (bad, body)
        code, body = _post(
            url + "/chat/completions", {"messages": [{"role": "user", "content": " "}]}
        )
        assert code == 400 and "empty prompt" in body["error"]["message"]
        code, body = _post(url + "/completions", {"prompt": "y" * 5000})
        assert code == 413


def test_client_rejects_prompts_the_server_refuses(setup, tmp_path):
    tmp, teacher, _ = setup
    data = tmp_path / "p.jsonl"
    data.write_text(
        json.dumps({"uuid": "long", "input": "word " * 200})
        + "\n"
        + json.dumps({"uuid": "ok", "input": "Hi"})
        + "\n"
    )
    cfg = load_config(None, _overrides(tmp_path / "s", teacher, data))
    sampler = stage.TeacherSampler(teacher, cfg)
    with EngineServer(sampler) as server:
        summary = openai_client.run(
            load_config(
                None,
                _overrides(
                    tmp_path / "c",
                    teacher,
                    data,
                    f"sample.openai.base_url={server.base_url}",
                    "sample.backend=openai",
                    "sample.temperatures=[1.0]",
                    "bad_rows.max_bad_fraction=0.5",  # 1 of these 2 prompts is refused
                ),
            )
        )
    assert summary["rejects"] == 1 and summary["prompts_out"] == 1
    rej = json.loads((tmp_path / "c/sample/t1/rejects.part-000000.jsonl").read_text())
    assert rej["id"] == "long" and rej["reason"].startswith("server: HTTP 400: prompt_too_long")


def test_token_strings_concatenate_to_the_text():
    # "a" + the parrot split over two tokens + "b": both spans hold the parrot (the byte
    # rule); the OpenAI token strings give it to the token holding its last byte
    from types import SimpleNamespace

    c = SimpleNamespace(text="a🦜b", offsets=[(0, 2), (1, 2), (2, 3)], token_ids=[7, 8, 9])
    assert EngineServer._token_strings(None, c, False) == ["a", "🦜", "b"]
    assert EngineServer._token_strings(None, c, True) == ["token_id:7", "token_id:8", "token_id:9"]
