"""GPU check: every batch reaches the device as the loader produced it, with the host running ahead.

    python bench/copy_check.py --bench.steps=500 [--bench.batch_size=64] [--data.image_size=128] --bench.out=FILE.json

FFCV hands out views of pinned output buffers that its thread overwrites once the next batch is
requested. For every step this takes a checksum of the batch on the host, before the copy, and one of
the copy on the device. A spin kernel per step keeps the GPU slower than the loader, so the host runs
up to MAX_STEPS_AHEAD steps ahead, as training does without per-step syncs; the device checksums are
read back once, at the end. Two copy paths are checked on the same batches:
  staged: hjepa.data.images_to_device (a torch-owned pinned copy first), must match on every step;
  direct: a non_blocking copy straight from FFCV's view, the race the staged path removes (a
          mismatch here shows the check can see one).
The data is bench.num_images synthetic images written to a beton in bench.work_dir. Exit status 1 when
the staged path mismatches. Needs CUDA.
"""
import collections
import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # run by path from anywhere

import torch

from hjepa.beton import write_beton
from hjepa.config import config_from_cli, format_config
from hjepa.data import build_train_loader, images_to_device
from hjepa.errors import UserError, exit_on_user_error
from hjepa.synthetic import make_images

MAX_STEPS_AHEAD = 8  # > FFCV's 5 output slots: a copy left pending that long reads a reused slot


def batch_checksum(images):
    """int64 sum of a uint8 batch, on the batch's device (no sync). Enough to see a race: a batch read
    while FFCV rewrites its buffer holds bytes of other images, which changes the sum."""
    return images.sum(dtype=torch.int64)


def direct_copy(images, device):
    """The racy path: on CUDA FFCV's views are already pinned, so pin_memory() returns the same memory."""
    return images.pin_memory().to(device, non_blocking=True)


def _spin_cycles_per_ms():
    """Calibrates torch.cuda._sleep (a kernel that spins for a number of GPU clock cycles)."""
    torch.cuda._sleep(1_000_000)  # warm-up: the first launch pays module loading
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def check_device_copies(batches, device, *, steps=500, to_device=images_to_device, gpu_ms_per_step=30.0,
                        max_steps_ahead=MAX_STEPS_AHEAD):
    """Copy `steps` uint8 CPU batches from `batches` with `to_device(images, device)`, the GPU kept busy
    gpu_ms_per_step per step and the host at most max_steps_ahead steps ahead of it; compare a host
    checksum taken before each copy with the device checksum of the copy.

    Returns {"steps", "mismatched_steps", "first_mismatch" (step or None)}. The host waits only for the
    step max_steps_ahead back, as a training loop's queue of kernels would make it wait. On the CPU
    (a smoke run) there is nothing to run ahead of: the copies are synchronous.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    cycles = int(gpu_ms_per_step * _spin_cycles_per_ms()) if cuda else 0
    host_sums, device_sums, in_flight = [], [], collections.deque()
    for images in batches:
        if len(host_sums) == steps:
            break
        host_sums.append(int(batch_checksum(images)))  # on the host, before the copy
        x = to_device(images, device)
        if not cuda:
            device_sums.append(batch_checksum(x))
            continue
        torch.cuda._sleep(cycles)  # the "training step": the stream reaches the next copy this much later
        device_sums.append(batch_checksum(x))
        done = torch.cuda.Event()
        done.record()
        in_flight.append(done)
        if len(in_flight) > max_steps_ahead:
            in_flight.popleft().synchronize()
    if len(host_sums) < steps:
        raise ValueError(f"batches ran out after {len(host_sums)} of {steps} steps")
    on_device = torch.stack(device_sums).cpu().tolist()  # the one read-back
    mismatched = [step for step, (a, b) in enumerate(zip(host_sums, on_device)) if a != b]
    return {"steps": steps, "mismatched_steps": len(mismatched),
            "first_mismatch": mismatched[0] if mismatched else None}


def _batches_forever(loader):
    epoch = 0
    while True:
        for images, _, _ in loader.epoch(epoch):
            yield images
        epoch += 1


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv)
    print(format_config(cfg, ["data", "bench"]))
    if not torch.cuda.is_available():
        raise UserError("bench/copy_check.py needs a CUDA device")
    device = torch.device("cuda")
    os.makedirs(cfg["bench.work_dir"], exist_ok=True)
    path = os.path.join(cfg["bench.work_dir"], "copy_check.beton")
    num_classes = 10
    write_beton(make_images(max(1, cfg["bench.num_images"] // num_classes), num_classes, size=(160, 120), seed=0),
                path, dataset="copy_check", split="train", class_names=[str(c) for c in range(num_classes)],
                source="hjepa.synthetic.make_images", progress=False)
    results = {"device": torch.cuda.get_device_name(device), "batch_size": cfg["bench.batch_size"],
               "image_size": cfg["data.image_size"], "max_steps_ahead": MAX_STEPS_AHEAD}
    for name, to_device in (("staged", images_to_device), ("direct", direct_copy)):
        with build_train_loader(path, batch_size=cfg["bench.batch_size"], num_workers=cfg["bench.num_workers"] or
                                os.cpu_count(), image_size=cfg["data.image_size"], seed=0) as loader:
            results[name] = check_device_copies(_batches_forever(loader), device, steps=cfg["bench.steps"],
                                                to_device=to_device)
    print(f"{'path':<8}{'steps':>8}{'mismatched':>12}{'first':>8}")
    for name in ("staged", "direct"):
        r = results[name]
        print(f"{name:<8}{r['steps']:>8}{r['mismatched_steps']:>12}{str(r['first_mismatch']):>8}")
    if cfg["bench.out"]:
        with open(cfg["bench.out"], "w") as f:
            json.dump(results, f, indent=2)
    if results["staged"]["mismatched_steps"]:
        print("FAIL: staged copies differ from the batches the host saw", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
