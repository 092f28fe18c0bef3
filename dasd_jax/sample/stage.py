"""The `sample` stage: n teacher responses per prompt at each temperature, with the teacher's
per-token log-probs (paper step 1), and the teacher-continuation API of the mixed-policy stage.

Consumes `sample.input`, a JSONL file of prompts (fields `sample.id_field`,
`sample.prompt_field`, optional domain and reference answer; "" = the embedded demo prompts),
and the teacher (`teacher.path`, a Hugging Face folder; "" = the embedded tiny gpt-oss teacher,
trained on the demo rows, see `embedded.tiny_teacher`).

Produces, under `<run_dir>/sample/t<T>/` for each temperature T in `sample.temperatures`:
- `part-NNNNNN.jsonl`: one `schema.Candidate` per line, `sample.n` per prompt, in input order:
  `response` in `<think>...</think>answer` form, `finish_reason` (`stop` | `length`),
  `teacher` = `TokenScores` with the sampled token ids, `logprobs` (T=1, the model's own
  distribution: DAS's p_T), `sampling_logprobs` (the distribution actually sampled from),
  `offsets` in the response; `meta` (line, seed, stop reason, prompt tokens, ...);
- `part-NNNNNN.stats.json`, `rejects.part-NNNNNN.jsonl` (`line`, `id`, `reason` of every
  prompt not sampled: malformed line, missing field, empty prompt, prompt too long);
and `sample/summary.json`, `sample/metrics.jsonl` (samples/s, tokens/s, slot occupancy, ETA).

Resuming: prompts are cut into shards of `sample.prompts_per_shard`; every finished prompt is
appended (with fsync) to the shard's journal `part-NNNNNN.journal`, and the shard's files are
written under temporary names and renamed when all its prompts are done, the part file last
(it marks the shard done), then the journal is removed. A killed run therefore loses no
finished prompt and never leaves a half-written file under a final name; a restart skips done
shards and journaled prompts (a torn last journal line is dropped) and produces the same
files as an uninterrupted run, because each candidate's seed is a hash of (seed, prompt id,
temperature, index), not of its position in the run. With several processes, process p takes
shards p, p+P, ... and runs its own engine on its local devices.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax

from dasd_jax.config import Config
from dasd_jax.progress import Progress
from dasd_jax.sample.driver import Completion, Driver, Request
from dasd_jax.sample.sampling import SamplingParams
from dasd_jax.sample.shards import (
    Job,
    Rejected,
    candidate_seed,
    make_candidate,
    prompt_id_of,
    run_shards,
)
from dasd_jax.sample.text import (
    Mapped,
    TokenText,
    ended_by,
    map_response,
    prompt_format_for,
    render_prompt,
)
from dasd_jax.schema import Candidate

log = logging.getLogger(__name__)

# Caps for a RANDOM embedded model (the embedded student, when mixed_policy or evaluate sample
# it): its EOS essentially never comes, so the demo caps the length and stops at a newline (in
# ~1.4% of Qwen3's tokens): both finish reasons occur. Its engine is sized to the demo (a CPU)
# instead of a long-CoT teacher.
EMBEDDED_DEMO = dict(max_tokens=32, stop=("\n",), slots=16, max_prefill_length=256)
# Caps for the embedded TEACHER, a tiny gpt-oss trained on the demo rows (`embedded`): it
# writes whole harmony responses and stops at <|return|>, so no stop string; max_tokens is
# ~1.3x its longest demo response (122 tokens) and the prompts (at most 86 tokens) fit 128.
EMBEDDED_TEACHER_DEMO = dict(max_tokens=160, slots=16, max_prefill_length=128)


def embedded_demo_config(cfg: Config) -> Config:
    """The demo's caps on a config whose teacher is the embedded tiny (trained) teacher."""
    sc = cfg.sample
    caps = EMBEDDED_TEACHER_DEMO
    demo = dict(
        max_tokens=min(sc.max_tokens, caps["max_tokens"]),
        slots=min(sc.slots, caps["slots"]),
        max_prefill_length=min(sc.max_prefill_length, caps["max_prefill_length"]),
    )
    log.info("embedded tiny gpt-oss teacher (trained on the demo rows): %s", demo)
    return dataclasses.replace(cfg, sample=dataclasses.replace(sc, **demo))


