"""Analytic training-step FLOPs (hjepa.flops) against torch's FlopCounterMode on a real step."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hjepa.flops import (expected_token_counts, mfu, sampled_token_counts, step_flops_breakdown, train_flops_per_image,
                         train_step_flops)
from hjepa.model import build_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def counted_step_flops_per_image(model, batch_size, num_context, num_targets, tgt_shape, grid):
    g = torch.Generator().manual_seed(0)
    num_patches = grid * grid
    images = torch.randn(batch_size, 3, grid * model.context_encoder.patch_size,
                         grid * model.context_encoder.patch_size, generator=g)
    ctx_idx = torch.stack([torch.randperm(num_patches, generator=g)[:num_context] for _ in range(batch_size)])
    tgt_idx = torch.randint(0, num_patches, (num_targets, batch_size, tgt_shape[0] * tgt_shape[1]), generator=g)
    # On the CPU, torch 2.14's FlopCounterMode has no formula for the CPU flash-attention kernel and
    # counts SDPA as 0 FLOPs; the math backend decomposes attention into counted matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, ctx_idx, tgt_idx, tgt_shape)["loss"].backward()
    return counter.get_total_flops() / batch_size


@pytest.mark.parametrize("level_depths", [[], [6, 12, 12]], ids=["final-block targets", "with a level head"])
def test_analytic_flops_match_flop_counter_within_5_percent(level_depths):
    model = build_model(arch="vit_tiny", patch_size=4, image_size=32, predictor_embed_dim=64, predictor_depth=2,
                        predictor_num_heads=4, num_levels=3, level_weights=[1.0, 0.5, 0.25],
                        level_depths=level_depths)  # an 8 x 8 grid
    counted = counted_step_flops_per_image(model, batch_size=2, num_context=30, num_targets=4, tgt_shape=(2, 3),
                                           grid=8)
    analytic = train_step_flops(model.model_config, num_context=30, num_target=6, num_targets=4)
    assert analytic == pytest.approx(counted, rel=0.05)


def test_target_encoder_costs_a_third_of_a_full_context_step():
    # With no masking (Nc = N), the context encoder's forward+backward is 3x the target's forward
    # apart from the patch embedding's weight-grad-only backward.
    config = dict(arch="vit_small", patch_size=16, image_size=224, predictor_embed_dim=384, predictor_depth=6)
    parts = step_flops_breakdown(config, num_context=196, num_target=36, num_targets=4)
    assert parts["context"] == pytest.approx(3 * parts["target"], rel=0.01)
    assert parts["total"] == parts["target"] + parts["context"] + parts["predictor"]


def test_vit_small_target_forward_is_about_9_2_gflops():
    # Literature value for ViT-S/16 at 224 px: ~4.6 GMACs (fvcore), i.e. ~9.2 GFLOPs.
    config = dict(arch="vit_small", patch_size=16, image_size=224, predictor_embed_dim=384, predictor_depth=6)
    parts = step_flops_breakdown(config, num_context=100, num_target=36, num_targets=4)
    assert parts["target"] == pytest.approx(9.2e9, rel=0.03)


IJEPA_MASKING = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                     context_scale=(0.85, 1.0), context_aspect=1.0, allow_overlap=False, min_keep=10)


def test_expected_token_counts_match_sampled_masks_of_one_image():
    expected_context, expected_target = expected_token_counts(grid_size=14, **IJEPA_MASKING)
    sampled_context, sampled_target = sampled_token_counts(grid_size=14, batch_size=1, masking=IJEPA_MASKING,
                                                           samples=200)
    assert expected_target == pytest.approx(sampled_target, rel=0.03)
    assert expected_context == pytest.approx(sampled_context, rel=0.05)


def test_sampled_counts_see_the_context_cut_to_the_batch_minimum():
    one, _ = sampled_token_counts(grid_size=14, batch_size=1, masking=IJEPA_MASKING)
    many, _ = sampled_token_counts(grid_size=14, batch_size=64, masking=IJEPA_MASKING)
    assert many < 0.8 * one
    config = dict(arch="vit_small", patch_size=16, image_size=224, predictor_embed_dim=384, predictor_depth=6)
    assert (train_flops_per_image(config, masking=IJEPA_MASKING, num_patches=196, batch_size=64)
            < train_flops_per_image(config, masking=IJEPA_MASKING, num_patches=196))


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(images_per_s=1000, flops_per_image=3e10, peak_tflops=300) == pytest.approx(0.1)


def test_mfu_of_a_data_parallel_run_is_per_device():
    # 8 devices at 1000 images/s each, each at a tenth of its 300 TFLOP/s peak.
    assert mfu(images_per_s=8000, flops_per_image=3e10, peak_tflops=300, num_devices=8) == pytest.approx(0.1)
