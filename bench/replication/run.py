"""The miniature replication: DAS vs random selection and the low-then-high temperature schedule.

    python bench/replication/run.py --out runs/replication            # full run (~1 h, 2 cores)
    python bench/replication/run.py --out runs/replication-ci --reduced    # CI form (minutes)
    python bench/replication/run.py --task decoupled --out runs/decoupled --seeds 5

`--task` picks the variant (`task.VARIANTS`): `arrows` (default, the arms below) or
`decoupled`, where length and Teacher-sentence count rank the teacher's styles in opposite
orders, with the arms `DECOUPLED_ARMS` at T=1.0: random, longest, DAS by count, by ratio and
length-matched (`select.rule=max_teacher_count_for_length`).

Consumes nothing but its arguments. Produces, under `--out`:

- `data/`: the task's problem sets (`task.py`): `pool.jsonl` (prompts the teacher answers),
  `eval.jsonl` (held out), `teacher_train.jsonl`, `student_pretrain.jsonl`;
- `models/teacher`, `models/student`: Hugging Face folders (`models.py`), pre-trained here;
- `pool/sample/t0.6`, `pool/sample/t1`: the teacher's candidates (the `sample` stage);
  `pool/score_t0.6/score`, `pool/score_t1/score`: the student's log-probs (the `score` stage;
  the teacher's come from sampling);
- `seed{s}/<arm>/`: per seed and arm, the `select` stage's output (`select/`) and the SFT
  stage (`stage1/` or `stage2/`, the `train` stage), and `seed{s}/eval/<arm>.json` (avg@k);
- `analysis/`: selection-only runs (every candidate's sentence types; DAS at several beta);
- `results.json` (every number), `report.md` (tables shaped like the paper's Tables 3 and 7,
  mean and 95% CI over seeds, paired differences, selection statistics) and `plots/*.png`.

Arms (per seed; "budget" B = prompts, `select.budget_mode=prompts`, so the random and DAS arms
of one temperature train on the same prompts and differ only in which candidate they keep):

    rs_t0.6   random, T=0.6, B          das_t0.6   DAS, T=0.6, B   (= stage 1 of the schedule)
    rs_t1.0   random, T=1.0, B          das_t1.0   DAS, T=1.0, B
    rs_t1.0_2x random, T=1.0, 2B        das_t0.6_then_t1.0   stage 2 (T=1.0 DAS, B) continued
                                                   from das_t0.6's stage 1 (the paper's order)
    longest_t0.6, longest_t1.0: the longest candidate, B (a control: no log-probs)

A seed sets `select.seed` (the prompt subset and the random pick), the training data order and
the evaluation's sampling; the teacher's samples and the models are shared by all seeds.
Every step is skipped when its output exists, so a killed run continues where it stopped;
`plan.json` records the settings and a run with other settings into the same folder stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `python bench/replication/run.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.replication import models, report, task  # noqa: E402

log = logging.getLogger("replication")


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run (everything that changes a number in the report)."""

    # problem sets
    n_pool: int = 1024
    n_eval: int = 256
    n_teacher: int = 32000
    n_student: int = 8000
    # models
    teacher_steps: int = 800
    student_steps: int = 800
    teacher_lr: float = 2e-3
    student_lr: float = 2e-3
    pretrain_batch: int = 32
    teacher_vocab: int = 512
    student_vocab: int = 360
    # sampling and selection
    n_candidates: int = 4
    teacher_max_tokens: int = 128
    budget: int = 512  # prompts per arm (2x for rs_t1.0_2x)
    betas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2)
    structure_filter: bool = True
    # SFT (dasd_jax.train), the same for every arm and stage
    epochs: float = 8.0  # trial runs: 6 epochs at lr 1e-3 left the loss at ~0.2 (underfit)
    max_steps: int = 0
    sft_lr: float = 3e-3
    sft_lr_floor: float = 3e-4
    seq_len: int = 512
    global_batch: int = 8
    # evaluation
    k: int = 4
    eval_max_tokens: int = 256
    slots: int = 64


