"""Typed configuration: frozen dataclasses, YAML files of differences, dotted overrides.

Consumes an optional YAML file (only the keys that differ from the defaults below) and
`key.sub=value` overrides from the command line; produces one frozen `Config`. Unknown keys
and ill-typed values are errors that name the key (and the file). Architecture numbers are
never configured here: they come from each checkpoint's config.json.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dasd_jax.evaluate.config import EvaluateConfig, check_scorer_spec
from dasd_jax.export import ExportConfig
from dasd_jax.mixed_policy.config import MixedPolicyConfig
from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.records import BadRowPolicy
from dasd_jax.sample.config import SampleConfig
from dasd_jax.select.das import SelectConfig
from dasd_jax.select.filters import FilterConfig
from dasd_jax.sharding import MeshConfig
from dasd_jax.train.config import StageConfig, TrainConfig, default_stage


@dataclass(frozen=True)
class ModelConfig:
    """Where a model's HF folder is, and how to run it."""

    path: str = ""  # Hugging Face folder; "" = the embedded tiny model (CPU demo)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # weights in memory
    attention: str = "auto"  # auto | xla | cudnn | splash
    remat: str = "none"  # none | full | dots

    def options(self) -> ModelOptions:
        return ModelOptions(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention=self.attention,
            remat=self.remat,
        )


