"""External teachers: the `sample` stage against an OpenAI-compatible server (vLLM, SGLang,
tpu-inference), because a 120B teacher is often served that way.

Consumes the stage's config with `sample.backend=openai` and `sample.openai.*` (base URL,
model, API style, concurrency, retries) and the prompts JSONL; produces exactly the engine
backend's files (`shards.run_shards`: Candidate shards per temperature, journals, rejects,
summary), so runs are resumable the same way and later stages cannot tell the backends apart.

Each candidate is one request with `n=1` and the candidate's own seed
(`shards.candidate_seed`), so a candidate is reproducible and resumable on its own, and a
server that honours seeds returns what our engine would. Requests ask for `logprobs` (the
model's log-probs of the sampled tokens; vLLM's default is the raw T=1 distribution) and, as
vLLM extensions, `return_tokens_as_token_ids` and `skip_special_tokens=false` (harmony
channel markers must survive into the text).

- `api=completions` (default): the prompt is rendered here in the teacher's chat format
  (`text.render_prompt`), so tokens in and out are raw and the harmony -> `<think>` mapping is
  ours, as with the engine.
- `api=chat`: the server renders `messages`; token bytes come from `logprobs.content[].bytes`.
Token ids come from `token_id:N` tokens, else (with the teacher's tokenizer) from token bytes.
With the teacher's tokenizer (`sample.openai.tokenizer` or `teacher.path`), the text and
offsets are rebuilt from the ids exactly as for the engine.

Requests in flight are bounded (`max_concurrency` worker threads, prompts read lazily);
connection errors, timeouts, 408, 409, 429 and 5xx are retried with exponential backoff and
jitter (honouring `Retry-After`), up to `max_retries`; then the run stops (a restart resumes).
Any other 4xx (e.g. a prompt too long for the server) rejects that prompt with the server's
message as reason.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ipaddress
import json
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dasd_jax.config import Config
from dasd_jax.progress import Progress
from dasd_jax.sample.config import OpenAIConfig
from dasd_jax.sample.shards import Job, Rejected, make_candidate, run_shards
from dasd_jax.sample.text import (
    Mapped,
    TokenText,
    cut_at,
    ended_by,
    map_response,
    render_prompt,
    text_of_pieces,
)
from dasd_jax.schema import Candidate

log = logging.getLogger(__name__)

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class ServerError(RuntimeError):
    """A non-retryable answer (4xx) or retries exhausted; `status` is the HTTP code."""

    def __init__(self, status: int | None, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}" if status else message)


def check_key_transport(base_url: str, key_env: str, allowed: bool) -> None:
    """Refuse to send an API key in clear text to another machine: http:// is fine to a
    loopback server (the key never leaves the host), https:// anywhere."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme == "https" or allowed:
        return
    host = (parts.hostname or "").lower()
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if parts.scheme == "http" and loopback:
        return
    raise ValueError(
        f"sample.openai.base_url={base_url}: ${key_env} is set and would be sent in clear text "
        f"over {parts.scheme or 'an unknown scheme'} to {host or 'an unknown host'}; use "
        f"https://, a loopback URL (e.g. an SSH tunnel to 127.0.0.1), unset {key_env} (or set "
        f"sample.openai.api_key_env=''), or set sample.openai.allow_plain_http_key=true on a "
        f"network you trust"
    )


class OpenAIClient:
    """JSON POSTs with retries (standard library only)."""

    def __init__(self, cfg: OpenAIConfig):
        if not cfg.base_url:
            raise ValueError("sample.openai.base_url is empty (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.base = cfg.base_url.rstrip("/")
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.headers = {"Content-Type": "application/json"}
        if key:
            check_key_transport(self.base, cfg.api_key_env, cfg.allow_plain_http_key)
            self.headers["Authorization"] = f"Bearer {key}"
        self.retries = 0  # retried attempts, for the summary

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.cfg.max_backoff_s)
            except ValueError:
                pass
        full = min(self.cfg.backoff_s * 2**attempt, self.cfg.max_backoff_s)
        return full * random.uniform(0.5, 1.0)  # jitter: clients do not retry in lockstep

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(self.cfg.max_retries + 1):
            req = urllib.request.Request(
                self.base + path, data=data, headers=self.headers, method=method
            )
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", errors="replace")
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text[:500]
                if e.code not in RETRYABLE or attempt == self.cfg.max_retries:
                    raise ServerError(e.code, message) from None
                delay = self._delay(attempt, e.headers.get("Retry-After"))
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                if attempt == self.cfg.max_retries:
                    raise ServerError(None, f"{self.base}{path}: {e}") from None
                delay = self._delay(attempt, None)
            self.retries += 1
            log.info("retrying %s %s in %.2fs (attempt %d)", method, path, delay, attempt + 1)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def model_name(self) -> str:
        if self.cfg.model:
            return self.cfg.model
        return self.request("GET", "/models")["data"][0]["id"]


