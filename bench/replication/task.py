"""The synthetic reasoning task of the miniature replication: following arrows between letters.

Consumes a seed and a `TaskConfig`; produces problems with a verifiable answer, their chain of
thought in several valid styles, and the exact-match checker the evaluation uses.

A problem is a set of arrows between letters (one arrow leaves each letter listed), in a
shuffled order, and a start letter. Following the arrows from the start leads along a path to a
letter whose arrow points back to itself: that letter is the answer. The other arrows are
distractors (they never leave a letter of the path).

    prompt:   "Follow the arrows from B: C>E, G>G, D>G, B>A, H>B, A>D"
    answer:   G        (B > A > D > G, and G>G: stop)

Each step is a lookup of the current letter among the arrows, and the chain stops when the
arrow found points back to the same letter, so small transformers learn it in minutes on a
CPU: the tokenizers keep `X>` (a letter leaving) and `X` (a letter arrived at) as tokens of
their own (`models.py`), so writing `X>` in a step and copying the token that follows `X>` in
the prompt is the classic induction pattern; nothing is memorised.

Every response has the shape of the paper's data, `<think>\\n{steps}\\n</think>\\n\\nThe
answer is {x}.`, and the steps come in four styles that differ in wording and level of detail
(all valid, all reaching the same answer):

    compact  B>A.                          one line per arrow followed, the last one G>G
             A>D.
             D>G.
             G>G.
    full     B>A, so go to A.              the arrow and the move, then why it stops
             ...
             G>G, so stop at G.
    words    Start at B.                   prose, one line per step, and the stop
             The arrow B>A points to A.
             ...
             The arrow G>G points back to G, so stop.
    terse    A, D, G, G.                   the letters visited, one line
    recap    So we follow the arrows ...   eight lines: seven fixed or copied ones around
             The letters we visit are      one line of the letters visited (the `decoupled`
             A, D, G.                      variant only; see `VARIANTS`)
             ...

The splitter of the select stage (`select.splitter.kind=cot`) cuts at newlines, so a response
has one sentence per line: `terse` has 1, `compact` and `full` one per arrow followed, `words`
one more, `recap` 8.

Two variants of the experiment (`VARIANTS`) share the problems and differ in the styles:

- `arrows` (the first replication): the teacher writes compact, full, words and terse; the
  student was pre-trained on `compact` only. Length and Teacher-sentence count rank the
  styles alike (words > full > compact > terse).
- `decoupled`: the teacher writes compact, full, terse and `recap`; the student was pre-trained
  on `recap` only. `recap` is the longest style, but seven of its eight lines are fixed
  phrases or copies that the student knows (Shared sentences) and its one line of content
  leaves every lookup implicit, like `terse`; compact and full are shorter, written only by
  the teacher (every line a Teacher sentence) and spell each lookup out. Length and Teacher
  count rank them in opposite orders.

Several disjoint problem sets come from one generator (`splits`): the teacher's training set,
the student's pre-training set (another distribution, see `STUDENT_PRETRAIN`), the prompt
pool the teacher answers for distillation, and the held-out evaluation set. Disjointness is by
prompt text.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

# Node names: capital letters that start no word of the prompts and responses (Follow, Start,
# The, There, No; the system prompt's You), so that the tokenizers' isolation of `X>` and `X`
# (`models.py`) never cuts a word in a way that collides with a name.
LETTERS = "ABCDEGHIJKLM"
STYLES = ("compact", "full", "words", "terse")  # the `arrows` variant's teacher styles
ALL_STYLES = (*STYLES, "recap")
_PROMPT = re.compile(r"Follow the arrows from ([A-M]): ([A-M]>[A-M](?:, [A-M]>[A-M])*)")


@dataclass(frozen=True)
class TaskConfig:
    """Which problems a generator draws (one distribution): path length (arrows followed) and
    distractor arrows."""

    min_steps: int = 3
    max_steps: int = 5
    min_distractors: int = 2
    max_distractors: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"task: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError(
                "task: need 0 <= min_distractors <= max_distractors, got "
                f"{self.min_distractors}, {self.max_distractors}"
            )
        if self.max_steps + 1 + self.max_distractors > len(LETTERS):  # distinct letters
            raise ValueError(
                f"task: a path of {self.max_steps} steps and {self.max_distractors} distractors "
                f"need more than the {len(LETTERS)} letters"
            )


# The target distribution: distillation prompts and evaluation.
TARGET = TaskConfig(min_steps=3, max_steps=5, min_distractors=2, max_distractors=4)
# The teacher learns a superset (shorter and longer paths) so that it is accurate on TARGET.
TEACHER_TRAIN = TaskConfig(min_steps=1, max_steps=6, min_distractors=0, max_distractors=5)
# The student's prior, a related distribution it was pre-trained on: short paths (1-2 steps),
# few distractors, one style only. It has never written the other styles nor a long path.
STUDENT_PRETRAIN = TaskConfig(min_steps=1, max_steps=2, min_distractors=0, max_distractors=2)
STUDENT_STYLES = ("compact",)


@dataclass(frozen=True)
class Variant:
    """One version of the experiment: the styles each model learns and the temperatures the
    teacher samples at (the problem sets are the same for every variant)."""

    name: str
    teacher_styles: tuple[str, ...]
    student_styles: tuple[str, ...]
    temperatures: tuple[float, ...]


VARIANTS = {
    "arrows": Variant("arrows", STYLES, STUDENT_STYLES, (0.6, 1.0)),
    "decoupled": Variant("decoupled", ("compact", "full", "terse", "recap"), ("recap",), (1.0,)),
}


@dataclass(frozen=True)
class Problem:
    start: str
    arrows: tuple[tuple[str, str], ...]  # in the order the prompt lists them

    @property
    def prompt(self) -> str:
        listed = ", ".join(f"{a}>{b}" for a, b in self.arrows)
        return f"Follow the arrows from {self.start}: {listed}"

    @property
    def path(self) -> list[str]:
        """The letters visited after the start, in order, up to the letter pointing to itself."""
        nxt = dict(self.arrows)
        out, x = [], self.start
        while True:
            if x not in nxt:
                raise ValueError(f"no arrow leaves {x}: {self.prompt!r}")
            if nxt[x] == x:
                return out
            x = nxt[x]
            if x in out or x == self.start:
                raise ValueError(f"arrows form a cycle: {self.prompt!r}")
            out.append(x)

    @property
    def answer(self) -> str:
        path = self.path
        return path[-1] if path else self.start

    @property
    def id(self) -> str:
        return "p" + hashlib.sha256(self.prompt.encode()).hexdigest()[:12]


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt states (inverse of `Problem.prompt`); ValueError if malformed."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not a task prompt: {prompt!r}")
    arrows = tuple((x[0], x[2]) for x in m.group(2).split(", "))
    if len({a for a, _ in arrows}) != len(arrows):
        raise ValueError(f"not a task prompt (two arrows leave one letter): {prompt!r}")
    p = Problem(m.group(1), arrows)
    p.path  # noqa: B018 - raises on a cycle or a missing arrow
    return p


def random_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    steps = rng.randint(cfg.min_steps, cfg.max_steps)
    n_distract = rng.randint(cfg.min_distractors, cfg.max_distractors)
    letters = rng.sample(LETTERS, steps + 1 + n_distract)
    path, others = letters[: steps + 1], letters[steps + 1 :]
    arrows = list(zip(path[:-1], path[1:], strict=True)) + [(path[-1], path[-1])]
    # distractors leave letters off the path (so the path is unchanged) and point to a path
    # letter or an earlier distractor: no cycle, and every listed letter has its arrow
    for i, a in enumerate(others):
        arrows.append((a, rng.choice(path + others[:i])))
    rng.shuffle(arrows)
    return Problem(path[0], tuple(arrows))


def generate(
    n: int, seed: int, cfg: TaskConfig = TARGET, exclude: set[str] = frozenset()
) -> list[Problem]:
    """n distinct problems (by prompt), none of whose prompt is in `exclude`; deterministic in
    (n, seed, cfg). Raises if the distribution cannot supply n."""
    rng = random.Random(f"replication-task-{seed}")
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n:
        p = random_problem(rng, cfg)
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from {cfg}")
        if p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def solve(problem: Problem, style: str) -> str:
    """The response `<think>\\n{steps}\\n</think>\\n\\nThe answer is {x}.` in `style`."""
    path = problem.path
    hops = list(zip([problem.start, *path[:-1]], path, strict=True))
    end = problem.answer
    if style == "compact":
        lines = [f"{a}>{b}." for a, b in hops] + [f"{end}>{end}."]
    elif style == "full":
        lines = [f"{a}>{b}, so go to {b}." for a, b in hops] + [f"{end}>{end}, so stop at {end}."]
    elif style == "words":
        lines = [f"Start at {problem.start}."]
        lines += [f"The arrow {a}>{b} points to {b}." for a, b in hops]
        lines.append(f"The arrow {end}>{end} points back to {end}, so stop.")
    elif style == "terse":
        lines = [", ".join([*path, end]) + "."]
    elif style == "recap":
        # capitals only where no node letter can be (`LETTERS`): So, Starting, The, That, Now, Yes
        lines = [
            "So we follow the arrows one at a time.",
            f"Starting from {problem.start}, we look up each letter in the list.",
            "The letters we visit are " + ", ".join(path) + ".",
            "That last letter points back to itself, so the walk ends there.",
            f"So the walk stops at {end}.",
            "Now we check that each step used an arrow from the list.",
            "Yes, each step did.",
            "Now we write the answer.",
        ]
    else:
        raise ValueError(f"unknown style {style!r}; styles: {ALL_STYLES}")
    think = "\n".join(lines)
    return f"<think>\n{think}\n</think>\n\nThe answer is {end}."


_ANSWER = re.compile(r"The answer is ([A-M])\.?\s*\Z")


def final_answer(response: str) -> str | None:
    """The letter after the last `</think>` in `The answer is x.`; None if absent."""
    close = response.rfind("</think>")
    if close < 0:
        return None
    m = _ANSWER.search(response[close + len("</think>") :].strip())
    return m.group(1) if m else None


def exact_match(response: str, gold, row: dict | None = None) -> bool | None:
    """The evaluation scorer (also usable as `evaluate.scorer=bench.replication.task:
    exact_match`): the final answer equals the gold letter exactly; None when the gold is not
    one letter."""
    want = str(gold).strip()
    if len(want) != 1 or want not in LETTERS:
        return None
    return final_answer(response) == want


_STYLE_LINES = {
    "compact": (r"[A-M]>[A-M]\.",),
    "full": (r"[A-M]>[A-M], so go to [A-M]\.", r"([A-M])>\1, so stop at \1\."),
    "words": (
        r"Start at [A-M]\.",
        r"The arrow [A-M]>[A-M] points to [A-M]\.",
        r"The arrow ([A-M])>\1 points back to \1, so stop\.",
    ),
    "terse": (r"[A-M](?:, [A-M])*\.",),
}
_RECAP = (
    r"So we follow the arrows one at a time\.",
    r"Starting from [A-M], we look up each letter in the list\.",
    r"The letters we visit are [A-M](?:, [A-M])*\.",
    r"That last letter points back to itself, so the walk ends there\.",
    r"So the walk stops at [A-M]\.",
    r"Now we check that each step used an arrow from the list\.",
    r"Yes, each step did\.",
    r"Now we write the answer\.",
)


def detect_style(response: str) -> str:
    """The style a response's thinking is written in (`other` when its lines fit none)."""
    m = re.search(r"<think>\n(.*?)\n</think>", response, re.S)
    if m is None:
        return "other"
    lines = m.group(1).split("\n")
    if len(lines) == len(_RECAP) and all(map(re.fullmatch, _RECAP, lines)):
        return "recap"
    for style, patterns in _STYLE_LINES.items():
        if style == "terse" and len(lines) != 1:
            continue
        if all(any(re.fullmatch(p, line) for p in patterns) for line in lines):
            return style
    return "other"


def rows(problems: list[Problem]) -> list[dict]:
    """JSONL rows `{id, problem, answer}`."""
    return [{"id": p.id, "problem": p.prompt, "answer": p.answer} for p in problems]


def splits(n_pool: int, n_eval: int, n_teacher: int, n_student: int, seed: int = 0) -> dict:
    """Disjoint problem sets (by prompt): `eval` and `pool` from TARGET, `teacher` from
    TEACHER_TRAIN and `student` from STUDENT_PRETRAIN, none sharing a prompt with another."""
    ev = generate(n_eval, seed * 4 + 0, TARGET)
    taken = {p.prompt for p in ev}
    pool = generate(n_pool, seed * 4 + 1, TARGET, taken)
    taken |= {p.prompt for p in pool}
    teacher = generate(n_teacher, seed * 4 + 2, TEACHER_TRAIN, taken)
    taken |= {p.prompt for p in teacher}
    student = generate(n_student, seed * 4 + 3, STUDENT_PRETRAIN, taken)
    return {"eval": ev, "pool": pool, "teacher": teacher, "student": student}