@dataclass(frozen=True)
class ScoreConfig:
    """The `score` stage: per-token log-probs of responses under the student."""

    input: str = ""  # rows or a folder; "" = <run_dir>/sample once sampled there, else demo rows
    prompt_field: str = "input"  # released SFT data: uuid, input, output
    response_field: str = "output"
    id_field: str = "uuid"
    system_prompt: str = "You are a helpful assistant."
    max_tokens: int = 65536  # prompt + response, student tokens; longer rows are rejected
    batch_tokens: int = 16384  # tokens per forward batch (rows x padded length)
    bucket_multiple: int = 128  # padded lengths are multiples of this (fewer compiles)
    chunk_size: int = 1024  # fp32 logit rows (rows per device x positions) per log-prob chunk
    rows_per_shard: int = 256  # output is written in atomic shards of this many rows
    on_bad_row: str = ""  # "" = bad_rows.on_bad_row | error | skip (to rejects.*.jsonl)
    # --- inputs (docs/score.md): released SFT rows, Candidate JSONL or OpenAI server dumps
    input_format: str = "auto"  # auto | sft | candidates | openai
    domain_field: str = "domain"
    answer_field: str = ""  # top-level field with a reference answer (math filter); "" none
    temperature: float | None = None  # sampling temperature of rows that do not say (e.g. 0.6)
    teacher_logprobs: str = ""  # released log-prob JSONL (sample_uuid, token_ids, logprobs)
    teacher_tokenizer: str = ""  # folder for teacher token ids; "" = teacher.path or gpt-oss
    index_dir: str = ""  # cache of the log-prob join index; "" = <run_dir>/cache
    # --- teacher forward passes
    teacher_scoring: str = "missing"  # missing (when no log-probs) | always | never
    teacher_template: str = "auto"  # auto (gpt_oss -> harmony, else chatml) | chatml | harmony
    teacher_reasoning_effort: str = "medium"  # harmony system block (gpt-oss teacher)

    def __post_init__(self) -> None:
        choices = {
            "on_bad_row": ("", "error", "skip"),
            "input_format": ("auto", "sft", "candidates", "openai"),
            "teacher_scoring": ("missing", "always", "never"),
            "teacher_template": ("auto", "chatml", "harmony"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"score.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in (
            "max_tokens",
            "batch_tokens",
            "bucket_multiple",
            "chunk_size",
            "rows_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"score.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SelectStageConfig:
    """The `select` stage's files and report (selection itself: `select.*`, `filters.*`)."""

    input: str = ""  # folder of scored Candidate shards; "" = <run_dir>/score
    output: str = ""  # "" = <run_dir>/select
    records_per_file: int = 50000  # SFTRecords per ArrayRecord file
    source: str = ""  # SFTRecord.source; "" = low_t / high_t by temperature (else "unknown")
    high_t_from: float = 0.8  # temperature from which a sample counts as high_t
    # all | low_t (T < high_t_from) | high_t: the candidates considered; the others are
    # counted as other_temperature (the pipeline runs select once per class)
    temperatures: str = "all"
    on_bad_row: str = ""  # "" = bad_rows.on_bad_row | error | skip (to rejects.jsonl)
    report: bool = True  # report.md + PNG plots (matplotlib) besides summary.json
    scatter_points: int = 20000  # sentences kept (seeded reservoir) for the p_T vs p_S plot
    # who judges candidates correct for the report's Figure 6 table (docs/select_stage.md):
    # "" = filters.answer's verdicts when that filter is on, else math on the embedded default
    # (student.path ""), else nobody | none | math | choice | "package.module:function" (a
    # scorer, docs/evaluate.md) on every scored candidate with a reference_answer
    judge: str = ""
    judge_timeout_s: float = 10.0  # per candidate, for a judge scorer (+ 2 s, then killed)
    judge_workers: int = 2  # judge scorer processes; 0 = in this process

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("", "error", "skip"):
            raise ValueError(
                f"select_stage.on_bad_row must be '', error or skip, got {self.on_bad_row!r}"
            )
        if self.temperatures not in ("all", "low_t", "high_t"):
            raise ValueError(
                f"select_stage.temperatures must be all, low_t or high_t, got {self.temperatures!r}"
            )
        if self.records_per_file < 1 or self.scatter_points < 0:
            raise ValueError("select_stage.records_per_file must be >= 1, scatter_points >= 0")
        if self.judge not in ("", "none"):
            try:
                check_scorer_spec(self.judge)
            except ValueError:
                raise ValueError(
                    "select_stage.judge must be '', none, math, choice or "
                    f"'package.module:function', got {self.judge!r}"
                ) from None
        if not (math.isfinite(self.judge_timeout_s) and self.judge_timeout_s > 0):
            raise ValueError(
                f"select_stage.judge_timeout_s must be a finite number > 0, "
                f"got {self.judge_timeout_s!r}"
            )
        if self.judge_workers < 0:
            raise ValueError(f"select_stage.judge_workers must be >= 0, got {self.judge_workers}")


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    bad_rows: BadRowPolicy = field(default_factory=BadRowPolicy)  # every stage's bad rows
    mesh: MeshConfig = field(default_factory=MeshConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)  # scores when log-probs missing
    sample: SampleConfig = field(default_factory=SampleConfig)  # teacher sampling
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select_stage: SelectStageConfig = field(default_factory=SelectStageConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # shared by SFT stages 1-3
    stage1: StageConfig = field(default_factory=lambda: default_stage(1))
    stage2: StageConfig = field(default_factory=lambda: default_stage(2))
    stage3: StageConfig = field(default_factory=lambda: default_stage(3))
    mixed_policy: MixedPolicyConfig = field(default_factory=MixedPolicyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


class ConfigError(ValueError):
    pass


# --------------------------------------------------------------------------- loading


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{where}{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return _build(tp, value, f"{key}.", where)
    if origin is dict:  # name -> section, e.g. stage2.sources
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        item = typing.get_args(tp)[1]
        return {str(k): _coerce(v, item, f"{key}.{k}", where) for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_coerce(v, item, key, where) for v in value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. run_dir=2024 on the command line
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (isinstance(value, bool) or not isinstance(value, tp)):
        raise ConfigError(f"{where}{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, data: dict[str, Any], prefix: str = "", where: str = ""):
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}unknown key {prefix}{unknown[0]!s} (valid under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(types_))})"
        )
    data = dict(data)
    for f in dataclasses.fields(cls):  # a section given in part keeps its field's defaults
        if f.name in data and isinstance(data[f.name], dict) and callable(f.default_factory):
            default = f.default_factory()  # e.g. stage2's own default sources
            if dataclasses.is_dataclass(default):
                data[f.name] = _merge(to_dict(default), data[f.name])
    kwargs = {k: _coerce(v, types_[k], prefix + k, where) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a section's own validation (__post_init__)
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: {e}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"override {key}: {raw!r} is not a YAML value ({reason})") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _yaml_reason(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' of a YAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=Config):
    """Defaults <- YAML file <- dotted overrides, validated against the dataclasses."""
    data: dict[str, Any] = {}
    where = ""
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_reason(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
        where = f"{path}: "
    cfg = _build(cls, data, "", where)
    over: dict[str, Any] = {}
    for item in overrides:
        over = _merge(over, parse_override(item))
    if over:
        merged = _merge(to_dict(cfg), over)
        # the file alone was valid (built above): what fails now is the overrides' doing
        cfg = _build(cls, merged, "", f"command line (over {path}): " if path else "command line: ")
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), e.g. for manifests and YAML dumps."""

    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
