"""`python -m dasd_jax.launch --stage=STAGE [--config=FILE] [--force] [key=value ...]`

Parses the command line, loads the typed config (defaults <- YAML <- overrides), starts the
multi-host runtime when several processes are present, and dispatches to the stage's
`run(cfg)` through `dasd_jax.pipeline` (the run directory's manifest; `--stage=all` runs every
stage in order). Nothing else happens here: each stage lives in its own module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from dasd_jax.config import ConfigError, load_config, to_yaml

# stage -> (module, one line for --help). Stages of later milestones register here.
STAGES: dict[str, tuple[str, str]] = {
    "sample": (
        "dasd_jax.sample.stage",
        "teacher responses at each temperature with per-token teacher log-probs",
    ),
    "score": (
        "dasd_jax.score",
        "per-token student (and missing teacher) log-probs of every candidate",
    ),
    "select": (
        "dasd_jax.select.stage",
        "filters + DAS selection -> SFT ArrayRecords, rejects, report",
    ),
    "1": ("dasd_jax.train.stage1", "SFT stage 1: the student on low-temperature data"),
    "2": ("dasd_jax.train.stage2", "SFT stage 2: from stage 1, on high-temperature data"),
    "mixed_policy": (
        "dasd_jax.mixed_policy.stage",
        "stage-2 student prefixes cut in (0.5L, L), teacher continuations -> stage-3 data",
    ),
    "3": ("dasd_jax.train.stage3", "SFT stage 3: from stage 2, on mixed-policy data"),
    "evaluate": (
        "dasd_jax.evaluate.stage",
        "avg@k / pass@k of base and stage checkpoints on local JSONL benchmarks",
    ),
    "export": ("dasd_jax.export", "a stage checkpoint -> Hugging Face folder (transformers, vLLM)"),
}


ALL_HELP = "every stage in order; skips complete ones (docs/pipeline.md)"


def _help_epilog() -> str:
    lines = ["stages:"] + [f"  {k:<14}{v[1]}" for k, v in STAGES.items()]
    lines.append(f"  {'all':<14}{ALL_HELP}")
    lines += [
        "",
        "overrides: dotted keys, e.g. student.path=/ckpt/Qwen3-4B mesh.fsdp=4",
        "with no --config and no overrides, a stage runs on the embedded tiny default",
        "",
        "security: evaluate.scorer=package.module:function imports and runs that function,",
        "  named by the config, in worker processes with your privileges: run only configs",
        "  you trust (docs/evaluate.md)",
        "one run at a time per run_dir: a second launcher on it stops at once (run_dir/.lock)",
    ]
    return "\n".join(lines)


def maybe_initialize_distributed() -> None:
    """Start jax.distributed when this is one of several processes.

    Explicit coordinator (CPU/GPU clusters): DASD_COORDINATOR=host:port,
    DASD_NUM_PROCESSES, DASD_PROCESS_ID. TPU pods: set DASD_DISTRIBUTED=1 and JAX detects the
    slice itself.
    """
    import jax

    if os.environ.get("DASD_COORDINATOR"):
        # Must precede initialize(), and must not query the backend first (that would
        # initialise it single-process). Only CPU collectives read this option.
        jax.config.update(
            "jax_cpu_collectives_implementation", os.environ.get("DASD_CPU_COLLECTIVES", "gloo")
        )
        jax.distributed.initialize(
            coordinator_address=os.environ["DASD_COORDINATOR"],
            num_processes=int(os.environ["DASD_NUM_PROCESSES"]),
            process_id=int(os.environ["DASD_PROCESS_ID"]),
        )
    elif os.environ.get("DASD_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def stage_run(stage: str):
    """The `run(cfg)` of a stage's module."""
    return importlib.import_module(STAGES[stage][0]).run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dasd_jax.launch",
        description="DASD pipeline in JAX: run one stage.",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stage",
        required=True,
        choices=[*STAGES, "all"],
        metavar="STAGE",
        help="one of: " + ", ".join([*STAGES, "all"]),
    )
    parser.add_argument("--config", default=None, help="YAML file of config differences")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo a complete step whose inputs or config changed (its outputs are moved "
        "aside); with --stage=all, also every later step",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: overrides may come before, between and after the flags, as the docs write
    # them (`--stage=3 $T key=value` with --config= inside $T). Unknown flags are still errors.
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("jax", "absl", "orbax", "grain"):  # backend probing etc.
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    maybe_initialize_distributed()
    from dasd_jax import pipeline, runlock

    try:
        if args.stage == "all":
            summary = pipeline.run_all(args.config, args.overrides, stage_run, force=args.force)
        else:
            step, cfg = pipeline.single_step(args.stage, cfg, args.config, args.overrides)
            summary = pipeline.run_step(cfg, step, stage_run(args.stage), force=args.force)
            print(json.dumps(summary, indent=2, default=str))
    except (pipeline.PipelineError, runlock.RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # 143 (128 + SIGTERM) tells launch/qr_resume.sh the stage stopped for a preemption and
    # saved its state, so the same command should run again.
    return 143 if isinstance(summary, dict) and summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
