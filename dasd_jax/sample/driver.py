"""Offline continuous batching over an `Engine`: requests in, completions out as they finish.

Consumes an iterable of `Request`s (prompt token ids plus one `SamplingParams` per sample;
read lazily, so it can be a stream of millions) and produces `Completion`s: generated ids
(EOS excluded), both log-probs per token, the finish reason, and, with a tokenizer, the text
with one [start, end) span per token.

Scheduling: free slots are filled before every decode call (a prompt with n samples is
prefilled once and its prefix inserted into n slots, each with its own seed); then
`decode_steps` tokens are decoded for all slots in one jitted call. Calls are pipelined one
deep: the next call is dispatched before the previous call's tokens are read back, so host
work (detokenizing, stop strings, writing) overlaps device work. A slot freed in call i is
refilled before call i+2 at the latest; a slot stopped by a stop string is released on
device. Results never depend on the slot a request lands in or on the other requests
(`sampling.slot_keys`), so any slot count or arrival order gives the same completions.

Progress (stderr + optional metrics JSONL): completed samples/s, generated tokens/s, slot
occupancy, ETA.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from dasd_jax.progress import Progress
from dasd_jax.sample.engine import Engine
from dasd_jax.sample.sampling import SamplingParams
from dasd_jax.sample.text import TextBuilder, TokenText, cut_at

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One prompt (token ids) and the sampling parameters of each of its samples."""

    id: Any
    tokens: Sequence[int]
    samples: Sequence[SamplingParams]
    meta: dict = field(default_factory=dict)  # carried to the completions untouched


@dataclass
class Completion:
    request_id: Any
    index: int  # which sample of the request
    token_ids: list[int]  # generated tokens, the EOS token excluded
    logprobs: list[float]  # log p_model(token) at T=1
    sampling_logprobs: list[float]  # log p(token) under the sampling distribution used
    finish_reason: str  # "stop" (EOS or stop string) | "length" (token budget or cache)
    stop: int | str | None = None  # the EOS id or stop string that ended it
    eos_logprob: float | None = None  # log p_model of that EOS token
    text: str | None = None  # with a tokenizer: the text (cut before a stop string)
    offsets: list[tuple[int, int]] | None = None  # [start, end) of each token in `text`
    n_prompt_tokens: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class _Run:
    request: Request
    index: int
    sp: SamplingParams
    builder: TextBuilder | None
    ids: list[int] = field(default_factory=list)
    lp_model: list[float] = field(default_factory=list)
    lp_sampling: list[float] = field(default_factory=list)
    finished: bool = False
    on_device: bool = True  # the engine still decodes this slot
    tail: str = ""  # the text's last characters, for stop strings across tokens


class RequestQueue:
    """A live source of requests (a server's): `put` from any thread, `close` to end.

    The driver takes requests without blocking while slots are decoding and blocks only when
    it has nothing else to do, so a quiet queue never stalls running requests.
    """

    _CLOSED = object()

    def __init__(self):
        self._q: queue.Queue = queue.Queue()

    def put(self, request: Request) -> None:
        self._q.put(request)

    def close(self) -> None:
        self._q.put(self._CLOSED)

    def get(self, block: bool) -> Request | None:
        """The next request; None if none is waiting (block=False); StopIteration when closed."""
        try:
            item = self._q.get(block=block)
        except queue.Empty:
            return None
        if item is self._CLOSED:
            raise StopIteration
        return item


