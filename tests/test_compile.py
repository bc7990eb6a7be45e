"""torch.compile of the training step compiles once: the model's shapes do not depend on the mask draw."""
import pytest
import torch

from hjepa.engine import build_optimizer, train_step
from hjepa.masks import MaskConfig, sample_masks
from hjepa.model import HJEPA, LevelHeads
from hjepa.predictor import Predictor
from hjepa.vit import VisionTransformer

# The masking section's defaults (I-JEPA's masks) on a 14 x 14 grid: block sizes vary per batch.
DEFAULT_MASKING = MaskConfig()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """One torch thread (tiny tensors) and Dynamo's caches cleared before and after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(previous)


def tiny_model(level_depths, level_windows="block"):
    """A 16-wide, 2-block H-JEPA on 14 x 14 one-pixel patches: the grid of the default masks at a
    fraction of vit_micro's cost (200 steps in a few seconds). Grid windows give levels 1 and 2 heads."""
    encoder = VisionTransformer(image_size=14, patch_size=1, embed_dim=16, depth=2, num_heads=2)
    predictor = Predictor(grid_size=14, embed_dim=16, predictor_embed_dim=16, depth=1, num_heads=2)
    head_levels = [level for level, depth in enumerate(level_depths)
                   if depth != encoder.depth or (level_windows == "grid" and level >= 1)]
    return HJEPA(encoder, predictor, level_weights=[1.0, 0.5, 0.25], level_depths=level_depths, loss="smooth_l1",
                 level_heads=LevelHeads(head_levels, 16, 16) if head_levels else None, level_windows=level_windows)


@pytest.mark.parametrize("level_depths,level_windows", [([2, 2, 2], "block"), ([1, 2, 2], "block"), ([2, 2, 2], "grid")],
                         ids=["final-block targets", "with a level head", "grid windows"])
def test_compiled_train_step_compiles_once_over_200_steps_of_default_masks(level_depths, level_windows):
    torch.manual_seed(0)
    model = tiny_model(level_depths, level_windows)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    compiled_at = []  # the step of every graph Dynamo hands to the backend

    def counting_backend(graph_module, example_inputs):
        compiled_at.append(step)
        return graph_module.forward  # run the captured graph as is: counts compilations, costs no codegen

    forward = torch.compile(model, backend=counting_backend)
    images = torch.randn(2, 3, 14, 14)
    block_sizes = set()
    # Without automatic dynamic shapes, any shape or Python value that followed the draw would
    # recompile (with them, Dynamo would hide a varying size behind a second, dynamic-shape graph).
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for step in range(200):
            masks = sample_masks(DEFAULT_MASKING, batch_size=2, grid_size=(14, 14), seed=0, step=step)
            block_sizes.add(masks.tgt_shape)
            out = train_step(model, forward, optimizer, images, masks, lr=1e-4, weight_decay=0.05, momentum=0.996)
    assert len(block_sizes) > 5  # the draws did vary
    assert torch.isfinite(out["loss"])
    assert compiled_at == [0]  # one graph, at the first step, no graph break
