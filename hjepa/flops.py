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


def expected_token_counts(*, grid_size, num_targets, target_scale, target_aspect, context_scale,
                          context_aspect=1.0, allow_overlap=False, min_keep=1, points=100):
    """Estimated (Nc, Nt) per image for multi-block masks on a grid_size x grid_size grid.

    Nt averages hjepa.masks' block-size rule (area fraction and aspect drawn independently and
    uniformly, h and w rounded and kept below the grid side, sizes under min_keep redrawn) over a
    points x points grid of the two draws. Nc is the mean context block area, less the share the T
    targets cover when they may not overlap it, as if the targets were placed independently. The
    trainer's context is also cut to the batch minimum, so this overestimates Nc for large batches
    (sampled_token_counts gives the real mean); for one image it is within a few percent.
    """
    num_patches = grid_size * grid_size

    def mean_block_area(scale, aspect):
        if not isinstance(aspect, (tuple, list)):
            aspect = (aspect, aspect)
        areas = []
        for i in range(points):
            keep = int(num_patches * (scale[0] + (i + 0.5) / points * (scale[1] - scale[0])))
            for j in range(points):
                ratio = aspect[0] + (j + 0.5) / points * (aspect[1] - aspect[0])
                h = min(int(round(math.sqrt(keep * ratio))), grid_size - 1) if grid_size > 1 else 1
                w = min(int(round(math.sqrt(keep / ratio))), grid_size - 1) if grid_size > 1 else 1
                if h * w >= min_keep:
                    areas.append(h * w)
        return sum(areas) / max(len(areas), 1)

    num_target = mean_block_area(target_scale, target_aspect)
    num_context = mean_block_area(context_scale, context_aspect)
    if not allow_overlap:
        num_context *= (1.0 - num_target / num_patches) ** num_targets
    return num_context, num_target


def sampled_token_counts(*, grid_size, batch_size, masking, samples=20, seed=0):
    """Mean (Nc, Nt) over `samples` batches drawn by hjepa.masks.sample_masks: what the trainer sees,
    including the context cut to the batch minimum (e.g. ~52 instead of ~80 context tokens at batch
    64 with I-JEPA's default masks on a 14 x 14 grid)."""
    from hjepa.masks import sample_masks  # a sampler of the data side; imported only when asked for

    num_context = num_target = 0
    for step in range(samples):
        masks = sample_masks(batch_size=batch_size, grid_size=(grid_size, grid_size), seed=seed, step=step,
                             rank=0, **masking)
        num_context += masks.ctx_idx.shape[1]
        num_target += masks.tgt_idx.shape[2]
    return num_context / samples, num_target / samples


def train_flops_per_image(model_config, *, masking, num_patches, batch_size=None):
    """FLOPs per image of one training step at the masking config's mean token counts.

    masking: sample_masks' keyword arguments (num_targets, target_scale, target_aspect, context_scale,
    context_aspect, allow_overlap, min_keep); num_patches: tokens of the full (square) grid. With
    batch_size (per process), the counts are sampled from real masks of that batch size
    (sampled_token_counts); without, they are estimated analytically (expected_token_counts), which
    overestimates the context for large batches.
    """
    grid_size = math.isqrt(num_patches)
    if batch_size is not None:
        num_context, num_target = sampled_token_counts(grid_size=grid_size, batch_size=batch_size, masking=masking)
    else:
        num_context, num_target = expected_token_counts(
            grid_size=grid_size, num_targets=masking["num_targets"], target_scale=masking["target_scale"],
            target_aspect=masking["target_aspect"], context_scale=masking["context_scale"],
            context_aspect=masking.get("context_aspect", 1.0), allow_overlap=masking["allow_overlap"],
            min_keep=masking.get("min_keep", 1))
    return train_step_flops(model_config, num_context=num_context, num_target=num_target,
                            num_targets=masking["num_targets"])


def mfu(images_per_s, flops_per_image, peak_tflops, num_devices=1):
    """Model FLOP utilisation per device: achieved FLOP/s over the peak of the devices doing the work
    (a fraction, 0..1). images_per_s: all devices together (the global batch per second);
    peak_tflops: one device's peak, as the config gives it."""
    return images_per_s * flops_per_image / (num_devices * peak_tflops * 1e12)