class Driver:
    def __init__(
        self, engine: Engine, token_text: TokenText | None = None, progress: Progress | None = None
    ):
        self.engine = engine
        self.token_text = token_text
        self.progress = progress
        self.steps = 0
        self.slot_steps = 0  # sum over decode steps of occupied slots (occupancy numerator)

    def run(self, requests: Iterable[Request] | RequestQueue) -> Iterator[Completion]:
        """Completions in the order they finish (each request's samples may interleave).

        `requests`: any iterable (read lazily) or a `RequestQueue` (served live)."""
        eng = self.engine
        B = eng.max_concurrent_decodes
        ds = eng.init_decode_state()
        free = list(range(B))
        slots: dict[int, _Run] = {}
        if isinstance(requests, RequestQueue):
            source = requests.get
        else:
            it = iter(requests)
            source = lambda block: next(it)  # noqa: E731
        pending: list | None = None  # [request, prefix, next sample index]
        exhausted = False
        inflight = None
        while True:
            while free and not exhausted:
                if pending is None:
                    try:
                        req = source(not slots and inflight is None)
                    except StopIteration:
                        exhausted = True
                        break
                    if req is None:  # a live queue with nothing waiting
                        break
                    pending = [req, self._prefill(req), 0]
                req, prefix, i = pending
                slot = free.pop(0)
                ds = eng.insert(prefix.with_sampling(req.samples[i]), ds, slot)
                builder = self.token_text.builder() if self.token_text else None
                slots[slot] = _Run(req, i, req.samples[i], builder)
                pending[2] += 1
                if pending[2] == len(req.samples):
                    pending = None
            dispatched = None
            if slots:
                ds, res = eng.generate_steps(None, ds)
                for x in jax.tree.leaves(res):
                    x.copy_to_host_async()
                dispatched = (res, dict(slots))
            if inflight is None and dispatched is None:
                return
            if inflight is not None:
                done, stopped_on_device = self._process(*inflight, slots, free)
                for slot in stopped_on_device:
                    ds = eng.release(ds, slot)
                yield from done
            inflight = dispatched

    def _prefill(self, req: Request):
        if not req.samples:
            raise ValueError(f"request {req.id!r} asks for no samples")
        try:
            self.engine.validate_prompt(len(req.tokens))
        except ValueError as e:
            raise ValueError(f"request {req.id!r}: {e}") from None
        if self.token_text is None and any(sp.stop for sp in req.samples):
            raise ValueError(f"request {req.id!r} has stop strings: the driver needs a tokenizer")
        tokens = np.asarray(req.tokens, np.int32)
        return self.engine.prefill(padded_tokens=tokens, true_length=len(tokens))

    def _process(
        self, res, snapshot: dict[int, _Run], slots: dict[int, _Run], free: list[int]
    ) -> tuple[list[Completion], list[int]]:
        r = jax.device_get(res)
        n_steps, B = r.token.shape
        out: list[Completion] = []
        host_stopped: list[int] = []
        tokens = 0
        for slot, run in snapshot.items():
            for j in range(n_steps):
                if run.finished or not r.valid[j, slot]:
                    continue
                tok = int(r.token[j, slot])
                if r.eos[j, slot]:
                    out.append(self._finish(run, "stop", tok, float(r.logprob_model[j, slot])))
                    run.on_device = False
                    break
                tokens += 1
                run.ids.append(tok)
                run.lp_model.append(float(r.logprob_model[j, slot]))
                run.lp_sampling.append(float(r.logprob_sampling[j, slot]))
                stop_at = self._stop_string(run, tok)
                if stop_at is not None:
                    out.append(self._finish(run, "stop", stop_at[0], None, cut=stop_at[1]))
                    run.on_device = bool(not r.done[j, slot])
                    break
                if r.done[j, slot]:
                    out.append(self._finish(run, "length", None, None))
                    run.on_device = False
                    break
            if run.finished and slots.get(slot) is run:
                del slots[slot]
                free.append(slot)
                free.sort()
                if run.on_device:
                    host_stopped.append(slot)
        self.steps += n_steps
        self.slot_steps += int(np.sum(r.valid))
        if self.progress is not None:
            occ = self.slot_steps / max(self.steps * B, 1)
            self.progress.update(len(out), tokens, occupancy=round(occ, 3))
        return out, host_stopped

    def _stop_string(self, run: _Run, token: int) -> tuple[str, int] | None:
        """(stop string, char index where it starts) once the text contains one.

        Only the new characters and the `longest - 1` before them are searched, so a long
        response costs linear time."""
        if run.builder is None:
            return None
        piece = run.builder.add(token)
        if not run.sp.stop:
            return None
        window = run.tail + piece
        hits = [(i, s) for s in run.sp.stop if (i := window.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            return s, run.builder.length - len(window) + i
        keep = max(len(s) for s in run.sp.stop) - 1
        run.tail = window[len(window) - keep :] if keep else ""
        return None

    def _finish(
        self, run: _Run, reason: str, stop, eos_logprob, cut: int | None = None
    ) -> Completion:
        run.finished = True
        ids, lpm, lps = run.ids, run.lp_model, run.lp_sampling
        text = offsets = None
        if run.builder is not None:
            text, offsets = run.builder.finish()
            if cut is not None:
                text, offsets, n = cut_at(text, offsets, cut)
                ids, lpm, lps = ids[:n], lpm[:n], lps[:n]
        return Completion(
            request_id=run.request.id,
            index=run.index,
            token_ids=ids,
            logprobs=lpm,
            sampling_logprobs=lps,
            finish_reason=reason,
            stop=stop,
            eos_logprob=eos_logprob,
            text=text,
            offsets=offsets,
            n_prompt_tokens=len(run.request.tokens),
            meta=run.request.meta,
        )


def generate(
    engine: Engine, requests: Iterable[Request], token_text: TokenText | None = None
) -> dict[Any, list[Completion]]:
    """Run all requests; completions per request id, ordered by sample index."""
    out: dict[Any, list[Completion]] = {}
    for c in Driver(engine, token_text).run(requests):
        out.setdefault(c.request_id, []).append(c)
    for v in out.values():
        v.sort(key=lambda c: c.index)
    return out
