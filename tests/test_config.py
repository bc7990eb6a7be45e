"""The strictness hjepa.config adds on top of fastargs 1.2.0, layered config files, and what entry points show."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import dataclasses

from hjepa.config import config_as_dict, config_from_cli, help_text, load_config, parse_argv, save_config
from hjepa.masks import MaskConfig
from hjepa.model import ModelConfig
from hjepa.schedules import OptimConfig
from hjepa.sections import mask_config, model_config, optim_config
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


# ----------------------------------------------------------------------------------------------
# Layered config files


def test_a_file_inherits_its_parent_and_overrides_only_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  batch_size: 32\n  image_size: 64\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("inherit: ../base.yaml\ndata:\n  batch_size: 8\n")
    cfg = load_config(config_files=[str(tmp_path / "sub" / "child.yaml")])
    assert (cfg["data.batch_size"], cfg["data.image_size"]) == (8, 64)


def test_repeated_config_files_apply_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  batch_size: 32\n  image_size: 64\n")
    (tmp_path / "b.yaml").write_text("data:\n  batch_size: 8\n")
    cfg = load_config(argv=["-C", str(tmp_path / "a.yaml"), "--config-file", str(tmp_path / "b.yaml")])
    assert (cfg["data.batch_size"], cfg["data.image_size"]) == (8, 64)


def test_a_parent_shared_by_two_branches_is_applied_once_first(tmp_path):
    (tmp_path / "root.yaml").write_text("data:\n  batch_size: 32\n  image_size: 64\n")
    (tmp_path / "left.yaml").write_text("inherit: root.yaml\ndata:\n  batch_size: 8\n")
    (tmp_path / "right.yaml").write_text("inherit: root.yaml\ndata:\n  image_size: 96\n")
    (tmp_path / "both.yaml").write_text("inherit: [left.yaml, right.yaml]\n")
    cfg = load_config(config_files=[str(tmp_path / "both.yaml")])
    assert (cfg["data.batch_size"], cfg["data.image_size"]) == (8, 96)


def test_unknown_key_in_an_inherited_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  weight_decy: 0.1\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\n")
    with pytest.raises(UserError, match=r"'optim\.weight_decy' in .*base\.yaml.*'optim\.weight_decay'"):
        load_config(config_files=[str(tmp_path / "child.yaml")])


def test_an_inherit_cycle_is_one_error_naming_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(UserError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(config_files=[str(tmp_path / "a.yaml")])


def test_a_missing_parent_is_one_error_naming_both_files(tmp_path):
    (tmp_path / "child.yaml").write_text("inherit: gone.yaml\n")
    with pytest.raises(UserError, match=r"gone\.yaml \(inherited by .*child\.yaml\) not found"):
        load_config(config_files=[str(tmp_path / "child.yaml")])


@pytest.mark.parametrize("name", ["h100_100ep.yaml", "multi_dataset_100ep.yaml"])
def test_shipped_variants_inherit_the_complete_a100_recipe(name):
    tree = yaml.safe_load((ROOT / "rn_configs" / name).read_text())
    assert tree["inherit"] == "a100_100ep.yaml"
    own = {f"{s}.{k}" for s, params in tree.items() if s != "inherit" for k in params}
    base = config_as_dict(load_config(config_files=[str(ROOT / "rn_configs" / "a100_100ep.yaml")]))
    merged = config_as_dict(load_config(config_files=[str(ROOT / "rn_configs" / name)]))
    differing = {f"{s}.{k}" for s in merged for k in merged[s] if merged[s][k] != base[s][k]}
    assert differing and differing <= own


# ----------------------------------------------------------------------------------------------
# What an entry point shows: --help, --print-config


def test_help_lists_only_the_sections_and_keys_a_tool_reads():
    text = help_text("Train.", reads=("data", "model"))
    assert "--data.batch_size" in text and "--model.arch" in text
    assert "--optim." not in text and "--eval." not in text and "--cfg." not in text
    probe_text = help_text("Probe.", reads=("eval", "model.arch"))
    assert "--model.arch" in probe_text and "--model.patch_size" not in probe_text


def test_print_config_is_yaml_that_loads_back_to_the_same_values(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("model:\n  level_weights: '1.0,0.5'\n  num_levels: 2\n")
    argv = ["-C", str(tmp_path / "base.yaml"), "--data.batch_size=8", "--print-config"]
    with pytest.raises(SystemExit) as exit_info:
        config_from_cli("Tool.", argv, reads=("data", "model"))
    assert exit_info.value.code == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    printed = yaml.safe_load((tmp_path / "printed.yaml").read_text())
    assert set(printed) == {"data", "model"}
    expected = config_as_dict(load_config(argv=argv[:-1]), ("data", "model"))
    assert config_as_dict(load_config(config_files=[str(tmp_path / "printed.yaml")]), ("data", "model")) == expected


def test_a_range_is_one_key_with_two_values_in_yaml_and_on_the_command_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("masking:\n  target_scale: [0.1, 0.25]\n")
    cfg = load_config(argv=["--config-file", str(path), "--data.crop_scale=0.3,1.0"])
    assert cfg["masking.target_scale"] == (0.1, 0.25)
    assert cfg["data.crop_scale"] == (0.3, 1.0)


@pytest.mark.parametrize("bad", ["0.3", "0.5,0.3", "0.1,0.2,0.3", "a,b"])
def test_a_range_needs_two_ordered_numbers(bad):
    with pytest.raises(UserError, match="data.crop_scale"):
        load_config(argv=[f"--data.crop_scale={bad}"])


@pytest.mark.parametrize("old,new", [("data.crop_scale_min", "data.crop_scale"),
                                     ("masking.target_aspect_max", "masking.target_aspect"),
                                     ("masking.context_scale_min", "masking.context_scale")])
def test_an_old_min_max_key_is_an_error_naming_its_replacement(old, new):
    with pytest.raises(UserError, match=rf"'{old}'.*removed.*use {new}: \[lo, hi\]"):
        load_config(argv=[f"--{old}=0.5"])


@pytest.mark.parametrize("build,section,cls", [(model_config, "model", ModelConfig),
                                               (mask_config, "masking", MaskConfig),
                                               (optim_config, "optim", OptimConfig)])
def test_each_typed_config_takes_every_field_from_its_section(build, section, cls):
    cfg = load_config(argv=["--data.image_size=96", "--model.num_levels=2", "--model.level_weights=1,0.25",
                            "--masking.target_scale=0.1,0.3", "--optim.lr=0.002"])
    values = {f.name: cfg["data.image_size"] if f.name == "image_size" else cfg[f"{section}.{f.name}"]
              for f in dataclasses.fields(cls)}
    assert build(cfg) == cls(**values)
    assert build(cfg) != cls()  # the overrides above reached it


def test_model_config_round_trips_through_its_checkpoint_record():
    config = model_config(load_config(argv=["--model.num_levels=2", "--model.level_weights=1,0.5",
                                            "--model.level_depths=6,12"]))
    record = config.as_record()
    assert record["level_depths"] == [6, 12] and record["level_weights"] == [1.0, 0.5]
    assert ModelConfig.from_record(record) == config
    with pytest.raises(UserError, match="unknown keys hidden_dim"):
        ModelConfig.from_record({**record, "hidden_dim": 3})