def _token_id(token: str) -> int | None:
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token.split(":", 1)[1])
    return None


class OpenAIBackend:
    """The stage's backend (see `shards.run_shards`) over an OpenAI-compatible server."""

    name = "openai"

    def __init__(self, cfg: Config):
        sc = self.sc = cfg.sample
        self.oc = sc.openai
        self.client = OpenAIClient(self.oc)
        self.model = self.client.model_name()
        folder = self.oc.tokenizer or cfg.teacher.path
        self.token_text: TokenText | None = None
        model_type = ""
        if folder:
            from dasd_jax import storage
            from dasd_jax.tokenizer import load_tokenizer

            # a gs:// folder: its tokenizer and config files only, copied to the local cache
            folder = storage.download_dir(folder, skip=("*.safetensors", "*.bin", "*.pt"))
            self.token_text = TokenText(load_tokenizer(folder))
            cfg_json = Path(folder) / "config.json"
            if cfg_json.exists():
                model_type = json.loads(cfg_json.read_text()).get("model_type", "")
        fmt = sc.prompt_format
        self.format = ("harmony" if model_type == "gpt_oss" else "chatml") if fmt == "auto" else fmt
        if self.oc.api == "completions" and self.token_text is None:
            log.warning(
                "no teacher tokenizer (sample.openai.tokenizer / teacher.path): token "
                "ids must come from the server (return_tokens_as_token_ids)"
            )

    # ---- the backend interface

    def prepare(self, prompt: Any) -> tuple[Any, str | None]:
        if not isinstance(prompt, str):
            return None, f"field {self.sc.prompt_field!r} should be a string"
        if not prompt.strip():
            return None, "empty_prompt"
        if self.oc.api == "chat":
            msgs = (
                [{"role": "system", "content": self.sc.system_prompt}]
                if self.sc.system_prompt
                else []
            )
            return msgs + [{"role": "user", "content": prompt}], None
        return render_prompt(
            prompt, self.format, self.sc.system_prompt, self.sc.reasoning_effort
        ), None

    def occupancy(self) -> None:
        return None

    def stream(
        self, jobs: Iterator[Job], progress: Progress | None = None
    ) -> Iterator[tuple[Job, int, Candidate | Rejected | str]]:
        """Requests for every candidate of every job, at most `max_concurrency` in flight."""
        window = self.oc.max_concurrency
        tasks = ((job, i) for job in jobs for i in range(len(job.seeds)))
        with cf.ThreadPoolExecutor(max_workers=window) as pool:
            running: dict[cf.Future, tuple[Job, int]] = {}

            def submit(n: int) -> None:
                for job, i in tasks:
                    running[pool.submit(self._one, job, i)] = (job, i)
                    if len(running) >= n:
                        return

            submit(window)
            while running:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job, i = running.pop(fut)
                    got = fut.result()  # retries exhausted: the run stops, a restart resumes
                    if progress is not None:
                        n = len(got.teacher.token_ids) if isinstance(got, Candidate) else 0
                        progress.update(1, n)
                    yield job, i, got
                submit(window)

    # ---- one candidate

    def _body(self, job: Job, i: int) -> tuple[str, dict]:
        sc = self.sc
        body: dict[str, Any] = {
            "model": self.model,
            "n": 1,
            "seed": job.seeds[i],
            "temperature": job.temperature,
            "top_p": sc.top_p,
            "max_tokens": sc.max_tokens,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if sc.top_k:
            body["top_k"] = sc.top_k
        if sc.stop:
            body["stop"] = list(sc.stop)
        if self.oc.api == "chat":
            body.update(messages=job.payload, logprobs=True)
            if self.oc.top_logprobs:
                body["top_logprobs"] = self.oc.top_logprobs
            return "/chat/completions", body
        body.update(prompt=job.payload, logprobs=max(1, self.oc.top_logprobs))
        return "/completions", body

    def _one(self, job: Job, i: int) -> Candidate | Rejected | str:
        path, body = self._body(job, i)
        try:
            resp = self.client.request("POST", path, body)
        except ServerError as e:
            if e.status is not None and 400 <= e.status < 500 and e.status not in RETRYABLE:
                return f"server: {e}"
            raise
        return self.candidate(job, i, resp["choices"][0])

    def candidate(self, job: Job, i: int, ch: dict) -> Candidate | Rejected:
        lp = ch.get("logprobs") or {}
        if self.oc.api == "chat":
            items = lp.get("content") or []
            tokens = [x.get("token") for x in items]
            logprobs = [float(x["logprob"]) for x in items]
            pieces = [bytes(x["bytes"]) if x.get("bytes") is not None else None for x in items]
            tops = [x.get("top_logprobs") for x in items]
            server_text = (ch.get("message") or {}).get("content") or ""
        else:
            tokens = lp.get("tokens") or []
            logprobs = [float(x) for x in lp.get("token_logprobs") or []]
            pieces = [None] * len(tokens)
            tops = lp.get("top_logprobs") or [None] * len(tokens)
            server_text = ch.get("text") or ""
        ids = [_token_id(t) for t in tokens]
        tt = self.token_text
        for k, t in enumerate(ids):
            if t is None and tt is not None:
                piece = pieces[k] if pieces[k] is not None else tokens[k].encode("utf-8")
                ids[k] = tt.id_of_bytes(piece)
        if any(t is None for t in ids):
            raise ServerError(
                None,
                "the server's log-probs do not identify token ids: serve "
                "with vLLM (return_tokens_as_token_ids) or set "
                "sample.openai.tokenizer to the teacher's tokenizer folder",
            )
        if tt is not None:
            raw, offsets = tt.text(ids)
        else:
            raw, offsets = text_of_pieces(
                [
                    p if p is not None else t.encode("utf-8")
                    for p, t in zip(pieces, tokens, strict=True)
                ]
            )
        dasd = ch.get("dasd") or {}
        sampling = dasd.get("sampling_logprobs")
        if server_text != raw and raw.startswith(server_text):
            # the server cut its text before a stop string: keep the tokens that start before
            # the cut, as the engine does
            raw, offsets, n = cut_at(raw, offsets, len(server_text))
            ids, logprobs, tops = ids[:n], logprobs[:n], tops[:n]
        fmt = "harmony" if self.format == "harmony" else "chatml"
        finish, stop = ch.get("finish_reason"), ch.get("stop_reason", dasd.get("stop"))
        if tt is not None:
            mapped = map_response(
                raw,
                ids,
                offsets,
                tt,
                fmt,
                ended_by(finish or "", stop, tt),
                self.sc.harmony_repair,
            )
        else:
            mapped = Mapped(raw, offsets, len(ids))
        if sampling is not None and len(sampling) != len(ids):
            sampling = None
        meta: dict[str, Any] = {
            "seed": job.seeds[i],
            "line": job.key[2],
            "stop": stop,
            "prompt_format": self.format,
            "top_p": self.sc.top_p,
            "top_k": self.sc.top_k,
            "backend": "openai",
            "server_model": self.model,
        }
        if self.oc.top_logprobs and any(tops):
            meta["top_logprobs"] = tops[: len(ids)]
        return make_candidate(
            mapped,
            prompt_id=job.prompt_id,
            index=i,
            prompt=job.prompt,
            temperature=job.temperature,
            finish_reason=finish,
            raw=raw,
            ids=ids,
            logprobs=logprobs,
            sampling_logprobs=sampling,
            model=self.model,
            tokenizer=self.oc.tokenizer or self.model,
            meta=meta,
        )


def run(cfg: Config) -> dict:
    """The sample stage against `sample.openai.base_url`; the engine stage's files."""
    from dasd_jax import embedded, storage

    backend = OpenAIBackend(cfg)
    if storage.is_remote(cfg.sample.input):
        data: str | Path = cfg.sample.input
    elif cfg.sample.input:
        data = Path(cfg.sample.input)
    else:  # a gs:// run_dir: the demo prompts go to its local mirror
        inputs = storage.local_dir(storage.join(cfg.run_dir, "inputs"))
        data = embedded.write_demo_rows(Path(inputs) / "demo_prompts.jsonl")
    summary = run_shards(cfg, backend, data, backend.model)
    summary["retries"] = backend.client.retries
    return summary
