"""`SampleConfig`: the `sample.*` section of the typed config (docs/sample.md).

Consumes nothing; produces the frozen dataclasses that `dasd_jax.config.Config.sample` holds.
The teacher's folder and dtypes are `teacher.*` (a `config.ModelConfig`), the seed is the
top-level `seed`. Each value is checked here so that a bad one fails when the config loads,
naming its key, before any model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PROMPT_FORMATS = ("auto", "chatml", "harmony")


@dataclass(frozen=True)
class OpenAIConfig:
    """An OpenAI-compatible teacher server (vLLM, SGLang, tpu-inference): backend=openai."""

    base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""  # the served model's name ("" = the server's first model)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key; "" = none
    api: str = "completions"  # completions (our rendered prompt, raw tokens) | chat
    tokenizer: str = ""  # the teacher's tokenizer folder; "" = teacher.path
    max_concurrency: int = 16  # requests in flight
    timeout_s: float = 600.0  # per request
    max_retries: int = 6  # on connection errors, 408, 409, 429 and 5xx
    backoff_s: float = 1.0  # first retry delay; doubles, with jitter
    max_backoff_s: float = 60.0
    top_logprobs: int = 0  # alternatives per token, kept in meta (0 = none)
    # The key goes in a header: over plain http to another machine anyone on the path reads
    # it. Refused unless the server is this machine (loopback) or this is set.
    allow_plain_http_key: bool = False

    def __post_init__(self) -> None:
        if self.api not in ("completions", "chat"):
            raise ValueError(f"sample.openai.api must be completions or chat, got {self.api!r}")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.top_logprobs < 0:
            raise ValueError(
                "sample.openai: max_concurrency >= 1, max_retries >= 0, top_logprobs >= 0"
            )
        if not (self.timeout_s > 0 and self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError("sample.openai: timeout_s > 0, backoff_s and max_backoff_s >= 0")


@dataclass(frozen=True)
class SampleConfig:
    """The `sample` stage: n teacher responses per prompt at each temperature."""

    input: str = ""  # JSONL of prompts; "" = the embedded demo prompts
    id_field: str = "uuid"  # prompt id; rows without one get a hash of the prompt
    prompt_field: str = "input"
    domain_field: str = "domain"  # copied to Candidate.domain when present
    answer_field: str = ""  # copied to Candidate.reference_answer; "" = none
    system_prompt: str = "You are a helpful assistant."  # "" = no system/developer message
    prompt_format: str = "auto"  # auto (gpt_oss -> harmony, else chatml) | chatml | harmony
    reasoning_effort: str = "high"  # harmony system message (gpt-oss teachers)
    temperatures: tuple[float, ...] = (0.6, 1.0)  # the paper's low and high T; 0 = greedy
    n: int = 4  # candidates per prompt and temperature (the paper does not say)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 32768  # generated tokens per candidate
    stop: tuple[str, ...] = ()  # stop strings (EOS ids come from the checkpoint)
    # harmony: take a final message's <|end|> as its <|return|> and drop what follows (exact:
    # the kept text and log-probs are what the teacher wrote); false rejects such samples
    harmony_repair: bool = True
    # the stage fails (its files all written) when more of the samples than this are refused
    # (malformed harmony, text not in NFC): a teacher that mostly writes malformed output has
    # the wrong prompt format or stop tokens. The refused samples are in the rejects files.
    max_refused_fraction: float = 0.5
    backend: str = "engine"  # engine (our JAX engine) | openai (an external server)
    # engine sizes (docs/sample.md: KV cache memory = slots x cache length x per-token bytes)
    slots: int = 64  # concurrent decodes
    max_prefill_length: int = 4096  # longest prompt (tokens); a power of two >= 16
    prefill_chunk: int = 1024
    decode_steps: int = 8  # decode steps per host round trip
    cache_dtype: str = ""  # "" = teacher.dtype
    # output
    prompts_per_shard: int = 64  # prompts per output shard (the unit of a finished file)
    on_bad_row: str = ""  # "" = bad_rows.on_bad_row | error | skip (bad prompts to rejects)
    progress_every_s: float = 10.0
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)

    def __post_init__(self) -> None:
        choices = {
            "prompt_format": PROMPT_FORMATS,
            "on_bad_row": ("", "error", "skip"),
            "backend": ("engine", "openai"),
            "reasoning_effort": ("low", "medium", "high"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"sample.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not self.temperatures:
            raise ValueError("sample.temperatures is empty")
        for t in self.temperatures:
            if not math.isfinite(t) or t < 0:
                raise ValueError(
                    f"sample.temperatures: {t!r} is not a finite number >= 0 (0 = greedy)"
                )
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"sample.temperatures has duplicates: {self.temperatures}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"sample.top_p must be in (0, 1], got {self.top_p}")
        for name in (
            "n",
            "max_tokens",
            "slots",
            "prefill_chunk",
            "decode_steps",
            "prompts_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.max_refused_fraction) and 0 <= self.max_refused_fraction <= 1):
            raise ValueError(
                f"sample.max_refused_fraction must be in [0, 1], got {self.max_refused_fraction}"
            )
        if self.top_k < 0:
            raise ValueError(f"sample.top_k must be >= 0 (0 = off), got {self.top_k}")
        p = self.max_prefill_length
        if p < 16 or p & (p - 1):
            raise ValueError(f"sample.max_prefill_length must be a power of two >= 16, got {p}")
        if any(not s for s in self.stop):
            raise ValueError("sample.stop: stop strings must be non-empty")
