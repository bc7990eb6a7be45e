"""Does every loader batch reach the device as the loader produced it, with the host running ahead?

FFCV hands out views of pinned output buffers that its thread overwrites once the next batch has been
requested; a non_blocking copy runs when the stream gets to it. check_device_copies takes a checksum
of each batch on the host before the copy and one of the device copy, keeps the GPU busier than the
host (a spin kernel per step) so the host runs ahead as training does without per-step syncs, and
reads the device checksums back once, at the end. hjepa.loaders.images_to_device must match on every
batch; direct_copy (straight from FFCV's view) is the race it removes, a control showing the check can
see one. On the CPU the copies are synchronous: nothing runs ahead, so both paths match.
"""
import time

import numpy as np
import torch

from hjepa.loaders import images_to_device

MAX_STEPS_AHEAD = 32  # > FFCV's batches_ahead + 2 output slots: a copy left pending this long reads a reused slot
BUSY_PER_HOST_TIME = 1.5  # GPU spin per step / host time per step: the host's lead grows by a third of a step each step
MAX_BUSY_MS = 100.0


def batch_checksum(images):
    """(B,) int64: a position-weighted checksum of each uint8 (B, 3, H, W) image, the same on any device.

    Sums the channels-last bytes as 8-byte words by row and by column and weights the sums by position,
    so bytes of another image, or rows moved within one, change it; int64 arithmetic wraps modulo 2**64,
    so the order of summation does not change the result.
    """
    b, c, h, w = images.shape
    if (w * c) % 8:
        raise ValueError(f"a row of {w} x {c} bytes is not a whole number of 8-byte words")
    nhwc = images.permute(0, 2, 3, 1).contiguous()  # a view when the batch is channels-last already
    if nhwc.storage_offset() % 8:
        nhwc = nhwc.clone()  # int64 words need 8-byte alignment
    words = nhwc.view(b, h, w * c).view(torch.int64)  # (B, H, 3W/8)
    rows = words.sum(2) * torch.arange(1, h + 1, device=images.device)  # (B, H)
    cols = words.sum(1) * torch.arange(1, words.shape[2] + 1, device=images.device)  # (B, 3W/8)
    return rows.sum(1) + 1_000_003 * cols.sum(1)


def direct_copy(images, device):
    """The racy path: on CUDA FFCV's views are pinned already, so this copy reads FFCV's buffer when the
    stream reaches it, not now."""
    return images.to(device, non_blocking=True)


def _spin_cycles_per_ms():
    """torch.cuda._sleep spins the GPU for a number of clock cycles: how many make a millisecond."""
    torch.cuda._sleep(1_000_000)  # the first launch pays module loading
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def check_device_copies(batches, device, *, steps, to_device=images_to_device, max_steps_ahead=MAX_STEPS_AHEAD):
    """Copy `steps` uint8 (B, 3, H, W) CPU batches from the iterator `batches` with to_device(images,
    device) and compare each copy's checksum with the host's, taken before the copy.

    On CUDA, before each copy the GPU spins BUSY_PER_HOST_TIME times the host's time per step (its
    running mean), so the copy waits in the stream while the host fetches the next batches; the host
    waits only for the step max_steps_ahead back, as a training loop's queue of kernels makes it wait.
    Returns {steps, batch_size, mismatched_batches, first_mismatch_step, passed, host_lead_steps_mean,
    host_lead_steps_max, host_step_ms, loop_s}.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    cycles_per_ms = _spin_cycles_per_ms() if cuda else 0.0
    host_sums, device_sums, pending, leads, host_ms = [], [], [], [], 0.0
    t0 = time.perf_counter()
    for images in batches:
        if len(host_sums) == steps:
            break
        t_step = time.perf_counter()
        host_sums.append(batch_checksum(images))  # (B,) on the host, before the copy
        if cuda:
            torch.cuda._sleep(int(cycles_per_ms * min(MAX_BUSY_MS, BUSY_PER_HOST_TIME * host_ms)))
        device_sums.append(batch_checksum(to_device(images, device)))  # (B,) no host sync
        host_ms = 0.8 * host_ms + 0.2 * 1000 * (time.perf_counter() - t_step)  # without the wait below
        if cuda:
            pending.append(torch.cuda.Event())
            pending[-1].record()
            if len(pending) > max_steps_ahead:
                pending.pop(0).synchronize()  # bound the lead (and the pinned memory it holds)
            pending = [event for event in pending if not event.query()]
            leads.append(len(pending))
    if len(host_sums) < steps:
        raise ValueError(f"batches ran out after {len(host_sums)} of {steps} steps")
    mismatched = (torch.stack(device_sums).cpu() != torch.stack(host_sums)).any(dim=1)  # (steps,): the one read-back
    return dict(steps=steps, batch_size=len(host_sums[0]), mismatched_batches=int(mismatched.sum()),
                first_mismatch_step=int(mismatched.nonzero()[0]) if mismatched.any() else None,
                passed=not bool(mismatched.any()), host_lead_steps_mean=round(float(np.mean(leads or [0])), 1),
                host_lead_steps_max=max(leads, default=0), host_step_ms=round(host_ms, 1),
                loop_s=round(time.perf_counter() - t0, 1))
