"""Timed windows of training steps, as the benchmarks measure them: images/s, ms per step, the
fraction of the window spent waiting for data, MFU, and peak device memory.

A `trainer` is anything with `.step(step, images)` (one training step, no device sync), `.batch`
(images per step), `.device` and `.flops` (training FLOPs per image): bench/device_check.py's Trainer.
"""
import time

import torch

from hjepa.flops import mfu


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches_forever(loader, first_epoch=0):
    """uint8 (B, 3, H, W) host batches, epoch after epoch; close() stops the loader's thread."""
    epoch = first_epoch
    while True:
        for images, _, _ in loader.epoch(epoch):
            yield images
        epoch += 1


def reset_memory_stats(device):
    """Empty the caching allocator's cache and the peak counter; returns the bytes allocated now (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_gib(device, baseline=0):
    """Peak bytes allocated since the last reset, minus baseline, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - baseline) / 2**30, 2)


def timed_window(trainer, next_images, steps, first_step, peak_tflops=0.0):
    """Images/s, ms per step, data-wait fraction (time in next_images), last loss and MFU (None without
    peak_tflops) over `steps` steps numbered from first_step; one device sync at each end."""
    wait = 0.0
    sync(trainer.device)
    t0 = time.perf_counter()
    for step in range(first_step, first_step + steps):
        t_fetch = time.perf_counter()
        images = next_images()
        wait += time.perf_counter() - t_fetch
        out = trainer.step(step, images)
    sync(trainer.device)  # the only sync in the window
    elapsed = time.perf_counter() - t0
    loss = float(out["loss"].detach())
    img_s = steps * trainer.batch / elapsed
    return dict(img_s=round(img_s, 1), step_ms=round(1000 * elapsed / steps, 2),
                data_wait_fraction=round(wait / elapsed, 4), loss=loss,
                mfu=round(mfu(img_s, trainer.flops, peak_tflops), 4) if peak_tflops else None)


def loader_fed_window(trainer, loader, steps, first_step, peak_tflops=0.0):
    """timed_window on the loader's batches; the loader's epoch thread starts before the window."""
    source = batches_forever(loader)
    next(source)
    try:
        return timed_window(trainer, lambda: next(source), steps, first_step, peak_tflops)
    finally:
        source.close()
