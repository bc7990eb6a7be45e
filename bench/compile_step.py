"""Eager vs torch.compile'd (inductor) training step on the CPU, at the cpu_demo model and masks.

    python bench/compile_step.py [--steps 60] [--warmup 5] [--batch-size 64] [--threads 2] [--out FILE.json]

Runs hjepa.engine.train_step with fresh masks every step (the draws vary the target block size, so
a model whose shapes followed the draw would recompile here). Reports, per mode: the first step
(compilation included), the warm-up steps, the median ms per step and images/s over steps that
alternate between the modes (fair on a shared machine), and the number of graphs Dynamo compiled
over all steps. Random images (model speed alone, no loader). Prints a table, writes JSON.

Measured (2-core Intel Xeon VM, torch 2.14.1, load ~7-9 from other jobs, so absolute times vary
4x between runs): compiled/eager median 357/408 ms per step (1.14x) and 1223/1557 ms (1.27x) in two
runs; one graph compiled each time; the first compiled step took 126 s with a cold inductor cache,
3-9 s with a warm one. On the CPU, compile buys ~15-25% at this size, after a one-off compile.
"""
import argparse
import dataclasses
import json
import platform
import statistics
import time


import torch
from torch._dynamo.utils import counters

from hjepa.loaders import normalize_images
from hjepa.engine import build_optimizer, compile_forward, train_step
from hjepa.masks import MaskConfig, mask_sizes, sample_masks
from hjepa.model import ModelConfig, build_model
from hjepa.runlog import cpu_model

# rn_configs/cpu_demo.yaml: vit_micro, 64 px images, 8 px patches (an 8 x 8 grid), 2 levels.
MODEL = ModelConfig(arch="vit_micro", patch_size=8, image_size=64, predictor_embed_dim=64, predictor_depth=2,
                    predictor_num_heads=4, num_levels=2, level_weights=(1.0, 0.5))
MASKING = MaskConfig(num_targets=3, target_scale=(0.1, 0.2), min_keep=4)


def make_run(compiled, batch_size):
    """A fresh model + optimizer (same init for both modes) and a function that runs one timed step."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    forward = compile_forward(model) if compiled else model
    images = normalize_images(torch.randint(0, 256, (batch_size, 3, 64, 64), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(0)), "cpu", torch.float32)

    def step(i):
        masks = sample_masks(MASKING, batch_size=batch_size, grid_size=model.grid_size, seed=0, step=i)
        start = time.perf_counter()
        train_step(model, forward, optimizer, images, masks, lr=1e-4, weight_decay=0.05, momentum=0.996)
        return time.perf_counter() - start

    return step


def compare(*, steps, warmup, batch_size):
    """Warm-up each mode (compilation included), then alternate timed steps between the two modes, so
    that load from other processes on a shared machine falls on both alike. Median ms per step."""
    torch._dynamo.reset()
    counters.clear()
    runs = {"eager": make_run(False, batch_size), "compiled": make_run(True, batch_size)}
    result = {}
    for mode, step in runs.items():
        times = [step(i) for i in range(warmup)]
        result[mode] = dict(first_step_s=times[0], warmup_steps_s=sum(times))
    timed = {mode: [] for mode in runs}
    for i in range(warmup, warmup + steps):
        for mode, step in runs.items():
            timed[mode].append(step(i))
    for mode, times in timed.items():
        median = statistics.median(times)
        result[mode].update(step_ms=1e3 * median, images_per_s=batch_size / median)
    result["compiled"]["graphs_compiled"] = counters["stats"]["unique_graphs"]
    result["eager"]["graphs_compiled"] = 0
    return result


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
                  model=MODEL.as_record(), masking=dataclasses.asdict(MASKING), token_counts=mask_sizes(MASKING, (8, 8)),
                  batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
    result.update(compare(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size))
    result["speedup"] = result["eager"]["step_ms"] / result["compiled"]["step_ms"]

    print(f"{result['device']}, torch {result['torch']}, batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'mode':9} | {'first step (s)':>14} | {'warm-up (s)':>11} | {'median ms/step':>14} | {'images/s':>8} | graphs")
    for mode in ("eager", "compiled"):
        r = result[mode]
        print(f"{mode:9} | {r['first_step_s']:14.2f} | {r['warmup_steps_s']:11.2f} | {r['step_ms']:14.1f} | "
              f"{r['images_per_s']:8.0f} | {r['graphs_compiled']}")
    print(f"compiled speed-up: {result['speedup']:.2f}x")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
