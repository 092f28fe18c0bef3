"""A misbehaving teacher behind a real OpenAI-compatible HTTP server on 127.0.0.1: it writes
every malformed harmony form (and well-formed ones beside them), some with the EOS token in
its token list and some without (as vLLM reports it in `stop_reason`). The sample stage must
finish with balanced counts, put each malformed completion in its rejects with its reason and
its whole completion, and write only candidates that the score stage accepts."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from harmony_forms import GENERATED

from dasd_jax import score, tokenizer
from dasd_jax.config import load_config
from dasd_jax.models import harmony as hm
from dasd_jax.records import TooManyBadRows
from dasd_jax.sample import openai_client
from dasd_jax.sample.text import TokenText

# the forms a sampler can produce: a repair=False row needs sample.harmony_repair=false
FORMS = [(t, e, r) for t, e, rep, r in GENERATED if rep]
NO_REPAIR = [(t, e, r) for t, e, rep, r in GENERATED if not rep]


class ScriptedTeacher:
    """`POST /v1/completions` answers the prompt that asks for `case-K` with FORMS[K]'s
    tokens (ids as vLLM's `token_id:N` strings, T=1 log-probs, finish and stop reasons)."""

    def __init__(self, forms, token_text: TokenText):
        self.forms, self.tt = forms, token_text
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()

    def choice(self, k: int) -> dict:
        text, ended, _ = self.forms[k]
        ids = list(self.tt.tokenizer.encode(text, add_special_tokens=False))
        stop_reason = None
        if ended and ended.startswith("<|"):
            eos = hm.TOKEN_IDS[ended]
            if k % 2:  # half the answers list the EOS token, half name it in stop_reason
                ids.append(eos)
            else:
                stop_reason = eos
        return {
            "index": 0,
            "text": self.tt.text(ids)[0],
            "logprobs": {
                "tokens": [f"token_id:{i}" for i in ids],
                "token_logprobs": [-0.5] * len(ids),
            },
            "finish_reason": "length" if ended == "" else "stop",
            "stop_reason": stop_reason,
        }

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "misbehaving", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                k = int(re.search(r"case-(\d+)", body["prompt"]).group(1))
                self._send({"object": "text_completion", "choices": [teacher.choice(k)]})

        return Handler


@pytest.fixture(scope="module")
def gpt_oss_folder(tmp_path_factory):
    return tokenizer.build_gpt_oss_tokenizer(tmp_path_factory.mktemp("tok"))


def _sample(tmp: Path, forms, tok_folder, *extra) -> tuple[dict, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"uuid": f"p{k}", "input": f"case-{k}"}) + "\n" for k in range(len(forms))
        )
    )
    teacher = ScriptedTeacher(forms, TokenText(tokenizer.load_tokenizer(tok_folder)))
    with teacher as url:
        cfg = load_config(
            None,
            [
                f"run_dir={tmp / 'run'}",
                f"sample.input={prompts}",
                "sample.backend=openai",
                f"sample.openai.base_url={url}",
                f"sample.openai.tokenizer={tok_folder}",
                "sample.openai.api_key_env=",
                "sample.prompt_format=harmony",
                "sample.temperatures=[1.0]",
                "sample.n=1",
                "sample.prompts_per_shard=8",
                *extra,
            ],
        )
        return openai_client.run(cfg), tmp / "run"


def _rejects(run: Path) -> list[dict]:
    rows = []
    for f in sorted((run / "sample").glob("t*/rejects.part-*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines()]
    return rows


def test_every_malformed_form_is_a_counted_reject_and_score_accepts_the_rest(
    tmp_path, gpt_oss_folder
):
    # most of these forms are malformed: above sample.max_refused_fraction (0.5), the stage
    # writes every file, then fails naming the count, the top reasons and the rejects
    with pytest.raises(
        TooManyBadRows,
        match=r"sample: 2\d of 2\d samples are refused.*"
        r"sample.max_refused_fraction=0.5\); top reasons: .*rejects",
    ):
        _sample(tmp_path / "strict", FORMS, gpt_oss_folder)
    assert (tmp_path / "strict" / "run" / "sample" / "report.md").exists()
    summary, run = _sample(tmp_path, FORMS, gpt_oss_folder, "sample.max_refused_fraction=1")
    c = summary["counts"]
    n_bad = sum(r is not None for *_, r in FORMS)
    assert c == {
        "in": len(FORMS),
        "out": len(FORMS),
        "rejected": 0,
        "samples": len(FORMS),
        "candidates": len(FORMS) - n_bad,
        "candidates_rejected": n_bad,
    }
    rejects = _rejects(run)
    assert len(rejects) == n_bad
    for r in rejects:  # each malformed completion, with its reason and the whole completion
        k = int(r["prompt_id"].removeprefix("p"))
        text, _, reason = FORMS[k]
        assert r["reason"] == reason, (k, r["meta"]["harmony"])
        assert r["completion"]["text"].startswith(text)
        assert len(r["completion"]["token_ids"]) == len(r["completion"]["logprobs"])
    assert Counter(r["reason"] for r in rejects) == Counter(r for *_, r in FORMS if r)
    assert summary["candidate_reject_reasons"] == dict(Counter(r for *_, r in FORMS if r))
    report = (run / "sample" / "report.md").read_text()
    for reason in summary["candidate_reject_reasons"]:
        assert f"`{reason}`" in report
    # the invariant: every candidate the sample stage writes, the score stage accepts
    scored = score.run(
        load_config(
            None,
            [
                f"run_dir={run}",
                f"score.input={run / 'sample'}",
                "score.on_bad_row=error",
                f"score.teacher_tokenizer={gpt_oss_folder}",
            ],
        )
    )
    assert scored["counts"] == {"in": c["candidates"], "out": c["candidates"], "rejected": 0}


def test_the_repair_can_be_turned_off(tmp_path, gpt_oss_folder):
    """A final message ended by <|end|> (then text, or nothing): refused with
    sample.harmony_repair=false, cut exactly after that <|end|> by default."""
    forms = NO_REPAIR + [("<|channel|>final<|message|>4<|end|>", None, None)]
    off = ("sample.harmony_repair=false", "sample.max_refused_fraction=1")
    summary, _ = _sample(tmp_path / "off", forms, gpt_oss_folder, *off)
    assert summary["candidate_reject_reasons"] == {"end_instead_of_return": len(forms)}
    summary, run = _sample(tmp_path / "on", forms, gpt_oss_folder)
    assert summary["counts"]["candidates"] == len(forms)
    assert summary["harmony_repairs"] == {hm.REPAIR_FINAL_END: len(forms)}
    for f in (run / "sample").glob("t*/part-*.jsonl"):
        for c in map(json.loads, f.read_text().splitlines()):
            assert c["teacher"]["token_ids"][-1] == hm.TOKEN_IDS[hm.END]  # the last one kept
            assert c["finish_reason"] == "stop"
            assert c["meta"]["harmony"]["repair"] == hm.REPAIR_FINAL_END
