"""Analytic FLOPs of one H-JEPA training step per image, and model FLOP utilisation (MFU).

A multiply-add counts as 2 FLOPs. Counted: every linear layer, the attention matmuls (QK^T and AV),
and the patch-embedding convolution; norms, softmax, GELU, the loss and gathers are left out (a few
percent at most). Backward costs twice the forward (gradients of inputs and of weights), except the
patch embedding, whose input (the image) needs no gradient: only its weight gradient, 1x.
Checked against torch.utils.flop_counter.FlopCounterMode in tests/test_flops.py.
"""
import math

from hjepa.vit import ARCHS

MLP_RATIO = 4


def block_forward_flops(num_tokens, width, mlp_ratio=MLP_RATIO):
    """One pre-norm transformer block on a (num_tokens, width) sequence."""
    linears = 2 * num_tokens * width * width * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * num_tokens * num_tokens * width  # QK^T and AV, summed over heads
    return linears + attention


def step_flops_breakdown(model_config, *, num_context, num_target, num_targets):
    """FLOPs per image of one training step, by role: {"target", "context", "predictor", "total"}.

    model_config: build_model's kwargs (model.model_config). num_context: context tokens per image
    (Nc); num_target: tokens per target block (Nt); num_targets: target blocks per image (T).
    """
    embed_dim, depth, _ = ARCHS[model_config["arch"]]
    patch_size = model_config["patch_size"]
    num_patches = (model_config["image_size"] // patch_size) ** 2
    pred_dim = model_config["predictor_embed_dim"]
    level_depths = model_config.get("level_depths") or []
    num_level_heads = sum(1 for d in level_depths if int(d) != depth)

    # The patch embedding runs on every patch in both encoders; the context drops tokens after it.
    patch_embed = 2 * num_patches * 3 * patch_size * patch_size * embed_dim
    target = patch_embed + depth * block_forward_flops(num_patches, embed_dim)  # forward only, no grad
    context_blocks = depth * block_forward_flops(num_context, embed_dim)
    context = patch_embed * 2 + context_blocks * 3  # forward + weight-grad-only backward; blocks fwd + 2x bwd

    predictor_forward = (
        2 * num_context * embed_dim * pred_dim  # predictor_embed, once per image
        + num_targets * model_config["predictor_depth"] * block_forward_flops(num_context + num_target, pred_dim)
        + (1 + num_level_heads) * 2 * num_targets * num_target * pred_dim * embed_dim  # predictor_proj + heads
    )
    predictor = 3 * predictor_forward
    return dict(target=target, context=context, predictor=predictor, total=target + context + predictor)


def train_step_flops(model_config, *, num_context, num_target, num_targets):
    """Total FLOPs per image of one training step (see step_flops_breakdown)."""
    return step_flops_breakdown(model_config, num_context=num_context, num_target=num_target,
                                num_targets=num_targets)["total"]


def train_flops_per_image(model_config, *, masking, num_patches):
    """FLOPs per image of one training step with the masking config's token counts.

    masking: sample_masks' keyword arguments (num_targets, target_scale, target_aspect, context_scale,
    context_aspect, allow_overlap, min_keep); num_patches: tokens of the full (square) grid. The
    counts are hjepa.masks.mask_sizes: fixed per configuration (so exact for every step and batch
    size), the target count including the padding the predictor computes.
    """
    from hjepa.masks import mask_sizes  # a sampler of the data side; imported only when asked for

    grid_size = math.isqrt(num_patches)
    num_context, num_target = mask_sizes(grid_size=(grid_size, grid_size), **masking)
    return train_step_flops(model_config, num_context=num_context, num_target=num_target,
                            num_targets=masking["num_targets"])


def mfu(images_per_s, flops_per_image, peak_tflops):
    """Model FLOP utilisation: achieved FLOP/s over the accelerators' peak (a fraction, 0..1).
    peak_tflops is the total over all devices doing the work."""
    return images_per_s * flops_per_image / (peak_tflops * 1e12)
