"""A minimal OpenAI-compatible HTTP server over our engine, on the loopback interface only.

Consumes a `stage.TeacherSampler` (engine, tokenizer, chat format) and serves, on
127.0.0.1 (or another loopback address; nothing else is accepted), with the standard library's
`http.server`:
- `GET /v1/models`;
- `POST /v1/completions`: `prompt` (text or token ids), `max_tokens`, `temperature`, `top_p`,
  `top_k` (vLLM's extension), `seed`, `n`, `stop`, `logprobs` (int), vLLM's
  `return_tokens_as_token_ids`;
- `POST /v1/chat/completions`: `messages` (an optional system message and one user message,
  rendered with the teacher's chat format), `logprobs` (bool), `top_logprobs`, same sampling
  fields.
Log-probs are the model's own (T=1), as vLLM's default `raw_logprobs`; each choice also
carries a non-standard `dasd` object with the sampling-distribution log-probs and the stop
reason, which `openai_client` keeps when present. Alternatives (`top_logprobs`) are not
computed: their lists are empty.

All requests feed one serving thread that runs the continuous-batching driver
(`driver.RequestQueue`), so concurrent HTTP requests share decode slots. Bounded: request
bodies (`max_body_bytes`), requests in flight (`max_inflight`, else 503 with Retry-After),
`n`, and `max_tokens` (the engine's decode budget). Bad requests get 400 with an OpenAI error
object naming the problem. Meant for tests and demos (`fail_first` makes the first k POSTs
answer 503, to exercise a client's retries), not production serving.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dasd_jax.sample.driver import Completion, Driver, Request, RequestQueue
from dasd_jax.sample.sampling import MAX_SEED, SamplingParams
from dasd_jax.sample.text import render_prompt

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    pass


class EngineServer:
    """`start()` returns the base URL (`http://127.0.0.1:PORT/v1`); `stop()` shuts down."""

    def __init__(
        self,
        sampler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        model_name: str = "dasd-teacher",
        max_body_bytes: int = 1 << 20,
        max_inflight: int = 64,
        max_n: int = 16,
        timeout_s: float = 600.0,
        fail_first: int = 0,
    ):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host} is not a loopback address: this server is for local use")
        self.sampler = sampler
        self.model_name = model_name
        self.max_body_bytes, self.max_n, self.timeout_s = max_body_bytes, max_n, timeout_s
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._fail = itertools.count()
        self.fail_first = fail_first
        self.posts = 0
        self.max_seen_inflight = 0
        self._inflight = 0
        self._lock = threading.Lock()
        self._queue = RequestQueue()
        self._waiters: dict[int, queue.Queue] = {}
        self._ids = itertools.count()
        self._http = ThreadingHTTPServer((host, port), self._handler_class())
        self._http.daemon_threads = True
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None

    @property
    def base_url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> str:
        self._threads = [
            threading.Thread(target=self._serve_engine, daemon=True),
            threading.Thread(target=self._http.serve_forever, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self.base_url

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._queue.close()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> EngineServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the serving thread

    def _serve_engine(self) -> None:
        driver = Driver(self.sampler.engine, self.sampler.token_text)
        try:
            for c in driver.run(self._queue):
                w = self._waiters.get(c.request_id)
                if w is not None:
                    w.put(c)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            log.exception("serving loop failed")
            self.error = e
            for w in list(self._waiters.values()):
                w.put(e)

    def _generate(self, tokens: list[int], samples: list[SamplingParams]) -> list[Completion]:
        if self.error is not None:
            raise RuntimeError(f"the serving loop failed: {self.error}")
        rid = next(self._ids)
        box: queue.Queue = queue.Queue()
        self._waiters[rid] = box
        try:
            self._queue.put(Request(rid, tokens, samples))
            out = []
            deadline = time.monotonic() + self.timeout_s
            while len(out) < len(samples):
                got = box.get(timeout=max(deadline - time.monotonic(), 0.001))
                if isinstance(got, BaseException):
                    raise RuntimeError(f"the serving loop failed: {got}")
                out.append(got)
            return sorted(out, key=lambda c: c.index)
        finally:
            del self._waiters[rid]

    # ---- request parsing

    def _sampling(self, body: dict, n_prompt: int) -> list[SamplingParams]:
        eng = self.sampler.engine
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= self.max_n:
            raise BadRequest(f"n must be an integer in [1, {self.max_n}], got {n!r}")
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        limit = min(eng.config.max_decode_length, eng.cache_length - max(n_prompt - 1, 0))
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", min(16, limit)))
        if isinstance(max_tokens, int) and max_tokens > limit:
            raise BadRequest(f"max_tokens {max_tokens} exceeds this server's limit {limit}")
        seed = body.get("seed")
        base = 0 if seed is None else seed
        if not isinstance(base, int) or isinstance(base, bool):
            raise BadRequest(f"seed must be an integer, got {seed!r}")
        try:
            # choice i of a request with seed s uses seed s + i (n = 1: s itself)
            return [
                SamplingParams(
                    temperature=body.get("temperature", 1.0),
                    top_p=body.get("top_p", 1.0),
                    top_k=body.get("top_k", 0) or 0,
                    seed=(base + i) % MAX_SEED,
                    max_tokens=max_tokens,
                    stop=stop,
                )
                for i in range(n)
            ]
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _prompt_tokens(self, prompt: Any) -> list[int]:
        s = self.sampler
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = list(s.tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            tokens = list(prompt)
        else:
            raise BadRequest("prompt must be a string or a list of token ids (one prompt)")
        try:
            s.engine.validate_prompt(len(tokens))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return tokens

    def _chat_tokens(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        system, user = None, None
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs a string content")
            if m.get("role") in ("system", "developer") and user is None:
                system = m["content"]
            elif m.get("role") == "user" and user is None:
                user = m["content"]
            else:
                raise BadRequest(
                    "only an optional system message and one user message are supported"
                )
        if user is None or not user.strip():
            raise BadRequest("empty prompt: no user message content")
        s = self.sampler
        text = render_prompt(user, s.format, system, s.sc.reasoning_effort)
        return self._prompt_tokens(text)

    # ---- responses

    def _token_strings(self, c: Completion, as_ids: bool) -> list[str]:
        if as_ids:
            return [f"token_id:{t}" for t in c.token_ids]
        # Token spans share a character split across tokens (the byte rule); OpenAI's token
        # strings concatenate to the text, so each character goes to the last token holding
        # its bytes: a span runs to the next token's start.
        starts = [a for a, _ in c.offsets] + [len(c.text)]
        return [c.text[a:b] for a, b in itertools.pairwise(starts)]

    def _dasd(self, c: Completion) -> dict:
        return {"sampling_logprobs": c.sampling_logprobs, "stop": c.stop, "token_ids": c.token_ids}

    def completions(self, body: dict) -> dict:
        tokens = self._prompt_tokens(body.get("prompt"))
        if body.get("echo"):
            raise BadRequest("echo is not supported")
        cs = self._generate(tokens, self._sampling(body, len(tokens)))
        want = body.get("logprobs")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choices = []
        for c in cs:
            ch = {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop,
                "logprobs": None,
                "dasd": self._dasd(c),
            }
            if want is not None and want is not False:
                ch["logprobs"] = {
                    "tokens": self._token_strings(c, as_ids),
                    "token_logprobs": c.logprobs,
                    "top_logprobs": [{} for _ in c.token_ids],
                    "text_offset": [a for a, _ in c.offsets],
                }
            choices.append(ch)
        return self._envelope("text_completion", choices, len(tokens), cs)

    def chat(self, body: dict) -> dict:
        tokens = self._chat_tokens(body.get("messages"))
        cs = self._generate(tokens, self._sampling(body, len(tokens)))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        tt = self.sampler.token_text
        choices = []
        for c in cs:
            lp = None
            if body.get("logprobs"):
                names = self._token_strings(c, as_ids)
                lp = {
                    "content": [
                        {
                            "token": name,
                            "logprob": x,
                            "bytes": list(tt.bytes_of(t)),
                            "top_logprobs": [],
                        }
                        for name, x, t in zip(names, c.logprobs, c.token_ids, strict=True)
                    ]
                }
            choices.append(
                {
                    "index": c.index,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop,
                    "logprobs": lp,
                    "dasd": self._dasd(c),
                    "message": {"role": "assistant", "content": c.text},
                }
            )
        return self._envelope("chat.completion", choices, len(tokens), cs)

    def _envelope(self, obj: str, choices: list, n_prompt: int, cs: list[Completion]) -> dict:
        done = sum(len(c.token_ids) for c in cs)
        return {
            "id": f"dasd-{next(self._ids)}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": done,
                "total_tokens": n_prompt + done,
            },
        }

    # ---- HTTP

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # requests are logged at debug level only
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, message: str, kind: str, headers=None) -> None:
                self._send(
                    code, {"error": {"message": message, "type": kind, "code": code}}, headers
                )

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {"id": server.model_name, "object": "model", "owned_by": "dasd_jax"}
                            ],
                        },
                    )
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self):
                routes = {
                    "/v1/completions": server.completions,
                    "/v1/chat/completions": server.chat,
                }
                route = routes.get(self.path.rstrip("/"))
                size = int(self.headers.get("Content-Length") or 0)
                if size > server.max_body_bytes:
                    self.close_connection = True
                    return self._error(
                        413,
                        f"body of {size} bytes > {server.max_body_bytes}",
                        "invalid_request_error",
                    )
                raw = self.rfile.read(size)
                if route is None:
                    return self._error(404, f"no route {self.path}", "not_found")
                with server._lock:
                    server.posts += 1
                    fail = server.posts <= server.fail_first
                if fail:
                    return self._error(
                        503, "injected failure (fail_first)", "server_error", {"Retry-After": "0"}
                    )
                if not server._slots.acquire(blocking=False):
                    return self._error(
                        503, "too many requests in flight", "server_error", {"Retry-After": "1"}
                    )
                try:
                    with server._lock:
                        server._inflight += 1
                        server.max_seen_inflight = max(server.max_seen_inflight, server._inflight)
                    body = json.loads(raw or b"{}")
                    if not isinstance(body, dict):
                        raise BadRequest("the body must be a JSON object")
                    self._send(200, route(body))
                except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._error(400, str(e), "invalid_request_error")
                except Exception as e:  # noqa: BLE001 - an error response, not a dead thread
                    log.exception("request failed")
                    self._error(500, f"{type(e).__name__}: {e}", "server_error")
                finally:
                    with server._lock:
                        server._inflight -= 1
                    server._slots.release()

        return Handler
