"""Draw what each hierarchy level asks the predictor for, on a real Fashion-MNIST image.

    python bench/draw_levels.py --data-dir /usr/share/datasets/fashion-mnist --out docs/hierarchy_levels.png

Left: the 64-px image on its 8x8 patch grid, context patches bright, the target blocks of one real
mask draw (hjepa.masks.sample_masks with rn_configs/cpu_demo.yaml's masking) outlined. Then one panel
per level h: every target block cut into 2^h x 2^h windows anchored at its top-left corner (a window
at the block edge holds only the patches that exist, and weighs by their count), each window filled
with the mean of its pixels. The model pools target-encoder *features*, not pixels, over exactly these
windows (hjepa.model.level_cells) and layer-norms each pooled target; the pixel means only show how
much detail each level's target keeps.
"""
import argparse
import math
import os
import sys

import numpy as np
from PIL import Image

from hjepa.config import load_config
from hjepa.errors import exit_on_user_error
from hjepa.masks import sample_masks
from hjepa.sections import mask_config
from hjepa.sources import FASHION_MNIST_CLASSES, fashion_mnist_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block_windows(top, left, th, tw, level):
    """[(row, col, rows, cols)] in patches: the 2^level windows of a th x tw block, edge windows cut."""
    step = 2 ** level
    return [(top + r, left + c, min(step, th - r), min(step, tw - c))
            for r in range(0, th, step) for c in range(0, tw, step)]


def draw(image, masks, grid, num_levels, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    from hjepa.plots import TARGET_COLORS

    size = image.shape[0]
    patch = size // grid
    th, tw = masks.tgt_shape
    corners = [(int(b[0]) // grid, int(b[0]) % grid) for b in masks.tgt_idx[:, 0]]  # top-left of each block
    in_context = np.zeros(grid * grid, bool)
    in_context[masks.ctx_idx[0].numpy()] = True
    shade = np.kron(in_context.reshape(grid, grid), np.ones((patch, patch)))[..., None]
    fig, axes = plt.subplots(1, num_levels + 1, figsize=(2.7 * (num_levels + 1), 3.4))
    axes[0].imshow(image * np.where(shade, 1.0, 0.35), vmin=0, vmax=1)
    axes[0].set_title("context (bright), targets", fontsize=9)
    for level in range(num_levels):
        ax, pooled = axes[level + 1], image * 0.35
        for t, (top, left) in enumerate(corners):
            for r, c, h, w in block_windows(top, left, th, tw, level):
                ys, xs = slice(r * patch, (r + h) * patch), slice(c * patch, (c + w) * patch)
                pooled[ys, xs] = image[ys, xs].mean(axis=(0, 1))
                ax.add_patch(mpatches.Rectangle((c * patch - 0.5, r * patch - 0.5), w * patch, h * patch, fill=False,
                                                linewidth=1, edgecolor=TARGET_COLORS[t % len(TARGET_COLORS)]))
        ax.imshow(pooled, vmin=0, vmax=1)
        windows = len(block_windows(0, 0, th, tw, level))
        ax.set_title(f"level {level}: {2 ** level}x{2 ** level} patches,\n{windows} target(s) per block", fontsize=9)
    for t, (top, left) in enumerate(corners):
        axes[0].add_patch(mpatches.Rectangle((left * patch - 0.5, top * patch - 0.5), tw * patch, th * patch,
                                             fill=False, linewidth=2, edgecolor=TARGET_COLORS[t % len(TARGET_COLORS)]))
    for ax in axes:
        ax.set_xticks(np.arange(0, size + 1, patch) - 0.5, [])
        ax.set_yticks(np.arange(0, size + 1, patch) - 0.5, [])
        ax.grid(color="white", linewidth=0.3, alpha=0.5)
        ax.tick_params(length=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/draw_levels.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--config", default=os.path.join(REPO, "rn_configs", "cpu_demo.yaml"))
    parser.add_argument("--index", type=int, default=0, help="test image index")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="mask draw seed")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "hierarchy_levels.png"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config([args.config])
    images, labels = fashion_mnist_arrays(args.data_dir, "test")
    size, grid = cfg["data.image_size"], cfg["data.image_size"] // cfg["model.patch_size"]
    grey = np.asarray(Image.fromarray(images[args.index]).resize((size, size), Image.BICUBIC)) / 255.0
    masks = sample_masks(mask_config(cfg), batch_size=1, grid_size=(grid, grid), seed=args.seed, step=0)
    th, tw = masks.tgt_shape
    title = (f"Fashion-MNIST test #{args.index} ({FASHION_MNIST_CLASSES[labels[args.index]]}), {size} px, "
             f"{grid}x{grid} patches; target blocks {th}x{tw}; level h pools {'/'.join(str(4 ** h) for h in range(args.levels))} patches")
    draw(np.repeat(grey[..., None], 3, axis=2), masks, grid, args.levels, title, args.out)
    print(f"wrote {args.out} ({math.ceil(os.path.getsize(args.out) / 1024)} KB)")


if __name__ == "__main__":
    main()
