"""Scorers: is one sampled response correct for a benchmark row?

Consumes a response (`<think>...</think>answer` text, or plain text from a model that does not
think), the row's gold answer and the whole benchmark row; produces True / False, or None when
the response cannot be judged (e.g. a gold answer math-verify cannot parse). The hook:

    Scorer = Callable[[str, Any, dict], bool | None]   # (response, gold answer, row)

Built in (`evaluate.scorer`):
- "math": the final answer after the last `</think>` (the whole text when there is no
  `<think>` at all; a `<think>` never closed has no answer: False), its last `\\boxed{...}` if
  any, else the answer text itself, from which math-verify extracts the last expression or
  number; then math-verify (`select.filters.verify_answer`) decides equivalence (1/2 = 0.5 =
  \\frac{1}{2}, 408 = \\boxed{408}, sets of roots in any order).
- "choice": multiple choice (GPQA style): the gold answer is a letter ("C", "(C)"); the
  response's letter is the last `\\boxed{C}` (also `\\boxed{\\text{C}}`, `\\boxed{(C)}`), else the
  last "Answer: C" / "the answer is (C)", else the last "(C)", else an answer that is one letter.
- "package.module:function": any importable function with the hook's signature (it runs in
  scorer worker processes, so it must be importable there: a module on sys.path, not a lambda).
Code execution (LiveCodeBench) is out of scope: plug a sandboxed runner in as a custom hook.

`judge_all` runs a scorer over many samples in worker processes (`select.filters.
map_with_timeout`): a check that hangs (math-verify on a pathological expression, a hook that
never returns) is killed after its time limit and counted as a timeout, not judged, never
stalling the stage; a scorer that raises TimeoutError (math-verify's own limits fire as
`filters.VerifyTimeout`) is a timeout too, never a wrong answer. Each worker imports the hook
(and math-verify) before it takes a sample, so no sample's limit pays for imports.

Security: a "module:function" scorer is code named by the config; it is imported and run in
the worker processes (and once in the stage's process, to check it) with the user's rights.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from dasd_jax.evaluate.config import BUILTIN_SCORERS, check_scorer_spec
from dasd_jax.select.filters import (
    extract_final_answer,
    import_math_verify,
    map_with_timeout,
    run_item,
    verify_answer,
)
from dasd_jax.select.sentences import THINK_CLOSE, THINK_OPEN

Scorer = Callable[[str, Any, dict], "bool | None"]


def answer_text(response: str) -> str | None:
    """The answer part: after the last `</think>`; the whole text when the response never
    thinks; None when a `<think>` is never closed (truncated thinking has no answer)."""
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        return response[close + len(THINK_CLOSE) :].strip()
    if THINK_OPEN in response:
        return None
    return response.strip()


def final_math_answer(response: str) -> str | None:
    """The last `\\boxed{...}` of the answer part, else the answer part; None if there is none."""
    answer = answer_text(response)
    if not answer:
        return None
    return extract_final_answer(THINK_CLOSE + answer)


def math_scorer(
    response: str, gold: Any, row: dict | None = None, timeout_s: float | None = 10.0
) -> bool | None:
    """math-verify equivalence of the final answer with `gold`; None if gold does not parse;
    raises `filters.VerifyTimeout` when math-verify's own time limit fires (not judged)."""
    if gold is None or not str(gold).strip():
        return None
    pred = final_math_answer(response)
    if pred is None:  # no answer at all (thinking never closed, or empty): wrong
        return False
    return verify_answer(str(gold), pred, timeout_s)


_LETTER = r"\(?\s*([A-Z])\s*\)?"
_CHOICE_PATTERNS = (
    # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}, \boxed{\textbf{C}}
    re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{\s*)?" + _LETTER + r"\s*\}"),
    # Answer: C, **Answer:** (C), the answer is C, correct answer is: $C$
    re.compile(
        r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?[\s*_$]*" + _LETTER + r"(?![A-Za-z0-9])",
    ),
    re.compile(r"\(\s*([A-Z])\s*\)"),
)


def choice_letter(text: str) -> str | None:
    """The chosen letter of an answer text (see the module docstring), or None."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    bare = re.sub(r"[\s*_$().:]", "", text)
    return bare.upper() if len(bare) == 1 and bare.isalpha() else None


def choice_scorer(response: str, gold: Any, row: dict | None = None) -> bool | None:
    """The response's letter equals the gold letter; None if the gold is not one letter."""
    want = choice_letter(str(gold).strip()) if gold is not None else None
    if want is None:
        return None
    answer = answer_text(response)
    got = choice_letter(answer) if answer else None
    return got == want


def resolve_scorer(spec: str, timeout_s: float | None = 10.0) -> Scorer:
    """The scorer named by `evaluate.scorer`: a built-in or an importable "module:function"."""
    check_scorer_spec(spec)
    if spec == "math":
        return functools.partial(math_scorer, timeout_s=timeout_s)
    if spec == "choice":
        return choice_scorer
    module, _, name = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"evaluate.scorer={spec!r}: cannot import {module!r}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ValueError(f"evaluate.scorer={spec!r}: {module} has no function {name!r}")
    return fn


@functools.lru_cache(maxsize=8)
def _cached(spec: str, timeout_s: float | None) -> Scorer:
    return resolve_scorer(spec, timeout_s)


def judge(spec: str, timeout_s: float | None, response: str, gold: Any, row: dict) -> bool | None:
    """One verdict (a worker's task): the scorer is resolved once per process."""
    verdict = _cached(spec, timeout_s)(response, gold, row)
    if verdict is not None and not isinstance(verdict, bool):
        raise TypeError(f"scorer {spec!r} returned {type(verdict).__name__}, expected bool or None")
    return verdict


def start_worker(spec: str, timeout_s: float | None) -> None:
    """A scorer process's initializer: import math-verify and the hook before any sample."""
    if spec == "math":
        import_math_verify()
    _cached(spec, timeout_s)


def judge_all(
    spec: str,
    items: Sequence[tuple[str, Any, dict]],
    timeout_s: float,
    workers: int = 2,
) -> list[tuple[str, bool | None]]:
    """(status, verdict) per (response, gold, row): status "ok", "timeout" (killed past
    `timeout_s` + 2 s, or the scorer raised TimeoutError) or "error" (the verdict is then the
    detail). workers=0 judges in this process (math-verify's own time limits only; a hang in C
    code would stall the stage)."""
    if not items:
        return []
    resolve_scorer(spec, timeout_s)  # a bad hook fails here, once, with its name
    args = [(spec, timeout_s, r, g, row) for r, g, row in items]
    if workers == 0:
        return [run_item(judge, a) for a in args]
    return map_with_timeout(
        judge,
        args,
        timeout_s + 2.0,  # math-verify's own limits get to fire first
        workers,
        initializer=functools.partial(start_worker, spec, timeout_s),
    )


__all__ = [
    "BUILTIN_SCORERS",
    "Scorer",
    "answer_text",
    "choice_letter",
    "choice_scorer",
    "final_math_answer",
    "judge",
    "judge_all",
    "math_scorer",
    "resolve_scorer",
]
