"""bench/ablation.py: what a rerun skips, what it refuses to mix, how seeds are summarised, and one real run."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bench import seed_stats
from conftest import REPO_ROOT
from hjepa.beton import manifest_path
from hjepa.config import load_config
from hjepa.errors import UserError

_spec = importlib.util.spec_from_file_location("ablation", os.path.join(REPO_ROOT, "bench", "ablation.py"))
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)

VARIANTS = {"1 level": ["--model.num_levels=1", "--model.level_weights=1.0"],
            "2 levels": ["--model.num_levels=2", "--model.level_weights=1.0,0.5"]}


def record(variant, seed, top1, knn):
    return {"seed": seed, "overrides": VARIANTS.get(variant, []), "top1": top1, "knn_top1": knn}


def test_a_rerun_skips_every_recorded_run():
    plan = ablation.plan_runs(VARIANTS, [0, 1])
    assert plan[:4] == [(ablation.RANDOM_INIT, 0), (ablation.PIXELS, 0), ("1 level", 0), ("2 levels", 0)]
    results = {"runs": {ablation.result_key("1 level", 0): record("1 level", 0, 70.0, 60.0),
                        ablation.result_key(ablation.PIXELS, 0): record(ablation.PIXELS, 0, 75.0, 80.0),
                        ablation.result_key(ablation.RANDOM_INIT, 1): record(ablation.RANDOM_INIT, 1, 60.0, 50.0)}}
    assert ablation.pending(plan, results) == [(ablation.RANDOM_INIT, 0), ("2 levels", 0), (ablation.PIXELS, 1),
                                               ("1 level", 1), ("2 levels", 1)]


def test_recorded_runs_with_other_overrides_are_refused():
    results = {"path": "results.json", "runs": {ablation.result_key("1 level", 0): record("1 level", 0, 70.0, 60.0)}}
    changed = {**VARIANTS, "1 level": ["--model.num_levels=1", "--model.level_weights=2.0"]}
    ablation.check_recorded(results, VARIANTS, {"config": "a.yaml"})  # same overrides: fine
    with pytest.raises(UserError, match="1 level"):
        ablation.check_recorded(results, changed, {"config": "a.yaml"})


def test_the_config_digest_follows_the_values_not_the_file(tmp_path):
    base = open(os.path.join(REPO_ROOT, "rn_configs", "cpu_demo.yaml")).read()
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "copy.yaml").write_text(base)
    (tmp_path / "edited.yaml").write_text(base.replace("epochs: 60", "epochs: 61"))
    digest = {name: ablation.config_digest(load_config([str(tmp_path / f"{name}.yaml")]))
              for name in ("a", "copy", "edited")}
    assert digest["a"] == digest["copy"]  # the same values from another file
    assert digest["a"] != digest["edited"]  # one value changed in the file: a resume must refuse it
    assert ablation.config_digest(load_config([str(tmp_path / "a.yaml")], argv=["--training.epochs=61"])) == digest["edited"]


def test_recorded_runs_with_other_base_settings_are_refused():
    results = {"path": "results.json", "settings": {"config": "a.yaml"}, "runs": {}}
    with pytest.raises(UserError, match="other settings"):
        ablation.check_recorded(results, VARIANTS, {"config": "b.yaml"})


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = {ablation.result_key("1 level", s): record("1 level", s, top1, 50.0) for s, top1 in enumerate([70.0, 72.0, 74.0])}
    runs[ablation.result_key("2 levels", 0)] = record("2 levels", 0, 80.0, 60.0)
    table = seed_stats.summarize(runs, ["1 level", "2 levels", "3 levels"])
    assert table["1 level"]["top1"] == pytest.approx((72.0, 2.0, 3))
    assert table["2 levels"]["knn_top1"] == (60.0, 0.0, 1)
    assert "3 levels" not in table


def test_paired_differences_subtract_the_reference_at_the_seeds_both_have():
    runs = {ablation.result_key("1 level", s): record("1 level", s, top1, 50.0) for s, top1 in enumerate([70.0, 72.0, 74.0])}
    runs.update({ablation.result_key("2 levels", s): record("2 levels", s, top1, 52.0) for s, top1 in [(0, 71.0), (2, 78.0)]})
    runs[ablation.result_key("3 levels", 5)] = record("3 levels", 5, 90.0, 90.0)  # no seed in common
    table = seed_stats.paired_differences(runs, ["1 level", "2 levels", "3 levels"], "1 level")
    assert list(table) == ["2 levels"]
    mean, std, n, per_seed, _ = table["2 levels"]["top1"]
    assert (mean, n, per_seed) == (2.5, 2, {0: 1.0, 2: 4.0})
    assert std == pytest.approx(2.1213203)  # sample std of (1, 4)
    assert table["2 levels"]["knn_top1"][:3] == (2.0, 0.0, 2)
    assert "+2.5" in seed_stats.format_table(table, signed=True)
    assert table["2 levels"]["top1"][4] == 0.5  # of (±1, ±4) only +1+4 and -1-4 reach |sum| 5


@pytest.mark.parametrize("differences, p", [
    ([1.0, 1.0, 1.0], 2 / 8),          # only all-positive and all-negative reach |mean| 1
    ([3.0, 1.0, 1.0, 1.0], 2 / 16),    # flipping any one sign lowers |sum| below 6
    ([1.0, 1.0, 0.0], 4 / 8),          # a zero difference's sign changes nothing: ++ and -- of the others
    ([1.0, -1.0], 1.0),                # observed mean 0: every assignment is as far from 0
    ([0.5], 1.0),
])
def test_sign_flip_p_is_the_share_of_sign_assignments_at_least_as_extreme(differences, p):
    assert seed_stats.sign_flip_p(differences) == pytest.approx(p)


def test_sign_flip_p_of_many_seeds_samples_assignments_close_to_the_exact_value():
    differences = [float(d) for d in np.random.default_rng(3).normal(0.5, 1.0, size=17)]
    signs = 1 - 2 * ((np.arange(2 ** 17)[:, None] >> np.arange(17)) & 1)  # every assignment of 17 seeds
    exact = np.mean(np.abs(signs @ differences) >= abs(sum(differences)) - 1e-9)
    assert seed_stats.sign_flip_p(differences) == seed_stats.sign_flip_p(differences)  # a fixed generator
    assert seed_stats.sign_flip_p(differences) == pytest.approx(exact, abs=0.005)


def write_results(folder, runs, train="a.beton", set_=""):
    os.makedirs(folder, exist_ok=True)
    ablation.save_results({"runs": runs, "settings": {"train": train, "val": "b.beton", "set": set_, "probe_set": ""},
                           "variants": {name: VARIANTS[name] for name in VARIANTS}, "commit": "0123456789abcdef"},
                          os.path.join(folder, "results.json"))


def test_report_merges_the_seeds_of_several_folders_and_trains_nothing(tmp_path, capsys):
    write_results(tmp_path / "a", {ablation.result_key(v, s): record(v, s, top1 + s, 50.0)
                                   for s in (0, 1) for v, top1 in (("1 level", 70.0), ("2 levels", 71.0))})
    write_results(tmp_path / "b", {ablation.result_key(v, 2): record(v, 2, top1, 50.0)
                                   for v, top1 in (("1 level", 70.0), ("2 levels", 74.0))})
    table, reference, paired = ablation.main(["--report", str(tmp_path / "a"), str(tmp_path / "b")])
    assert reference == "1 level" and table["2 levels"]["top1"][2] == 3
    assert paired["2 levels"]["top1"][3] == {0: 1.0, 1: 1.0, 2: 4.0}
    assert "p: sign-flip test" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "a" / "runs")


def test_report_refuses_folders_of_other_betons_or_a_seed_recorded_twice(tmp_path):
    runs = {ablation.result_key("1 level", 0): record("1 level", 0, 70.0, 50.0)}
    write_results(tmp_path / "a", runs)
    write_results(tmp_path / "b", runs)
    write_results(tmp_path / "c", {ablation.result_key("1 level", 1): record("1 level", 1, 70.0, 50.0)}, train="x.beton")
    with pytest.raises(UserError, match="again"):
        ablation.merged_runs([str(tmp_path / "a"), str(tmp_path / "b")])
    # Baselines: each folder probes them at its own seeds; the same figures are one measurement.
    baseline = {ablation.result_key(ablation.RANDOM_INIT, 0): record(ablation.RANDOM_INIT, 0, 60.0, 40.0)}
    write_results(tmp_path / "d", {**baseline, ablation.result_key("2 levels", 0): record("2 levels", 0, 71.0, 50.0)})
    write_results(tmp_path / "e", {**baseline, **runs})
    merged, _ = ablation.merged_runs([str(tmp_path / "d"), str(tmp_path / "e")])
    assert len(merged) == 3
    # ... and where only the later folder scored it on a test beton, the merged record keeps those scores.
    tested = {"test": "/b/t.beton", "test_top1": 58.0, "test_knn_top1": 39.0}
    write_results(tmp_path / "g", {key: {**r, **tested} for key, r in baseline.items()})
    merged, _ = ablation.merged_runs([str(tmp_path / "d"), str(tmp_path / "g")])
    assert merged[ablation.result_key(ablation.RANDOM_INIT, 0)]["test_top1"] == 58.0
    write_results(tmp_path / "f", {ablation.result_key(ablation.RANDOM_INIT, 0): record(ablation.RANDOM_INIT, 0, 61.0, 40.0)})
    with pytest.raises(UserError, match="again"):
        ablation.merged_runs([str(tmp_path / "d"), str(tmp_path / "f")])
    with pytest.raises(UserError, match="train 'x.beton' against 'a.beton'"):
        ablation.merged_runs([str(tmp_path / "a"), str(tmp_path / "c")])


def test_report_refuses_folders_trained_with_other_settings_or_other_overrides_under_one_name(tmp_path):
    write_results(tmp_path / "a", {ablation.result_key("1 level", 0): record("1 level", 0, 70.0, 50.0)})
    write_results(tmp_path / "b", {ablation.result_key("1 level", 1): record("1 level", 1, 70.0, 50.0)},
                  set_="--training.epochs=110")
    other = {**record("1 level", 2, 70.0, 50.0), "overrides": ["--model.num_levels=1"]}
    write_results(tmp_path / "c", {ablation.result_key("1 level", 2): other})
    with pytest.raises(UserError, match="set '--training.epochs=110'"):
        ablation.merged_runs([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(UserError, match="other overrides|has overrides"):
        ablation.merged_runs([str(tmp_path / "a"), str(tmp_path / "c")])


def test_report_with_training_arguments_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="without --train --seeds"):
        ablation.parse_args(["--report", str(tmp_path), "--train", "a.beton", "--seeds", "1"])
    with pytest.raises(UserError, match="--train --val --out missing"):
        ablation.parse_args(["--config", "c.yaml"])


@pytest.mark.parametrize("spec", ["no equals sign", "x=--model.num_levels", "x=num_levels=1",
                                  "random init=--model.num_levels=1", "raw pixels=--model.num_levels=1"])
def test_malformed_variants_are_user_errors(spec):
    with pytest.raises(UserError):
        ablation.parse_variants([spec], None)


def test_variants_from_the_command_line_replace_the_default_set():
    assert ablation.parse_variants([], None) == ablation.DEFAULT_VARIANTS
    assert ablation.parse_variants(["deep=--model.predictor_depth=4"], None) == {"deep": ["--model.predictor_depth=4"]}


def test_saving_keeps_runs_another_process_recorded_in_the_same_folder(tmp_path):
    path = str(tmp_path / "results.json")
    ablation.save_results({"runs": {ablation.result_key("1 level", 1): record("1 level", 1, 71.0, 61.0)}}, path)
    ours = {"runs": {ablation.result_key("1 level", 0): record("1 level", 0, 70.0, 60.0)}}
    ablation.save_results(ours, path)
    with open(path) as f:
        assert sorted(json.load(f)["runs"]) == ["1 level|0", "1 level|1"]


def test_saving_keeps_the_test_scores_another_process_added_to_a_run_we_hold_without_them(tmp_path):
    path = str(tmp_path / "results.json")
    trained = record("1 level", 0, 70.0, 60.0)
    ablation.save_results({"runs": {"1 level|0": {**trained, "test": "/b/t.beton", "test_top1": 69.0,
                                                  "test_knn_top1": 58.0}}}, path)
    ablation.save_results({"runs": {"1 level|0": dict(trained)}}, path)  # a process that loaded it earlier
    with open(path) as f:
        assert json.load(f)["runs"]["1 level|0"] == {**trained, "test": "/b/t.beton", "test_top1": 69.0,
                                                     "test_knn_top1": 58.0}


@pytest.mark.parametrize("name, count", [("recipe_screen.yaml", 6), ("recipe_sweep.yaml", 20)])
def test_the_shipped_variant_files_are_valid_overrides_of_the_cpu_recipe(name, count):
    from hjepa.config import load_config

    variants = ablation.parse_variants([], os.path.join(REPO_ROOT, "bench", name))
    assert len(variants) == count
    for overrides in variants.values():
        load_config([os.path.join(REPO_ROOT, "rn_configs", "cpu_demo.yaml")], argv=overrides)  # raises on a typo


def test_the_command_trains_probes_and_records_from_relative_paths(tiny_beton, tmp_path):
    # Run from the caller's folder with relative paths, as a user would: the runs start in the
    # repository's folder, so the paths must be resolved before they do. --jobs 3: the three runs at
    # once, as users run it, and results.json must still gather all of them.
    shutil.copyfile(tiny_beton, tmp_path / "tiny.beton")
    shutil.copyfile(manifest_path(tiny_beton), manifest_path(str(tmp_path / "tiny.beton")))
    tiny = ("--set=--training.epochs=1 --training.max_steps=2 --data.batch_size=16 --data.image_size=32 "
            "--model.patch_size=8 --masking.min_keep=2")
    command = [sys.executable, os.path.join(REPO_ROOT, "bench", "ablation.py"), "--config",
               os.path.relpath(os.path.join(REPO_ROOT, "rn_configs", "cpu_demo.yaml"), tmp_path),
               "--train", "tiny.beton", "--val", "tiny.beton", "--out", "out", "--seeds", "0",
               "--variant", "1 level=--model.num_levels=1 --model.level_weights=1.0", tiny,
               "--probe-set=--eval.epochs=1 --eval.min_steps=1", "--no-progress", "--jobs", "3",
               "--speed-set=--hardware.num_threads=1 --data.num_workers=1 --eval.num_workers=1"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "out" / "results.json") as f:
        runs = json.load(f)["runs"]
    assert sorted(runs) == sorted(ablation.result_key(name, 0) for name in ("1 level", *ablation.BASELINES))
    assert all(0 <= run["top1"] <= 100 for run in runs.values())
    with open(tmp_path / "out" / "runs" / "raw_pixels-s0" / "probe.json") as f:
        pixels = json.load(f)
    assert (pixels["encoder"], pixels["feature_dim"]) == ("pixels", 3 * 32 * 32)  # the eval images, flattened
    assert (tmp_path / "out" / "ablation.png").is_file()

    # Given a test beton afterwards, it scores the recorded runs on it and trains nothing again. The
    # test beton here holds the val images, so the same probes must give the val figures again.
    shutil.copyfile(tiny_beton, tmp_path / "test.beton")
    shutil.copyfile(manifest_path(tiny_beton), manifest_path(str(tmp_path / "test.beton")))
    rerun = subprocess.run([*command, "--test", "test.beton"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "3 recorded, 0 to run, 3 recorded to score on the test beton" in rerun.stdout
    with open(tmp_path / "out" / "results.json") as f:
        rescored = json.load(f)
    for key, run in rescored["runs"].items():
        assert run["test"] == str(tmp_path / "test.beton")
        assert (run["test_top1"], run["test_knn_top1"]) == pytest.approx((runs[key]["top1"], runs[key]["knn_top1"]))
    with open(tmp_path / "out" / "runs" / "1_level-s0" / "train.log") as f:
        assert f.read().count("$ python hjepa/train.py") == 1  # trained once, by the first command
    assert "summary_test" in rescored and (tmp_path / "out" / "ablation_test.png").is_file()


def test_with_a_test_beton_runs_not_scored_on_it_are_pending_without_retraining():
    plan = ablation.plan_runs({"1 level": VARIANTS["1 level"]}, [0])
    scored = {**record("1 level", 0, 70.0, 60.0), "test": "/b/test.beton", "test_top1": 71.0, "test_knn_top1": 61.0}
    results = {"runs": {ablation.result_key("1 level", 0): scored,
                        ablation.result_key(ablation.PIXELS, 0): record(ablation.PIXELS, 0, 75.0, 80.0),
                        ablation.result_key(ablation.RANDOM_INIT, 0): {**scored, "test": "/b/other.beton"}}}
    assert ablation.pending(plan, results) == []  # no --test: everything is recorded
    assert ablation.pending(plan, results, "/b/test.beton") == [(ablation.RANDOM_INIT, 0), (ablation.PIXELS, 0)]


def test_test_set_tables_read_the_test_scores_of_the_runs_that_have_them():
    runs = {ablation.result_key("1 level", 0): {**record("1 level", 0, 70.0, 60.0), "test": "/b/t.beton",
                                                "test_top1": 72.5, "test_knn_top1": 65.0},
            ablation.result_key("1 level", 1): record("1 level", 1, 68.0, 58.0)}
    test, tested = ablation.on_test_set(runs)
    assert test == "/b/t.beton"
    assert list(tested) == [ablation.result_key("1 level", 0)]
    assert (tested[ablation.result_key("1 level", 0)]["top1"], tested[ablation.result_key("1 level", 0)]["knn_top1"]) \
        == (72.5, 65.0)
    runs[ablation.result_key("1 level", 1)].update(test="/b/other.beton", test_top1=1.0, test_knn_top1=1.0)
    with pytest.raises(UserError, match="different test betons"):
        ablation.on_test_set(runs)


def test_report_prints_the_test_set_tables_of_runs_scored_on_one(tmp_path, capsys):
    def scored(variant, seed, top1, test_top1):
        return {**record(variant, seed, top1, 50.0), "test": "/b/test.beton", "test_top1": test_top1,
                "test_knn_top1": 55.0}
    write_results(tmp_path / "a", {ablation.result_key(v, s): scored(v, s, top1, top1 + 10 * s)
                                   for s in (0, 1) for v, top1 in (("1 level", 70.0), ("2 levels", 71.0))})
    ablation.main(["--report", str(tmp_path / "a")])
    val_tables, test_tables = capsys.readouterr().out.split("scored on /b/test.beton")
    val_row = next(line for line in val_tables.splitlines() if line.startswith("1 level"))
    test_row = next(line for line in test_tables.splitlines() if line.startswith("1 level"))
    assert "70.0" in val_row and "75.0" in test_row  # seeds 0 and 1: test 70 and 80
