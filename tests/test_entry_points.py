"""The command-line tools: each runs by path and as `python -m`, and its --help shows what it reads.

Each tool's main(argv) runs in this process (imports are paid once, as by the other test files); one
real process checks the `python -m` form.
"""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SECTIONS = {"data", "model", "masking", "optim", "training", "hardware", "logging"}
WRITERS = sorted(p.stem for p in (ROOT / "write_datasets").glob("*.py") if p.stem != "__init__")

# module -> the sections its --help must list, exactly
HELP_SECTIONS = {
    "hjepa.train": TRAIN_SECTIONS,
    "eval.linear_probe": {"eval", "model", "data", "logging"},
    "eval.export": {"eval"},
    "bench.train_throughput": {"data", "model", "masking", "hardware", "bench"},
    "bench.loader_throughput": {"bench", "data", "cfg"},
    **{f"write_datasets.{name}": {"cfg"} for name in WRITERS},
}


def output_of(module, argv, capsys):
    """stdout of `python -m <module> *argv`, which must exit with status 0, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(HELP_SECTIONS))
def test_help_lists_exactly_the_sections_the_tool_reads(module, capsys):
    keys = re.findall(r"^  --(\w+)\.(\w+)", output_of(module, ["--help"], capsys), flags=re.M)
    assert {section for section, _ in keys} == HELP_SECTIONS[module]


def test_probe_help_lists_only_the_model_keys_the_probe_reads(capsys):
    text = output_of("eval.linear_probe", ["--help"], capsys)
    assert "--model.arch" in text and "--model.patch_size" in text
    assert "--model.predictor_depth" not in text and "--data.batch_size" not in text


def test_no_module_of_the_package_shadows_a_standard_library_module():
    # `python hjepa/train.py` puts hjepa/ first on sys.path, where a hjepa/<stdlib name>.py would
    # replace the standard module for every import in the process.
    names = {p.stem for p in (ROOT / "hjepa").glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_writer_runs_as_a_module():
    proc = run("-m", "write_datasets.imagenet100", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--cfg.data_dir" in proc.stdout and "--data." not in proc.stdout


def test_print_config_of_the_h100_recipe_shows_a100_merged_with_its_overrides(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented command runs from the repository root
    printed = yaml.safe_load(output_of("hjepa.train", ["--config-file", "rn_configs/h100_100ep.yaml",
                                                       "--print-config"], capsys))
    assert set(printed) == TRAIN_SECTIONS
    assert printed["data"]["num_workers"] == 15 and printed["hardware"]["peak_tflops"] == 989  # its own
    assert printed["model"]["arch"] == "vit_small" and printed["optim"]["lr"] == 0.0005  # from a100_100ep.yaml
