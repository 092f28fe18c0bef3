"""Config: every shipped YAML loads; overrides; unknown keys and bad values are named."""

from pathlib import Path

import pytest
import yaml

from dasd_jax import launch
from dasd_jax.config import Config, ConfigError, load_config, to_dict, to_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # YAML holds only differences: re-dumping and re-loading gives the same config
    again = load_config(None, [f"{k}={v}" for k, v in _flat(to_dict(cfg)).items()])
    assert again == cfg


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:  # the value as YAML flow text, as a user would type it
            out[f"{prefix}{k}"] = yaml.safe_dump(v, default_flow_style=True).splitlines()[0]
    return out


def test_defaults_and_overrides():
    cfg = load_config(
        None,
        [
            "select.beta=0.05",
            "mesh.fsdp=4",
            "student.path=/x/y",
            "select.splitter.kind=newline",
            "filters.tool_markers=[a, b]",
            "select.budget=50000",
            "run_dir=2026",
        ],
    )
    assert cfg.select.beta == 0.05 and cfg.mesh.fsdp == 4 and cfg.student.path == "/x/y"
    assert cfg.select.splitter.kind == "newline"
    assert cfg.filters.tool_markers == ("a", "b")
    assert cfg.select.budget == 50000 and cfg.run_dir == "2026"
    assert load_config(None, ["select.beta=1e-1"]).select.beta == 0.1  # YAML reads 1e-1 as str
    assert load_config().select.budget is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("select.betta=1", "unknown key select.betta"),
        ("nope=1", "unknown key nope"),
        ("mesh.data=x", "mesh.data: expected int"),
        ("select.rule=best", "select.rule: 'best' is not one of"),
        ("filters.max_tokens=0", "filters.max_tokens must be >= 1"),
        ("score.on_bad_row", "is not key=value"),
        ("filters.length=maybe", "filters.length: expected true/false"),
        ("student.path=...", r"override student.path: '\.\.\.' is not a YAML value"),
        ("sample.stop=[a", "override sample.stop: '\\[a' is not a YAML value"),
        ("bad_rows.max_bad_fraction=2", "max_bad_fraction must be in \\[0, 1\\]"),
        ("bad_rows.on_bad_row=maybe", "on_bad_row must be error or skip"),
        ("score.on_bad_row=never", "score.on_bad_row must be one of"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("score:\n  batch_tokenz: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key score\.batch_tokenz"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_launch_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage, (_, line) in launch.STAGES.items():
        assert stage in out and line in out


def test_launch_print_config_and_config_errors(capsys):
    assert launch.main(["--stage=score", "--print-config", "select.beta=0.2"]) == 0
    assert "beta: 0.2" in capsys.readouterr().out
    assert launch.main(["--stage=score", "score.nope=1"]) == 2
    assert "unknown key score.nope" in capsys.readouterr().err
    assert "select:" in to_yaml(load_config())