PRESETS = {
    "full": Preset(),
    # CI: every stage runs for real on tiny sizes; the numbers mean nothing (the teacher is
    # barely trained, so the structure filter is off to leave the selection something to pick).
    "reduced": Preset(
        n_pool=8,
        n_eval=4,
        n_teacher=64,
        n_student=64,
        teacher_steps=3,
        student_steps=3,
        pretrain_batch=8,
        teacher_vocab=300,
        student_vocab=290,
        n_candidates=2,
        teacher_max_tokens=24,
        budget=3,
        betas=(0.1,),
        structure_filter=False,
        max_steps=2,
        seq_len=512,  # the barely trained tokenizers cut little: ~150 tokens per record
        global_batch=2,
        k=2,
        eval_max_tokens=24,
        slots=8,
    ),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    temperature: float
    rule: str
    budget_x: int = 1
    after: str | None = None  # stage 2 continued from this arm's stage 1
    data_from: str | None = None  # whose selection stage 2 trains on

    @property
    def stage(self) -> int:
        return 2 if self.after else 1


ARMS = (
    Arm("rs_t0.6", 0.6, "random"),
    Arm("das_t0.6", 0.6, "max_teacher_count"),
    Arm("rs_t1.0", 1.0, "random"),
    Arm("rs_t1.0_2x", 1.0, "random", budget_x=2),
    Arm("das_t1.0", 1.0, "max_teacher_count"),
    Arm("das_t0.6_then_t1.0", 1.0, "max_teacher_count", after="das_t0.6", data_from="das_t1.0"),
    # controls: the longest candidate (student tokens), no log-probs involved; DAS's count
    # rule favours long responses, these say how much of its effect length alone gives
    Arm("longest_t0.6", 0.6, "longest"),
    Arm("longest_t1.0", 1.0, "longest"),
)
# The `decoupled` variant, T=1.0 only: does DAS pick something that length alone does not?
DECOUPLED_ARMS = (
    Arm("rs_t1.0", 1.0, "random"),
    Arm("longest_t1.0", 1.0, "longest"),
    Arm("das_t1.0", 1.0, "max_teacher_count"),
    Arm("das_ratio_t1.0", 1.0, "max_teacher_ratio"),
    Arm("das_for_length_t1.0", 1.0, "max_teacher_count_for_length"),
)
ARMS_BY_TASK = {"arrows": ARMS, "decoupled": DECOUPLED_ARMS}
# Paired differences reported per variant (a - b, same seed)
PAIRS_BY_TASK = {
    "arrows": (
        ("das_t0.6", "rs_t0.6"),
        ("das_t1.0", "rs_t1.0"),
        ("das_t1.0", "rs_t1.0_2x"),
        ("das_t0.6_then_t1.0", "das_t1.0"),
        ("das_t0.6_then_t1.0", "rs_t1.0_2x"),
        ("das_t0.6_then_t1.0", "das_t0.6"),
        ("das_t0.6", "longest_t0.6"),
        ("das_t1.0", "longest_t1.0"),
    ),
    "decoupled": (
        ("das_t1.0", "longest_t1.0"),
        ("das_ratio_t1.0", "longest_t1.0"),
        ("das_for_length_t1.0", "longest_t1.0"),
        ("das_t1.0", "rs_t1.0"),
        ("longest_t1.0", "rs_t1.0"),
        ("das_t1.0", "das_for_length_t1.0"),
        ("das_t1.0", "das_ratio_t1.0"),
    ),
}
# The analysis' all-candidates select run judges each candidate (the Figure 6 table)
JUDGE = "bench.replication.task:exact_match"


def tdir(t: float) -> str:
    return f"t{t:g}"  # the sample stage's folder name


# --------------------------------------------------------------------------- plumbing


def overrides(d: dict, prefix: str = "") -> list[str]:
    """Nested dict -> dotted `key=value` overrides (values as JSON, which YAML reads back)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}")
    return out


def make_config(out: Path, p: Preset, run_dir: Path, seed: int = 0, **sections):
    """A dasd_jax Config for one stage call: the shared settings plus `sections`."""
    from dasd_jax.config import load_config

    base = {
        "run_dir": str(run_dir),
        "seed": seed,
        "student": {"path": str(out / "models/student"), "dtype": "float32", "attention": "xla"},
        "teacher": {"path": str(out / "models/teacher"), "dtype": "float32", "attention": "xla"},
        "sample": {
            "slots": p.slots,
            "max_prefill_length": 128,
            "prefill_chunk": 128,
            "progress_every_s": 30.0,
        },
        "filters": {"structure": p.structure_filter},
        "train": {
            "seq_len": p.seq_len,
            "global_batch": p.global_batch,
            "data_threads": 1,
            "length_sample": 4096,
            "checkpoint_every": 100000,
            "keep_checkpoints": 1,
            "async_checkpoints": False,
            "tensorboard": False,
            "log_every": 25,
            "chunk_size": 256,
            "export_dtype": "float32",
        },
    }
    merged = base
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return load_config(None, overrides(merged))


def write_json(path: Path, obj) -> None:
    from dasd_jax.records import write_json as _write

    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, obj)


def timed(timings: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - self.t, 1)

    return _T()


# --------------------------------------------------------------------------- steps


def build_data(out: Path, p: Preset) -> dict:
    """The four problem sets as JSONL (deterministic; rewritten only when missing)."""
    from dasd_jax.records import write_jsonl

    sets = task.splits(p.n_pool, p.n_eval, p.n_teacher, p.n_student)
    names = {
        "pool": "pool",
        "eval": "eval",
        "teacher": "teacher_train",
        "student": "student_pretrain",
    }
    for key, name in names.items():
        path = out / "data" / f"{name}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, task.rows(sets[key]))
    return sets


def build_models(out: Path, p: Preset, sets: dict, v: task.Variant) -> dict:
    """Tokenizers, then the pre-trained teacher and student (each reused when present)."""
    from dasd_jax.tokenizer import DEFAULT_SYSTEM_PROMPT, render_chat

    info = {}
    plans = (
        ("teacher", sets["teacher"], v.teacher_styles, models.TEACHER_ARCH, p.teacher_vocab,
         p.teacher_steps, p.teacher_lr, 1),
        ("student", sets["student"], v.student_styles, models.STUDENT_ARCH, p.student_vocab,
         p.student_steps, p.student_lr, 2),
    )  # fmt: skip
    for name, problems, styles, arch, vocab, steps, lr, seed in plans:
        folder = out / "models" / name
        pairs = models.styled_pairs(problems, styles, seed)
        tok_dir = out / "models" / f"{name}_tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            # Each tokenizer learns its merges from its own model's prompts written in every
            # style (a real student's vocabulary covers the words of the teacher's style too;
            # what the student lacks is the habit, i.e. its pre-training data below).
            corpus = models.styled_pairs(problems, v.teacher_styles, seed)
            texts = [render_chat(q, r, DEFAULT_SYSTEM_PROMPT).text for q, r in corpus]
            tmp = tok_dir.with_name(tok_dir.name + ".tmp")
            models.build_bpe_tokenizer(tmp, texts, vocab)
            os.replace(tmp, tok_dir)
        cfg = models.PretrainConfig(steps=steps, batch=p.pretrain_batch, lr=lr, seed=seed)
        models.pretrain(folder, arch, tok_dir, pairs, cfg, DEFAULT_SYSTEM_PROMPT, name)
        info[name] = json.loads((folder / "pretrain.json").read_text())
    return info


def sample_pool(out: Path, p: Preset, temps: tuple[float, ...]) -> None:
    """The `sample` stage: n candidates per pool prompt at T=0.6 and T=1.0, in
    `pool/sample/t<T>/part-*.jsonl` (the `score` stage reads each temperature's folder)."""
    from dasd_jax.sample import stage as sample_stage

    run_dir = out / "pool"
    if not (run_dir / "sample" / "summary.json").exists():
        cfg = make_config(
            out,
            p,
            run_dir,
            sample={
                "input": str(out / "data/pool.jsonl"),
                "id_field": "id",
                "prompt_field": "problem",
                "answer_field": "answer",
                "temperatures": list(temps),
                "n": p.n_candidates,
                "max_tokens": p.teacher_max_tokens,
                "prompts_per_shard": 128,
            },
        )
        sample_stage.run(cfg)


def score_pool(out: Path, p: Preset, temps: tuple[float, ...]) -> None:
    """The `score` stage per temperature: the student's log-probs of every candidate."""
    from dasd_jax import score

    for t in temps:
        run_dir = out / "pool" / f"score_{tdir(t)}"
        if (run_dir / "score" / "summary.json").exists():
            continue
        cfg = make_config(
            out,
            p,
            run_dir,
            score={
                "input": str(out / "pool" / "sample" / tdir(t)),
                "input_format": "candidates",
                "max_tokens": 2048,
                "batch_tokens": 8192,
                "bucket_multiple": 32,
                "chunk_size": 256,
                "rows_per_shard": 100000,
                "teacher_scoring": "never",  # recorded at sampling time
            },
        )
        score.run(cfg)


def select(out: Path, p: Preset, t: float, output: Path, seed: int, **sel) -> Path:
    """The `select` stage over one temperature's scored candidates into `output`."""
    from dasd_jax.select import stage as select_stage

    if not (output / "summary.json").exists():
        with_report = sel.pop("report", False)
        cfg = make_config(
            out,
            p,
            output.parent,
            seed=seed,
            select_stage={
                "input": str(out / "pool" / f"score_{tdir(t)}" / "score"),
                "output": str(output),
                "report": with_report,
                # the exact-match verdict of every candidate, for the Figure 6 table
                **({"judge": JUDGE, "judge_workers": 0} if with_report else {}),
            },
            select={"seed": seed, "budget_mode": "prompts", **sel},
        )
        select_stage.run(cfg)
    return output


def train_arm(out: Path, p: Preset, seed: int, arm: Arm) -> Path:
    """Selection, then the SFT stage of one arm; returns its exported HF folder."""
    from dasd_jax.train import stage as train_stage

    run_dir = out / f"seed{seed}" / arm.name
    stage_cfg = {"epochs": p.epochs, "max_steps": p.max_steps, "lr": p.sft_lr,
                 "lr_floor": p.sft_lr_floor, "warmup_frac": 0.1}  # fmt: skip
    if arm.after is None:
        data = select(
            out, p, arm.temperature, run_dir / "select", seed,
            rule=arm.rule, budget=p.budget * arm.budget_x,
        )  # fmt: skip
        stage = {"stage1": {**stage_cfg, "sources": {"low_t": {"path": f"{data}/*.array_record"}}}}
    else:
        data = out / f"seed{seed}" / arm.data_from / "select"
        source = {"high_t": {"path": f"{data}/*.array_record"}}
        init = str(out / f"seed{seed}" / arm.after / "stage1")
        stage = {"stage2": {**stage_cfg, "sources": source, "init_from": init}}
    cfg = make_config(out, p, run_dir, seed=seed, **stage)
    summary = train_stage.run(cfg, arm.stage)
    if summary.get("preempted"):
        raise SystemExit(
            f"{arm.name} (seed {seed}): stage {arm.stage} stopped by SIGTERM at step "
            f"{summary.get('step')} (checkpoint saved); run the same command again to resume"
        )
    return Path(summary["export"])


def evaluate(out: Path, p: Preset, folder: Path, label: str, seed: int, problems) -> dict:
    """avg@k by exact answer match: k samples per held-out problem at T=1.0 (the paper's
    evaluation temperature), through the sampling engine over the exported student."""
    from dasd_jax.sample.shards import Rejected
    from dasd_jax.sample.stage import TeacherSampler

    path = out / f"seed{seed}" / "eval" / f"{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    cfg = make_config(
        out,
        p,
        out / f"seed{seed}",
        seed=seed,
        teacher={"path": str(folder)},
        sample={"max_tokens": p.eval_max_tokens},
    )
    sampler = TeacherSampler(folder, cfg, model_name=label)
    cands = sampler.sample(
        [q.prompt for q in problems], 1.0, n=p.k, prompt_ids=[q.id for q in problems]
    )
    rows = []
    for q, cs in zip(problems, cands, strict=True):
        # an answer the sample stage would refuse (e.g. text not in NFC) is judged on its raw
        # text all the same: dropping it would raise avg@k
        texts = [c.text if isinstance(c, Rejected) else c.response for c in cs]
        rows.append(
            {
                "id": q.id,
                "answer": q.answer,
                "correct": [bool(task.exact_match(t, q.answer)) for t in texts],
                "styles": [task.detect_style(t) for t in texts],
                "tokens": [
                    c.n_tokens if isinstance(c, Rejected) else len(c.teacher.token_ids) for c in cs
                ],  # fmt: skip
                "truncated": [c.finish_reason == "length" for c in cs],
            }
        )
    result = report.eval_summary(rows, p.k)
    result.update(label=label, seed=seed, checkpoint=str(folder), rows=rows,
                  seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    write_json(path, result)
    return result


def analysis(out: Path, p: Preset, temps: tuple[float, ...]) -> dict:
    """Selection-only runs (no training): every candidate's sentence types (DAS with
    top_k = n keeps them all) and DAS's pick at each beta, per temperature."""
    res = {}
    for t in temps:
        root = out / "analysis" / tdir(t)
        all_dir = select(
            out, p, t, root / "all_beta0.1", 0, rule="max_teacher_count", beta=0.1,
            top_k=p.n_candidates, report=True,
        )  # fmt: skip
        picks = {
            b: select(out, p, t, root / f"das_beta{b:g}", 0, rule="max_teacher_count", beta=b)
            for b in p.betas
        }
        res[tdir(t)] = {"all": all_dir, "picks": picks}
    return res


# --------------------------------------------------------------------------- main


def code_version() -> dict:
    """dasd_jax's version, git commit and dirty flag, plus a hash of bench/replication's
    sources and whether they differ from the commit (the report names what produced it)."""
    import hashlib
    import subprocess

    from dasd_jax.pipeline import code_version as package_version

    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    out = {**package_version(), "replication_sha256": h.hexdigest()}
    try:
        st = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", str(here)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        out["replication_dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["replication_dirty"] = None
    return out


def check_plan(out: Path, preset_name: str, p: Preset, task_name: str = "arrows") -> None:
    plan = {"preset": preset_name, **dataclasses.asdict(p)}
    if task_name != "arrows":  # folders of the first variant predate the key
        plan["task"] = task_name
    plan = json.loads(json.dumps(plan))  # tuples as lists
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise SystemExit(
                f"{out} holds a run with other settings ({', '.join(diff)} differ): "
                "use another --out or delete that folder"
            )
    else:
        write_json(path, plan)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (created; re-running resumes)")
    ap.add_argument("--reduced", action="store_true", help="tiny sizes for CI (minutes)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ap.add_argument(
        "--task", default="arrows", choices=sorted(task.VARIANTS), help="variant (task.VARIANTS)"
    )
    ap.add_argument(
        "--compile-cache", default="", help="JAX compilation cache ('' = <out>/jax_cache)"
    )
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out).resolve()
    preset_name = "reduced" if args.reduced else "full"
    p = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    check_plan(out, preset_name, p, args.task)
    v = task.VARIANTS[args.task]
    arms, temps = ARMS_BY_TASK[args.task], v.temperatures

    import jax

    # Every arm compiles the same train and decode steps: the persistent cache compiles once.
    jax.config.update("jax_compilation_cache_dir", args.compile_cache or str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with timed(timings, "data"):
        sets = build_data(out, p)
    with timed(timings, "models"):
        model_info = build_models(out, p, sets, v)
    with timed(timings, "sample"):
        sample_pool(out, p, temps)
    with timed(timings, "score"):
        score_pool(out, p, temps)
    with timed(timings, "analysis"):
        selections = analysis(out, p, temps)
    evals: dict[int, dict[str, dict]] = {}
    for seed in range(args.seeds):
        evals[seed] = {}
        with timed(timings, "evaluate"):
            evals[seed]["base"] = evaluate(
                out, p, out / "models/student", "base", seed, sets["eval"]
            )
        for arm in arms:
            with timed(timings, "select+train"):
                folder = train_arm(out, p, seed, arm)
            with timed(timings, "evaluate"):
                evals[seed][arm.name] = evaluate(out, p, folder, arm.name, seed, sets["eval"])
    with timed(timings, "evaluate"):
        teacher_eval = evaluate(out, p, out / "models/teacher", "teacher", 0, sets["eval"])
    with timed(timings, "report"):
        results = report.build(
            out, p, preset_name, v, arms, PAIRS_BY_TASK[args.task], sets, model_info, evals,
            teacher_eval, selections,
        )  # fmt: skip
    timings["total"] = round(time.perf_counter() - t_start, 1)
    results["timings_s"] = timings
    argv = sys.argv[1:] if argv is None else argv
    results["command"] = " ".join(["python", "bench/replication/run.py", *argv])
    results["code_version"] = code_version()
    write_json(out / "results.json", results)
    report.write_markdown(out, results)
    log.info("done in %.0f s: %s", timings["total"], out / "report.md")
    return results


if __name__ == "__main__":
    main()
