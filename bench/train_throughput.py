"""Steady-state training throughput: images/s, MFU and data-wait fraction for a config.

    python bench/train_throughput.py --config-file rn_configs/h100_100ep.yaml [--bench.steps=50] --bench.out=FILE.json

With data.train_dataset pointing at a beton, batches come from the real FFCV train loader and the
data-wait fraction is measured; with an empty data.train_dataset they are random uint8 tensors made
once (model speed alone; data-wait is then 0 by construction and the JSON says so). Timing uses
device events on CUDA (synchronised once per timed window), wall clock on the CPU.
"""
import json
import os
import time

import torch

from hjepa import schedules
from hjepa.config import config_as_dict, config_from_cli, format_config
from hjepa.engine import autocast_dtype, build_optimizer, compile_forward, masks_to_device, train_step
from hjepa.errors import exit_on_user_error
from hjepa.runlog import cpu_model
from hjepa.flops import mfu, train_flops_per_image
from hjepa.masks import sample_masks
from hjepa.model import build_model
from hjepa.parallel import resolve_device
from hjepa.loaders import build_train_loader, normalize_images
from hjepa.sections import data_config, mask_config, model_config

READS = ("data", "model", "masking", "hardware", "bench")


def batches_forever(cfg):
    """uint8 (B, 3, H, W) CPU batches: the real train loader looped over epochs, or one fixed random batch."""
    if cfg["data.train_dataset"]:
        loader = build_train_loader(data_config(cfg), distributed=False, drop_last=True)
        epoch = 0
        try:
            while True:
                for images, _, _ in loader.epoch(epoch):
                    yield images
                epoch += 1
        finally:
            loader.close()
    else:
        size, batch = cfg["data.image_size"], cfg["data.batch_size"]
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        while True:
            yield images


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv, reads=READS)
    print(format_config(cfg, READS))
    device = resolve_device(cfg["hardware.device"])
    # Importing ffcv sets torch's threads to 1 (its Compiler couples them to numba's): set them here.
    torch.set_num_threads(cfg["hardware.num_threads"] or os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(model_config(cfg)).to(device)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    forward = compile_forward(model, cfg["hardware.compile_mode"]) if cfg["hardware.compile"] else model
    amp_dtype = autocast_dtype(device, cfg["hardware.bf16"])
    masking = mask_config(cfg)
    grid = model.grid_size
    flops_per_image = train_flops_per_image(model.model_config, masking=masking, num_patches=grid[0] * grid[1])
    warmup, steps = cfg["bench.warmup_steps"], cfg["bench.steps"]
    batch = cfg["data.batch_size"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    source = batches_forever(cfg)
    data_wait, t0 = 0.0, None
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            t0, data_wait = time.perf_counter(), 0.0
        t_fetch = time.perf_counter()
        images = next(source)
        data_wait += time.perf_counter() - t_fetch
        masks = sample_masks(masking, batch_size=images.shape[0], grid_size=grid, seed=0, step=step)
        x = normalize_images(images, device, amp_dtype or torch.float32)  # (B, 3, H, W)
        train_step(model, forward, optimizer, x, masks_to_device(masks, device), lr=1e-4, weight_decay=0.05,
                   momentum=schedules.ema_momentum(step, total_steps=warmup + steps, start=0.996, end=1.0),
                   amp_dtype=amp_dtype)
    sync()
    elapsed = time.perf_counter() - t0
    source.close()

    images_per_s = steps * batch / elapsed
    result = {
        "images_per_s": images_per_s,
        "step_time_ms": 1000 * elapsed / steps,
        "mfu": mfu(images_per_s, flops_per_image, cfg["hardware.peak_tflops"]),
        "peak_tflops": cfg["hardware.peak_tflops"],
        "train_gflops_per_image": flops_per_image / 1e9,
        "data_wait_fraction": data_wait / elapsed,
        "data": cfg["data.train_dataset"] or "synthetic in-memory batch (no loader)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)",
        "arch": cfg["model.arch"], "image_size": cfg["data.image_size"], "patch_size": cfg["model.patch_size"],
        "batch_size": batch, "steps": steps, "warmup_steps": warmup,
        "compile": cfg["hardware.compile"], "compile_mode": cfg["hardware.compile_mode"], "amp": str(amp_dtype),
        "num_workers": cfg["data.num_workers"],
        "config": config_as_dict(cfg, READS),
    }
    rows = [("images/s", f"{images_per_s:,.1f}"), ("step time (ms)", f"{result['step_time_ms']:.1f}"),
            ("MFU", f"{100 * result['mfu']:.2f}% of {result['peak_tflops']} TFLOP/s"),
            ("data-wait fraction", f"{100 * result['data_wait_fraction']:.2f}%"), ("device", result["device"])]
    for name, value in rows:
        print(f"  {name:<20} {value}")
    if cfg["bench.out"]:
        with open(cfg["bench.out"], "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {cfg['bench.out']}")
    return result


if __name__ == "__main__":
    main()
