"""What the hierarchy's loss weighting and level normalisation change, measured on real masks and models.

    python bench/hierarchy_levels.py [--checkpoint runs/<run>/checkpoint.pt] [--out FILE.json]

1. Partial cells (I-JEPA's default masks on 14 x 14, 2,000 batches): at each level, how often a block
   is whole windows, the share of the level loss that partial cells carry under a plain mean over
   cells vs under patch-count weights, and the spread (max / min) of the per-patch gradient weight.
2. Target scale per level: std over D of the pooled target cells, before normalisation, for a
   random-init vit_small/16 on synthetic 224 px images, and for --checkpoint on 64 px synthetic
   images at its own grid when given; with the level losses of that model with and without
   normalisation.
3. Padding: the fixed target and context token counts against the mean real block area.
Prints a table and writes JSON.
"""
import argparse
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # run by path from anywhere

import numpy as np
import torch

from hjepa.checkpoint import load_checkpoint
from hjepa.data import normalize_images
from hjepa.masks import mask_sizes, sample_masks
from hjepa.model import build_model, level_cells, pool_target_blocks
from hjepa.synthetic import make_images

IJEPA_MASKING = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                     context_aspect=1.0, allow_overlap=False, min_keep=10)


def partial_cells(grid=(14, 14), batches=2000, levels=(1, 2)):
    """Per level: fraction of blocks tiled by whole windows, partial cells' share of the level loss
    (plain mean over cells vs patch-count weights) and max/min per-patch gradient weight of each."""
    rows = {}
    shapes = [sample_masks(batch_size=1, grid_size=grid, seed=0, step=s, **IJEPA_MASKING).tgt_shape
              for s in range(batches)]
    for level in levels:
        window = 2 ** level
        whole, plain_share, counted_share, plain_spread = 0, [], [], []
        for th, tw in shapes:
            counts = np.array([min(window, th - r) * min(window, tw - c)
                               for r in range(0, th, window) for c in range(0, tw, window)], dtype=float)
            partial = counts < window * window
            whole += not partial.any()
            plain_share.append(partial.mean())  # each cell 1/C of the loss
            counted_share.append(counts[partial].sum() / counts.sum())  # each patch 1/N
            plain_spread.append(counts.max() / counts.min())  # per-patch weight 1/(C * n_c)
        rows[level] = dict(whole_blocks=whole / len(shapes), partial_share_plain_mean=float(np.mean(plain_share)),
                           partial_share_patch_weighted=float(np.mean(counted_share)),
                           patch_weight_spread_plain_mean_mean=float(np.mean(plain_spread)),
                           patch_weight_spread_plain_mean_max=float(np.max(plain_spread)),
                           patch_weight_spread_patch_weighted=1.0)
    return rows


@torch.no_grad()
def target_scales(model, images, masking, steps=4):
    """Per level: mean std over D of the pooled target cells (unnormalised), and the level losses of
    the model with normalize_levels on and off, averaged over `steps` mask draws."""
    grid = model.grid_size
    scales, losses = {}, {True: [], False: []}
    for step in range(steps):
        masks = sample_masks(batch_size=images.shape[0], grid_size=grid, seed=0, step=step, **masking)
        z = model.target_features(images, masks.tgt_idx)[model.target_encoder.depth]  # (T*B, Nt, D)
        for level in range(model.num_levels):
            cells = level_cells(masks.tgt_pos, level, grid)  # (C, Nt)
            counts = cells.sum(dim=1)
            std = pool_target_blocks(z, cells).std(dim=-1, correction=0)  # (T*B, C)
            scales.setdefault(level, []).append(((std * counts).sum() / (counts.sum() * std.shape[0])).item())
        for normalize in (True, False):
            model.normalize_levels = normalize
            out = model(images, masks.ctx_idx, masks.tgt_idx, masks.tgt_pos)
            losses[normalize].append(out["level_losses"].tolist())
    return dict(target_std={level: float(np.mean(v)) for level, v in scales.items()},
                level_losses_normalized=np.mean(losses[True], axis=0).tolist(),
                level_losses_unnormalized=np.mean(losses[False], axis=0).tolist())


def synthetic_batch(size, count=32):
    samples = make_images(count // 8, 8, size=(size, size), seed=123)
    images = torch.from_numpy(np.stack([img for img, _ in samples])).permute(0, 3, 1, 2).contiguous()
    return normalize_images(images, "cpu", torch.float32)  # (B, 3, H, W)


def padding(grid=(14, 14), batches=2000):
    num_context, num_target = mask_sizes(grid_size=grid, **IJEPA_MASKING)
    areas = [np.prod(sample_masks(batch_size=1, grid_size=grid, seed=0, step=s, **IJEPA_MASKING).tgt_shape)
             for s in range(batches)]
    mean_area = float(np.mean(areas))
    return dict(num_context=num_context, num_target_padded=num_target, mean_block_area=mean_area,
                query_overhead=num_target / mean_area - 1,
                predictor_sequence_overhead=(num_context + num_target) / (num_context + mean_area) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--out", default="hierarchy_levels.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = dict(partial_cells=partial_cells(), padding=padding())
    model = build_model(arch="vit_small", patch_size=16, image_size=224, num_levels=3,
                        level_weights=[1.0, 0.5, 0.25])
    result["random_vit_small"] = target_scales(model, synthetic_batch(224, count=16), IJEPA_MASKING)
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        trained = build_model(**state["model_config"])
        for part, module in trained.trainable_modules().items():
            module.load_state_dict(state[part])
        trained.target_encoder.load_state_dict(state["target_encoder"])
        masking = dict(IJEPA_MASKING, num_targets=3, target_scale=(0.1, 0.2), min_keep=4)  # rn_configs/cpu_demo.yaml
        result["checkpoint"] = dict(path=args.checkpoint, masking="cpu_demo",
                                    **target_scales(trained, synthetic_batch(state["model_config"]["image_size"]),
                                                    masking))

    print("level | whole blocks | partial share: plain mean -> patch-weighted | patch-weight spread plain (mean, max)")
    for level, r in result["partial_cells"].items():
        print(f"{level:5} | {r['whole_blocks']:12.1%} | {r['partial_share_plain_mean']:.1%} -> "
              f"{r['partial_share_patch_weighted']:.1%} | {r['patch_weight_spread_plain_mean_mean']:.1f}x, "
              f"{r['patch_weight_spread_plain_mean_max']:.0f}x (patch-weighted: 1x)")
    for key in ("random_vit_small", "checkpoint"):
        if key in result:
            r = result[key]
            print(f"{key}: pooled target std per level {[round(v, 3) for v in r['target_std'].values()]}; "
                  f"level losses normalised {[round(v, 4) for v in r['level_losses_normalized']]}, "
                  f"unnormalised {[round(v, 4) for v in r['level_losses_unnormalized']]}")
    p = result["padding"]
    print(f"padding: Nc {p['num_context']}, Nt {p['num_target_padded']} vs mean block {p['mean_block_area']:.1f} "
          f"(+{p['query_overhead']:.0%} queries, +{p['predictor_sequence_overhead']:.0%} predictor sequence)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
