"""`python -m hjepa.demo --quick`: the demo's whole pipeline (draw, write, train, probe twice) runs
end to end through the real CLIs (--quick runs their scripts inside the demo's one process, which
saves four ffcv imports). Accuracy is not checked here: the quick mode trains for seconds."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    proc = subprocess.run([sys.executable, "-m", "hjepa.demo", "--quick", f"--out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_writes_train_and_val_betons_with_manifests(quick_demo):
    out, _ = quick_demo
    for split in ("train", "val"):
        assert os.path.getsize(out / "betons" / f"imagenet100_{split}.beton") > 0
        with open(out / "betons" / f"imagenet100_{split}.json") as f:
            assert json.load(f)["split"] == split


def test_demo_drops_the_decoy_classes(quick_demo):
    out, proc = quick_demo
    from hjepa.demo import DECOY_WNIDS, NUM_CLASSES

    with open(out / "betons" / "imagenet100_train.json") as f:
        counts = json.load(f)["per_class_counts"]
    assert sum(1 for n in counts.values() if n > 0) == NUM_CLASSES
    assert not any(counts.get(wnid) for wnid in DECOY_WNIDS)
    assert f"{len(DECOY_WNIDS)} other classes dropped" in proc.stdout


def test_demo_run_folder_has_checkpoint_and_pictures(quick_demo):
    run_dir = quick_demo[0] / "runs" / "cpu_demo"
    for name in ("checkpoint.pt", "metrics.jsonl", "curves.png", "masks.png"):
        assert os.path.getsize(run_dir / name) > 0, name


def test_demo_probes_trained_and_random_encoders_of_one_architecture(quick_demo):
    out, _ = quick_demo
    with open(out / "probe_trained.json") as f:
        trained = json.load(f)
    with open(out / "probe_random.json") as f:
        random = json.load(f)
    assert (trained["encoder"], random["encoder"]) == ("target", "random")
    assert (trained["arch"], trained["patch_size"], trained["image_size"]) == \
        (random["arch"], random["patch_size"], random["image_size"])


def test_demo_prints_the_comparison_pictures_and_real_commands(quick_demo):
    out, proc = quick_demo
    for fragment in ("random init", "H-JEPA pretrained", "difference", "curves.png", "masks.png",
                     "python hjepa/train.py --config-file rn_configs/a100_100ep.yaml", "eval/linear_probe.py"):
        assert fragment in proc.stdout, fragment


def test_demo_refuses_to_clear_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, "-m", "hjepa.demo", "--quick", f"--out={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "--out" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
