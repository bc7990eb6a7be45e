"""Eager vs torch.compile'd (inductor) training step on the CPU, at the cpu_demo model and masks.

    python bench/compile_step.py [--steps 60] [--warmup 5] [--batch-size 64] [--threads 2] [--out FILE.json]

Runs hjepa.engine.train_step with fresh masks every step (the draws vary the target block size, so
a model whose shapes followed the draw would recompile here). Reports, per mode: the first step
(compilation included), the warm-up steps, steady-state ms per step and images/s, and the number of
graphs Dynamo compiled. Random images (model speed alone, no loader). Prints a table, writes JSON.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # run by path from anywhere

import torch
from torch._dynamo.utils import counters

from hjepa.data import normalize_images
from hjepa.engine import build_optimizer, train_step
from hjepa.masks import mask_sizes, sample_masks
from hjepa.model import build_model
from hjepa.runlog import cpu_model

# rn_configs/cpu_demo.yaml: vit_micro, 64 px images, 8 px patches (an 8 x 8 grid), 2 levels.
MODEL = dict(arch="vit_micro", patch_size=8, image_size=64, predictor_embed_dim=64, predictor_depth=2,
             predictor_num_heads=4, num_levels=2, level_weights=[1.0, 0.5])
MASKING = dict(num_targets=3, target_scale=(0.1, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
               context_aspect=1.0, allow_overlap=False, min_keep=4)


def time_mode(compiled, *, steps, warmup, batch_size):
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model = build_model(**MODEL)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    forward = torch.compile(model) if compiled else model
    images = normalize_images(torch.randint(0, 256, (batch_size, 3, 64, 64), dtype=torch.uint8), "cpu",
                              torch.float32)  # (B, 3, 64, 64)
    times = []
    for step in range(warmup + steps):
        masks = sample_masks(batch_size=batch_size, grid_size=model.grid_size, seed=0, step=step, **MASKING)
        start = time.perf_counter()
        train_step(model, forward, optimizer, images, masks, lr=1e-4, weight_decay=0.05, momentum=0.996)
        times.append(time.perf_counter() - start)
    steady = sum(times[warmup:]) / steps
    return dict(first_step_s=times[0], warmup_steps_s=sum(times[:warmup]), step_ms=1e3 * steady,
                images_per_s=batch_size / steady, graphs_compiled=counters["stats"]["unique_graphs"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="compile_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = dict(device=f"cpu ({cpu_model() or platform.processor()}, {args.threads} threads)", torch=torch.__version__,
                  model=MODEL, masking=MASKING, token_counts=mask_sizes(grid_size=(8, 8), **MASKING),
                  batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
    for mode, compiled in (("eager", False), ("compiled", True)):
        result[mode] = time_mode(compiled, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size)
    result["speedup"] = result["eager"]["step_ms"] / result["compiled"]["step_ms"]

    print(f"{result['device']}, torch {result['torch']}, batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'mode':9} | {'first step (s)':>14} | {'warm-up (s)':>11} | {'ms/step':>8} | {'images/s':>8} | graphs")
    for mode in ("eager", "compiled"):
        r = result[mode]
        print(f"{mode:9} | {r['first_step_s']:14.2f} | {r['warmup_steps_s']:11.2f} | {r['step_ms']:8.1f} | "
              f"{r['images_per_s']:8.0f} | {r['graphs_compiled']}")
    print(f"compiled speed-up: {result['speedup']:.2f}x")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
