"""bench/supervised_ceiling.py: what the supervised model reads, how it is optimised, and one real run."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from hjepa.model import weight_decay_groups
from hjepa.schedules import OptimConfig
from hjepa.vit import build_encoder

_spec = importlib.util.spec_from_file_location("supervised_ceiling", os.path.join(REPO_ROOT, "bench",
                                                                                  "supervised_ceiling.py"))
supervised_ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(supervised_ceiling)


def test_the_classifier_reads_the_linear_probes_feature_the_mean_of_the_final_normed_tokens():
    torch.manual_seed(0)
    encoder = build_encoder("vit_micro", patch_size=8, image_size=32)
    model = supervised_ceiling.MeanTokenClassifier(encoder, num_classes=4)
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0  # zero-initialised head: uniform at step 0
    torch.nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 32, 32)
    expected = model.head(encoder.forward_features(images).mean(dim=1))
    torch.testing.assert_close(model(images), expected)


def test_weight_decay_applies_to_matrices_only():
    model = supervised_ceiling.MeanTokenClassifier(build_encoder("vit_micro", patch_size=8, image_size=32), 4)
    decayed, plain = weight_decay_groups(model.named_parameters(), 0.05)  # what the script hands AdamW
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert any(p is model.head.weight for p in decayed["params"])
    assert any(p is model.head.bias for p in plain["params"])
    assert any(p is model.encoder.norm.weight for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    optim = OptimConfig(warmup_start_factor=0.2, min_lr=1e-6)
    rates = supervised_ceiling.learning_rates(optim, steps=10, warmup_steps=2, peak_lr=1e-3)
    assert rates[:3] == pytest.approx([2e-4, 6e-4, 1e-3])
    assert rates[-1] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))


def run_ceiling(tiny_beton, out, *extra):
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "bench", "supervised_ceiling.py"),
         "--config", os.path.join(REPO_ROOT, "rn_configs", "cpu_demo.yaml"), "--train", tiny_beton,
         "--val", tiny_beton, "--out", str(out), "--seeds", "0", "--epochs", "2",
         "--set=--data.batch_size=16 --data.image_size=32 --model.patch_size=8",
         "--probe-set=--eval.epochs=1 --eval.min_steps=1", "--no-progress",
         "--speed-set=--hardware.num_threads=1 --data.num_workers=1 --eval.num_workers=1", *extra],
        capture_output=True, text=True, timeout=600)


def test_the_command_trains_probes_records_and_resumes(tiny_beton, tmp_path):
    done = run_ceiling(tiny_beton, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "out" / "results.json") as f:
        results = json.load(f)
    assert sorted(results["runs"]) == ["random init|0", "supervised|0"]
    run = results["runs"]["supervised|0"]
    assert (run["epochs"], run["steps"]) == (2, 2 * 64 // 16)
    assert all(0 <= run[m] <= 100 for m in ("head_top1", "top1", "knn_top1"))

    # The probe read this run's checkpoint, whose encoder is the trained one, not the seed's initial weights.
    folder = tmp_path / "out" / "runs" / "supervised-s0"
    with open(folder / "probe.json") as f:
        probe = json.load(f)
    assert (probe["checkpoint"], probe["encoder"], probe["top1"]) == (str(folder / "checkpoint.pt"), "target", run["top1"])
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)
    initial = build_encoder("vit_micro", patch_size=8, image_size=32).state_dict()
    assert not torch.equal(ckpt["target_encoder"]["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(ckpt["target_encoder"][k], ckpt["context_encoder"][k]) for k in initial)

    again = run_ceiling(tiny_beton, tmp_path / "out")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 recorded, 0 to run" in again.stdout

    other = run_ceiling(tiny_beton, tmp_path / "out", "--weight-decay", "0.1")
    assert other.returncode == 1
    assert other.stderr.strip().count("\n") == 0 and "records other settings" in other.stderr
