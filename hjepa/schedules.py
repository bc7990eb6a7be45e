"""Learning rate, weight decay and EMA momentum as pure functions of the global step.

Resuming a run therefore needs only the step (no scheduler state to replay), as in MAE/DINO. Shapes
follow I-JEPA (Assran et al. 2023, src/utils/schedulers.py): linear warmup then cosine decay of the
learning rate, cosine *increase* of weight decay, linear EMA momentum ramp.
"""
import math


def learning_rate(step, *, total_steps, warmup_steps, peak_lr, warmup_start_lr, min_lr):
    """Linear warmup from `warmup_start_lr` to `peak_lr`, then cosine from `peak_lr` to `min_lr`."""
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay(step, *, total_steps, start, end):
    """Cosine from `start` (step 0) to `end` (last step)."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step, *, total_steps, start, end):
    """Linear from `start` (step 0) to `end` (last step)."""
    progress = min(1.0, step / max(1, total_steps))
    return start + (end - start) * progress