def resolve_inputs(cfg: Config) -> tuple[Path, str | Path]:
    """(teacher folder, prompts JSONL), materialising the embedded defaults when empty. A
    gs:// teacher folder is copied to the local cache (`storage.download_dir`: the weights
    are memory-mapped); gs:// prompts are streamed; the demo prompts of a gs:// run_dir are
    written to its local mirror."""
    from dasd_jax import embedded, storage

    teacher = (
        Path(storage.download_dir(cfg.teacher.path))
        if cfg.teacher.path
        else embedded.tiny_teacher()
    )
    if storage.is_remote(cfg.sample.input):
        data: str | Path = cfg.sample.input
    elif cfg.sample.input:
        data = Path(cfg.sample.input)
    else:
        inputs = storage.local_dir(storage.join(cfg.run_dir, "inputs"))
        data = embedded.write_demo_rows(Path(inputs) / "demo_prompts.jsonl")
    return teacher, data


class TeacherSampler:
    """The teacher, its tokenizer and chat format, and an engine: prompts in, Candidates out.

    `sample(...)` and `continue_(...)` are the library API; `run(cfg)` drives it for the stage.
    """

    def __init__(
        self, teacher_path: str | Path, cfg: Config, mesh=None, model_name: str | None = None
    ):
        from dasd_jax.models import registry
        from dasd_jax.sample.engine import Engine, EngineConfig, eos_ids_of
        from dasd_jax.sharding import make_mesh
        from dasd_jax.tokenizer import load_tokenizer

        sc = self.sc = cfg.sample
        self.path = Path(teacher_path)
        self.model_name = model_name or str(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.token_text = TokenText(self.tokenizer)
        if mesh is None:  # several processes: each samples its own shards on its own chips
            devices = jax.local_devices() if jax.process_count() > 1 else None
            mesh = make_mesh(cfg.mesh, devices=devices)
        model = registry.load(self.path, mesh, cfg.teacher.options())
        self.model_type = model.cfg.model_type
        self.format = prompt_format_for(self.model_type, sc.prompt_format)
        self.engine = Engine(
            model,
            EngineConfig(
                max_concurrent_decodes=sc.slots,
                max_prefill_length=sc.max_prefill_length,
                max_decode_length=sc.max_tokens,
                prefill_chunk=sc.prefill_chunk,
                decode_steps=sc.decode_steps,
                cache_dtype=sc.cache_dtype,
            ),
            eos_ids=eos_ids_of(self.path, model.cfg, self.tokenizer),
        )
        self.seed = cfg.seed
        self.max_tokens, self.stop = sc.max_tokens, tuple(sc.stop)

    # ---- building requests

    def encode_prompt(self, prompt: str) -> list[int]:
        text = render_prompt(prompt, self.format, self.sc.system_prompt, self.sc.reasoning_effort)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def params(
        self, temperature: float, seed: int, max_tokens: int | None = None
    ) -> SamplingParams:
        return SamplingParams(
            temperature=float(temperature),
            top_p=self.sc.top_p,
            top_k=self.sc.top_k,
            seed=seed,
            max_tokens=max_tokens or self.max_tokens,
            stop=self.stop,
        )

    def check_prompt(self, prompt: Any, tokens: list[int] | None) -> str | None:
        """The reason a prompt cannot be sampled, or None."""
        if not isinstance(prompt, str):
            return f"field {self.sc.prompt_field!r} should be a string"
        if not prompt.strip():
            return "empty_prompt"
        if tokens is not None and len(tokens) > self.engine.max_prefill_length:
            return (
                f"prompt_too_long: {len(tokens)} tokens > sample.max_prefill_length="
                f"{self.engine.max_prefill_length}"
            )
        return None

    # ---- completions -> candidates

    def candidate(
        self,
        c: Completion,
        prompt_id: str,
        prompt: str,
        temperature: float,
        extra_meta: dict | None = None,
        mapped: Mapped | None = None,
        raw: str | None = None,
    ) -> Candidate | Rejected:
        """The stage's record of one completion: a Candidate, or a Rejected with the reason
        (malformed harmony, text not in NFC), which a later stage would refuse. `mapped` /
        `raw`: the completion's mapping and raw text when the caller made them (a
        continuation maps prefix + continuation as one text)."""
        raw = (c.text or "") if raw is None else raw
        if mapped is None:
            tt = self.token_text
            ended = ended_by(c.finish_reason, c.stop, tt)
            mapped = map_response(
                raw, c.token_ids, c.offsets, tt, self.format, ended, self.sc.harmony_repair
            )
        meta = {
            "seed": c.meta.get("seeds", {}).get(c.index),
            "n_prompt_tokens": c.n_prompt_tokens,
            "stop": c.stop,
            "eos_logprob": c.eos_logprob,
            "prompt_format": self.format,
            "top_p": self.sc.top_p,
            "top_k": self.sc.top_k,
            **(extra_meta or {}),
        }
        return make_candidate(
            mapped,
            prompt_id=prompt_id,
            index=c.index,
            prompt=prompt,
            temperature=temperature,
            finish_reason=c.finish_reason,
            raw=raw,
            ids=c.token_ids,
            logprobs=c.logprobs,
            sampling_logprobs=c.sampling_logprobs,
            model=self.model_name,
            tokenizer=self.model_name,
            meta=meta,
        )

    # ---- the stage's backend interface (see `shards.run_shards`)

    name = "engine"

    def prepare(self, prompt: Any) -> tuple[Any, str | None]:
        """(prompt token ids, reason it cannot be sampled or None)."""
        tokens = self.encode_prompt(prompt) if isinstance(prompt, str) else None
        return tokens, self.check_prompt(prompt, tokens)

    def stream(
        self, jobs: Iterator[Job], progress: Progress | None = None
    ) -> Iterator[tuple[Job, int, Candidate | Rejected | str]]:
        """(job, sample index, Candidate or Rejected) as samples finish, through one
        continuous batch."""
        live: dict[Any, list] = {}

        def requests() -> Iterator[Request]:
            for job in jobs:
                live[job.key] = [job, len(job.seeds)]
                yield Request(
                    job.key,
                    job.payload,
                    [self.params(job.temperature, s) for s in job.seeds],
                    meta={"seeds": dict(enumerate(job.seeds))},
                )

        self.driver = Driver(self.engine, self.token_text, progress)
        for c in self.driver.run(requests()):
            entry = live[c.request_id]
            job = entry[0]
            entry[1] -= 1
            if entry[1] == 0:
                del live[c.request_id]
            yield (
                job,
                c.index,
                self.candidate(c, job.prompt_id, job.prompt, job.temperature, {"line": job.key[2]}),
            )

    def occupancy(self) -> float | None:
        d = getattr(self, "driver", None)
        return (
            None
            if d is None
            else round(d.slot_steps / max(d.steps * d.engine.max_concurrent_decodes, 1), 3)
        )

    # ---- library API

    def sample(
        self,
        prompts: Sequence[str],
        temperature: float,
        n: int = 1,
        prompt_ids: Sequence[str] | None = None,
    ) -> list[list[Candidate | Rejected]]:
        """n samples for each prompt (seeds from `candidate_seed`), in prompt order: each a
        Candidate, or a Rejected with its reason (malformed harmony, text not in NFC)."""
        ids = list(prompt_ids) if prompt_ids is not None else [None] * len(prompts)
        reqs = []
        for k, (p, pid) in enumerate(zip(prompts, ids, strict=True)):
            tokens = self.encode_prompt(p)
            reason = self.check_prompt(p, tokens)
            if reason:
                raise ValueError(f"prompt {k}: {reason}")
            pid = pid if pid is not None else prompt_id_of({}, "", p)
            seeds = [candidate_seed(self.seed, pid, temperature, i) for i in range(n)]
            reqs.append(
                Request(
                    (k, pid, p),
                    tokens,
                    [self.params(temperature, s) for s in seeds],
                    meta={"seeds": dict(enumerate(seeds))},
                )
            )
        out: list[list[Candidate | Rejected]] = [[] for _ in prompts]
        for c in Driver(self.engine, self.token_text).run(reqs):
            k, pid, p = c.request_id
            out[k].append(self.candidate(c, pid, p, temperature))
        for cands in out:
            cands.sort(key=lambda x: x.candidate)
        return out

    def continue_(
        self,
        prompt: str,
        prefix: str | Sequence[int],
        *,
        temperature: float,
        n: int = 1,
        seed: int | None = None,
        max_tokens: int | None = None,
        prompt_id: str | None = None,
    ) -> list[Candidate | Rejected]:
        """The teacher continues a (student's) partial response: `continue` of the
        mixed-policy stage (paper step 7); a malformed continuation is a `Rejected`.

        `prefix` is text in the data's `<think>...` form (re-tokenised by the teacher; for a
        harmony teacher mapped to its channels) or teacher token ids. Each Candidate's
        `response` is the whole text, prefix included; `meta.student_prefix_chars` says where
        the teacher's part starts, and `teacher` scores only the continuation's tokens (their
        offsets are positions in the whole response).
        """
        prompt_tokens = self.encode_prompt(prompt)
        if isinstance(prefix, str):
            prefix_raw = prefix
            if self.format == "harmony":
                from dasd_jax.select.filters import think_to_harmony

                prefix_raw = think_to_harmony(prefix).removesuffix("<|return|>")
            prefix_ids = list(self.tokenizer.encode(prefix_raw, add_special_tokens=False))
        else:
            prefix_ids = [int(i) for i in prefix]
        prefix_text, prefix_offsets = self.token_text.text(prefix_ids)
        pid = prompt_id or prompt_id_of({}, "", prompt)
        base = self.seed if seed is None else seed
        seeds = [
            candidate_seed(base, f"{pid}\x00continue\x00{len(prefix_ids)}", temperature, i)
            for i in range(n)
        ]
        req = Request(
            pid,
            prompt_tokens + prefix_ids,
            [self.params(temperature, s, max_tokens) for s in seeds],
            meta={"seeds": dict(enumerate(seeds))},
        )
        self.engine.validate_prompt(len(req.tokens))
        fmt, tt = self.format, self.token_text
        cut = len(map_response(prefix_text, prefix_ids, prefix_offsets, tt, fmt, "").response)
        out: list[Candidate | Rejected] = []
        for c in sorted(Driver(self.engine, tt).run([req]), key=lambda c: c.index):
            shift, raw = len(prefix_text), prefix_text + (c.text or "")
            whole = map_response(
                raw,
                prefix_ids + c.token_ids,
                prefix_offsets + [(s + shift, e + shift) for s, e in c.offsets or []],
                tt,
                fmt,
                ended_by(c.finish_reason, c.stop, tt),
                self.sc.harmony_repair,
            )
            n = len(prefix_ids)  # the teacher's part: its tokens and their spans in the whole
            mapped = dataclasses.replace(
                whole,
                offsets=None if whole.offsets is None else whole.offsets[n:],
                keep=max(whole.keep - n, 0),
            )
            extra = {"student_prefix_chars": cut, "prefix_tokens": n, "continuation": True}
            out.append(self.candidate(c, pid, prompt, temperature, extra, mapped, raw))
        return out


# --------------------------------------------------------------------------- the stage


def run(cfg: Config) -> dict:
    """Sample `sample.n` candidates per prompt at every temperature; returns the summary."""
    if not cfg.sample.input and not cfg.sample.answer_field:
        # the demo prompts' math rows carry their answers: the select report's Figure 6 table
        cfg = dataclasses.replace(
            cfg, sample=dataclasses.replace(cfg.sample, answer_field="answer")
        )
    if cfg.sample.backend == "openai":
        from dasd_jax.sample import openai_client

        return openai_client.run(cfg)
    if not cfg.teacher.path:
        cfg = embedded_demo_config(cfg)
    teacher_path, data_path = resolve_inputs(cfg)
    name = "embedded-tiny-teacher"
    if cfg.teacher.path:  # a gs:// teacher is named by its bucket path, not the local copy
        name = cfg.teacher.path if "://" in cfg.teacher.path else str(teacher_path)
    return run_shards(cfg, TeacherSampler(teacher_path, cfg, model_name=name), data_path, name)
