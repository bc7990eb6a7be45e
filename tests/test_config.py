"""The strictness hjepa.config adds on top of fastargs 1.2.0 (see ../shared/notes/stack.md)."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from hjepa.config import config_as_dict, load_config, parse_argv, save_config
from hjepa.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_load_without_touching_sys_argv():
    cfg = load_config()
    assert cfg["data.batch_size"] == 256
    assert cfg["model.level_weights"] == [1.0, 0.5, 0.25]
    assert cfg["model.level_depths"] == []


def test_command_line_overrides_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 32\n  image_size: 64\n")
    cfg = load_config(argv=["--config-file", str(path), "--data.batch_size=16"])
    assert cfg["data.batch_size"] == 16
    assert cfg["data.image_size"] == 64


def test_unknown_command_line_key_names_the_closest_valid_one():
    with pytest.raises(UserError, match=r"'data\.batchsize'.*did you mean 'data\.batch_size'"):
        load_config(argv=["--data.batchsize=3"])


def test_unknown_yaml_key_names_the_file_and_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(UserError, match=r"'optim\.weight_decy' in .*typo\.yaml.*'optim\.weight_decay'"):
        load_config(config_files=[str(path)])


@pytest.mark.parametrize("text,expected", [("0", False), ("1", True), ("false", False), ("True", True)])
def test_boolean_accepts_only_0_1_true_false(text, expected):
    assert load_config(argv=[f"--data.flip={text}"])["data.flip"] is expected


@pytest.mark.parametrize("text", ["False2", "yes", "2", ""])
def test_boolean_rejects_anything_else(text):
    with pytest.raises(UserError, match="data.flip"):
        load_config(argv=[f"--data.flip={text}"])


def test_validation_failure_names_param_and_expectation():
    with pytest.raises(UserError, match=r"data\.batch_size='0'.*integer >= 1"):
        load_config(argv=["--data.batch_size=0"])
    with pytest.raises(UserError, match=r"data\.order='sideways'.*one of"):
        load_config(argv=["--data.order=sideways"])
    with pytest.raises(UserError, match=r"data\.image_size='3\.5'"):
        load_config(argv=["--data.image_size=3.5"])


def test_yaml_that_builds_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(config_files=[str(path)])


def test_parse_argv_accepts_both_spellings():
    files, overrides = parse_argv(["-C", "a.yaml", "--config-file=b.yaml", "--x.y", "3", "--z.w=4"])
    assert files == ["a.yaml", "b.yaml"]
    assert overrides == {"x.y": "3", "z.w": "4"}


def test_user_error_exits_with_status_1_and_one_line(capsys):
    @exit_on_user_error
    def main():
        load_config(argv=["--data.batchsize=3"])

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown config key")


def test_saved_config_round_trips_as_json(tmp_path):
    cfg = load_config(argv=["--data.batch_size=8"])
    save_config(cfg, tmp_path / "params.json")
    reloaded = load_config(config_files=[str(tmp_path / "params.json")])
    assert config_as_dict(reloaded) == config_as_dict(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "rn_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_with_no_unknown_key(path):
    load_config(config_files=[str(path)])


def test_config_typo_on_a_real_entry_point_exits_1():
    proc = subprocess.run([sys.executable, "hjepa/train.py", "--data.batchsize=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "did you mean 'data.batch_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _package_name(requirement):
    return re.split(r"[<>=!\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_package_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = set()
    for dep in env["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else [dep]:
            listed.add(_package_name(item))
    conda_names = {"pytorch": "torch"}
    listed = {conda_names.get(name, name) for name in listed}
    assert wanted <= listed, f"environment.yml lacks {sorted(wanted - listed)}"
