"""Analytic training-step FLOPs (hjepa.flops) against torch's FlopCounterMode on a real step."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hjepa.flops import mfu, step_flops_breakdown, train_flops_per_image, train_step_flops
from hjepa.masks import mask_sizes, sample_masks
from hjepa.model import build_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def counted_step_flops_per_image(model, batch_size, masking, grid):
    """FlopCounterMode's count of one forward+backward on masks drawn with `masking` (padded blocks)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, grid * model.context_encoder.patch_size,
                         grid * model.context_encoder.patch_size, generator=g)
    masks = sample_masks(batch_size=batch_size, grid_size=(grid, grid), seed=0, step=0, **masking)
    # On the CPU, torch 2.14's FlopCounterMode has no formula for the CPU flash-attention kernel and
    # counts SDPA as 0 FLOPs; the math backend decomposes attention into counted matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, masks.ctx_idx, masks.tgt_idx, masks.tgt_pos)["loss"].backward()
    return counter.get_total_flops() / batch_size


SMALL_MASKING = dict(num_targets=4, target_scale=(0.08, 0.1), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                     context_aspect=1.0, allow_overlap=False, min_keep=4)  # on an 8 x 8 grid


@pytest.mark.parametrize("level_depths", [[], [6, 12, 12]], ids=["final-block targets", "with a level head"])
def test_analytic_flops_match_flop_counter_within_5_percent(level_depths):
    model = build_model(arch="vit_tiny", patch_size=4, image_size=32, predictor_embed_dim=64, predictor_depth=2,
                        predictor_num_heads=4, num_levels=3, level_weights=[1.0, 0.5, 0.25],
                        level_depths=level_depths)  # an 8 x 8 grid
    counted = counted_step_flops_per_image(model, batch_size=2, masking=SMALL_MASKING, grid=8)
    analytic = train_flops_per_image(model.model_config, masking=SMALL_MASKING, num_patches=64)
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


def test_flops_per_image_use_the_masks_fixed_token_counts():
    num_context, num_target = mask_sizes(grid_size=(14, 14), **IJEPA_MASKING)
    config = dict(arch="vit_small", patch_size=16, image_size=224, predictor_embed_dim=384, predictor_depth=6)
    assert (train_flops_per_image(config, masking=IJEPA_MASKING, num_patches=196)
            == train_step_flops(config, num_context=num_context, num_target=num_target, num_targets=4))


def test_mfu_is_achieved_over_peak_flops():
    assert mfu(images_per_s=1000, flops_per_image=3e10, peak_tflops=300) == pytest.approx(0.1)
