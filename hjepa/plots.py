"""PNG pictures of a run: training curves, what the model saw (context/target blocks), mixture counts.

    python -m hjepa.plots RUN_FOLDER      # redraws every picture from the run folder's files

Reads metrics.jsonl and mask_examples.pt (a few training images with their masks, saved by the
trainer at its first step); writes curves.png, masks.png and, for mixtures, mixture_counts.png.
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from hjepa.errors import UserError, exit_on_user_error  # noqa: E402
from hjepa.runlog import read_metrics  # noqa: E402

TARGET_COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def plot_curves(records, path):
    steps = [r for r in records if "loss" in r]
    if not steps:
        return None
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(x, [r["loss"] for r in steps], label="total", color="black")
    for level in range(len(steps[0]["level_losses"])):
        ax.plot(x, [r["level_losses"][level] for r in steps], label=f"level {level}", alpha=0.8)
    ax.set_title("loss per level"), ax.set_xlabel("step"), ax.legend(), ax.set_yscale("log")
    ax = axes[0, 1]
    ax.plot(x, [r["lr"] for r in steps], color="tab:blue")
    ax.set_title("learning rate"), ax.set_xlabel("step")
    ax = axes[1, 0]
    ax.plot(x, [r["target_std"] for r in steps], label="target features")
    ax.plot(x, [r["pred_std"] for r in steps], label="predictions")
    ax.set_title("std across the batch (collapse monitor)"), ax.set_xlabel("step"), ax.legend()
    ax = axes[1, 1]
    ax.plot(x, [r["images_per_s"] for r in steps], color="tab:green")
    ax.set_title("images/s"), ax.set_xlabel("step"), ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_masks(examples, path):
    """Each image with its context patches bright and each target block outlined in its own colour."""
    images = examples["images"]  # (n, 3, H, W) uint8
    ctx_idx, tgt_idx = examples["ctx_idx"], examples["tgt_idx"]  # (n, Nc), (T, n, Nt)
    grid_h, grid_w = examples["grid_size"]
    n = images.shape[0]
    patch_h, patch_w = images.shape[2] // grid_h, images.shape[3] // grid_w
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy().astype(np.float32) / 255
        in_context = np.zeros(grid_h * grid_w, dtype=bool)
        in_context[ctx_idx[i].numpy()] = True
        shade = np.repeat(np.repeat(in_context.reshape(grid_h, grid_w), patch_h, 0), patch_w, 1)
        ax = axes[0, i]
        ax.imshow(img * np.where(shade[..., None], 1.0, 0.35))
        for t in range(tgt_idx.shape[0]):
            cells = tgt_idx[t, i].numpy()
            rows, cols = cells // grid_w, cells % grid_w
            ax.add_patch(mpatches.Rectangle((cols.min() * patch_w - 0.5, rows.min() * patch_h - 0.5),
                                            (cols.max() - cols.min() + 1) * patch_w,
                                            (rows.max() - rows.min() + 1) * patch_h, fill=False,
                                            linewidth=2, edgecolor=TARGET_COLORS[t % len(TARGET_COLORS)]))
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("what the model saw: context bright, target blocks outlined (one colour per target)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_mixture_counts(records, path):
    epochs = [r for r in records if "member_counts" in r]
    if not epochs or len(epochs[0]["member_counts"]) < 2:
        return None
    names = epochs[0].get("member_names") or [f"member {i}" for i in range(len(epochs[0]["member_counts"]))]
    counts = np.array([r["member_counts"] for r in epochs])  # (epochs, members)
    expected = epochs[0].get("expected_counts")
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = np.zeros(len(epochs))
    x = [r["epoch"] for r in epochs]
    for m, name in enumerate(names):
        ax.bar(x, counts[:, m], bottom=bottom, label=f"{name}" + (f" (expected {expected[m]:,})" if expected else ""))
        bottom += counts[:, m]
    ax.set_xticks(x)
    ax.set_xlabel("epoch"), ax.set_ylabel("samples"), ax.set_title("samples per member per epoch"), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_run(run_dir):
    """Every picture a run folder's files allow; returns the paths written."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{run_dir} has no metrics.jsonl: is it a run folder made by hjepa/train.py?")
    records = read_metrics(metrics)
    written = [plot_curves(records, os.path.join(run_dir, "curves.png")),
               plot_mixture_counts(records, os.path.join(run_dir, "mixture_counts.png"))]
    examples = os.path.join(run_dir, "mask_examples.pt")
    if os.path.isfile(examples):
        written.append(plot_masks(torch.load(examples, weights_only=True), os.path.join(run_dir, "masks.png")))
    return [p for p in written if p]


@exit_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError("usage: python -m hjepa.plots RUN_FOLDER")
    for path in draw_run(argv[0]):
        print(path)


if __name__ == "__main__":
    main()
