"""hjepa/train.py end to end on a tiny beton: run folder, exact resume, NaN stop, torchrun."""
import json
import re
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from hjepa import train as train_module
from hjepa.checkpoint import load_checkpoint
from hjepa.errors import UserError
from hjepa.runlog import read_metrics
from tiny_training import REPO, TINY, assert_same_parameters



def tiny_args(beton, folder, *extra):
    return [f"--data.train_dataset={beton}", f"--logging.folder={folder}", *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_beton, tmp_path_factory):
    """One uninterrupted 2-epoch run (4 steps per epoch), deterministic, with the k-NN monitor on (the
    resume test compares it with runs without the monitor, so the monitor must not perturb training)."""
    folder = tmp_path_factory.mktemp("runs")
    args = tiny_args(tiny_beton, folder, "--training.epochs=2", "--training.checkpoint_every=1",
                     "--training.deterministic=1", "--logging.log_every=1", "--logging.run_name=full",
                     "--logging.eval_every=1", f"--data.val_dataset={tiny_beton}")
    return train_module.main(args)


def test_run_folder_holds_params_metrics_checkpoint_commit_and_pictures(finished_run):
    names = set(os.listdir(finished_run))
    assert {"params.json", "metrics.jsonl", "checkpoint.pt", "git_commit.txt", "curves.png",
            "masks.png", "checkpoint_ep0001.pt", "checkpoint_ep0002.pt"} <= names
    with open(os.path.join(finished_run, "params.json")) as f:
        assert json.load(f)["model"]["arch"] == "vit_micro"


