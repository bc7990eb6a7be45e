"""What the training tests share: a model small enough for milliseconds per step on one CPU core, and
the comparison of two runs' final parameters."""
import os

import torch

from hjepa.checkpoint import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 32 px images, 8x8 patches of 4 px, vit_micro and a one-block predictor.
TINY = ["--data.image_size=32", "--data.batch_size=16", "--data.num_workers=1", "--model.arch=vit_micro",
        "--model.patch_size=4", "--model.predictor_embed_dim=48", "--model.predictor_depth=1",
        "--model.predictor_num_heads=2", "--masking.min_keep=4", "--hardware.device=cpu",
        "--hardware.num_threads=1", "--logging.progress=0", "--optim.warmup_epochs=1"]


def final_parameters(run_dir):
    """(step, {part.name: tensor}) of <run_dir>/checkpoint.pt, every model part included."""
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    return ckpt["step"], {f"{part}.{k}": v for part in ("context_encoder", "target_encoder", "predictor",
                                                         "level_heads") for k, v in ckpt[part].items()}


def assert_same_parameters(run_dir, reference_dir):
    (step, got), (reference_step, expected) = final_parameters(run_dir), final_parameters(reference_dir)
    assert step == reference_step
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