def test_metrics_log_every_quantity_per_step(finished_run):
    steps = [r for r in read_metrics(os.path.join(finished_run, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("epoch", "lr", "wd", "momentum", "level_losses", "target_std", "pred_std", "grad_norm",
                "images_per_s", "data_wait_fraction", "mfu"):
        assert key in steps[0], key
    assert len(steps[0]["level_losses"]) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["momentum"] > steps[0]["momentum"]  # EMA ramps towards 1


def test_knn_monitor_logs_a_top1_every_eval_every_epochs(finished_run):
    knn = [r for r in read_metrics(os.path.join(finished_run, "metrics.jsonl")) if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)


def test_checkpoint_loads_without_pickle_and_records_the_run(finished_run):
    ckpt = load_checkpoint(os.path.join(finished_run, "checkpoint.pt"))  # weights_only=True inside
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2
    assert ckpt["model_config"]["arch"] == "vit_micro"
    assert ckpt["config"]["data"]["batch_size"] == 16
    assert set(ckpt["sampler"]) >= {"seed", "order", "steps_per_epoch"}


def test_stopped_and_resumed_run_ends_with_identical_parameters(finished_run, tiny_beton, tmp_path):
    common = tiny_args(tiny_beton, tmp_path, "--training.epochs=2", "--training.checkpoint_every=1",
                       "--training.deterministic=1", "--logging.log_every=1", "--logging.run_name=parts",
                       "--logging.plots=0")
    train_module.main(common + ["--training.max_steps=3"])  # stops mid-epoch 0
    assert load_checkpoint(os.path.join(tmp_path, "parts", "checkpoint.pt"))["step"] == 3
    run_dir = train_module.main(common + ["--training.resume=auto"])
    assert_same_parameters(run_dir, finished_run)
    with open(os.path.join(run_dir, "git_commit.txt")) as f:  # each start adds a line; none is overwritten
        starts = [line.split(" from step ") for line in f.read().splitlines()]
    assert [int(step) for _commit, step in starts] == [0, 3]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_beton, tmp_path, monkeypatch):
    real_step = train_module.train_step
    calls = {"n": 0}

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 6:  # epoch 1, after the epoch-0 checkpoint at step 4
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_module, "train_step", poisoned_step)
    args = tiny_args(tiny_beton, tmp_path, "--training.epochs=2", "--training.checkpoint_every=1",
                     "--logging.log_every=1", "--logging.run_name=nan", "--logging.plots=0")
    with pytest.raises(UserError, match="NaN/Inf by step 6"):
        train_module.main.__wrapped__(args)
    assert load_checkpoint(os.path.join(tmp_path, "nan", "checkpoint.pt"))["step"] == 4


def test_resuming_another_architecture_fails_listing_the_difference(finished_run, tiny_beton, tmp_path):
    shutil.copy(os.path.join(finished_run, "checkpoint.pt"), tmp_path / "other.pt")
    args = tiny_args(tiny_beton, tmp_path, "--model.predictor_depth=2", f"--training.resume={tmp_path / 'other.pt'}")
    proc = subprocess.run([sys.executable, "hjepa/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "another architecture" in proc.stderr and "predictor_depth: run has 2, checkpoint has 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_beton_fails_with_one_line_naming_it(tmp_path):
    missing = tmp_path / "nope.beton"
    proc = subprocess.run([sys.executable, "hjepa/train.py", *tiny_args(missing, tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def test_torchrun_two_processes_keep_parameters_identical_and_see_disjoint_samples(tiny_beton, tmp_path):
    args = tiny_args(tiny_beton, tmp_path, "--training.epochs=1", "--data.batch_size=8", "--logging.log_every=2",
                     "--logging.run_name=ddp", "--logging.plots=0", "--hardware.distributed=1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")

    def launch():
        shutil.rmtree(os.path.join(tmp_path, "ddp"), ignore_errors=True)
        return subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "hjepa/train.py", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    proc = launch()
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # Seen once in about 20 two-process runs on a loaded 2-core machine (rank 0 aborted by the C++
        # runtime, no Python traceback, not reproduced since): a crash inside a library's native
        # threads, not a wrong result. Launched once more, and said out loud; any other failure fails.
        warnings.warn(f"torchrun rank aborted by std::terminate, launched again:\n{proc.stderr[-1500:]}")
        proc = launch()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 16 = 8 per process x 2 processes" in proc.stdout
    records = read_metrics(os.path.join(tmp_path, "ddp", "metrics.jsonl"))
    epoch = next(r for r in records if "rank_overlap" in r)
    assert epoch["rank_overlap"] == 0
    assert epoch["rank_sample_counts"] == [4 * 8, 4 * 8]  # 64 samples / 16 per step = 4 steps per rank
    final = next(r for r in records if "param_checksums" in r)
    assert len(final["param_checksums"]) == 2
    assert final["param_checksums"][0] == final["param_checksums"][1]


def test_mixture_counts_logged_each_epoch_match_the_table_printed_at_start(tiny_multi_beton, tmp_path, capsys):
    args = tiny_args(tiny_multi_beton, tmp_path, "--training.epochs=2", "--data.order=weighted",
                     "--data.mixture=big:0.5,mid:0.3,small:0.2", "--data.epoch_samples=64",
                     "--logging.run_name=mix", "--logging.log_every=4")
    run_dir = train_module.main(args)
    printed = capsys.readouterr().out
    assert "expected samples per member per epoch" in printed
    epochs = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "member_counts" in r]
    assert len(epochs) == 2
    for record in epochs:
        assert record["member_names"] == ["big", "mid", "small"]
        assert record["member_counts"] == record["expected_counts"] == [32, 19, 13]  # 64 * (.5, .3, .2), largest remainder
        for name, count in zip(record["member_names"], record["member_counts"]):
            assert re.search(rf"^{name}\s+\d+\s+{count}\s", printed, re.M), name
    assert os.path.isfile(os.path.join(run_dir, "mixture_counts.png"))


def test_resuming_with_another_batch_size_fails_naming_both_step_counts(finished_run, tiny_beton, tmp_path):
    shutil.copy(os.path.join(finished_run, "checkpoint.pt"), tmp_path / "ckpt.pt")
    args = tiny_args(tiny_beton, tmp_path, "--data.batch_size=8", f"--training.resume={tmp_path / 'ckpt.pt'}")
    with pytest.raises(UserError, match="written with 4 steps per epoch, this run has 8"):
        train_module.main.__wrapped__(args)


def test_logged_mfu_is_per_device_when_processes_share_the_images_per_second():
    out = {"loss": torch.tensor(1.0), "level_losses": [torch.tensor(1.0)], "target_std": torch.tensor(1.0),
           "pred_std": torch.tensor(1.0), "grad_norm": torch.tensor(1.0)}
    schedule = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.996}

    def logged_mfu(num_devices):
        return train_module._metrics_record(out, 1, 0, schedule, images_per_s=8000, data_wait=0.0,
                                            flops_per_image=3e10, peak_tflops=300,
                                            num_devices=num_devices)["mfu"]

    assert logged_mfu(8) == pytest.approx(0.1) and logged_mfu(1) == pytest.approx(0.8)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graphs_under_ddp_are_refused_before_anything_is_wrapped(mode):
    cfg = {"hardware.compile": True, "hardware.compile_mode": mode}
    with pytest.raises(UserError, match="one GPU only"):
        train_module.wrap_for_training(torch.nn.Linear(1, 1), cfg, SimpleNamespace(enabled=True), torch.device("cpu"))
