"""Learning rate, weight decay and EMA momentum as pure functions of the global step.

Resuming a run therefore needs only the step (no scheduler state to replay), as in MAE/DINO. Shapes
follow I-JEPA (Assran et al. 2023, src/utils/schedulers.py): linear warmup then cosine decay of the
learning rate, cosine *increase* of weight decay, linear EMA momentum ramp.
"""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedules (the optim section). lr is per 256 images; the trainer scales it."""
    lr: float = 5e-4
    warmup_epochs: float = 10
    warmup_start_factor: float = 0.2  # warmup starts at this fraction of the peak lr
    min_lr: float = 1e-6              # absolute, at the last step
    weight_decay: float = 0.04        # at step 0, cosine to final_weight_decay
    final_weight_decay: float = 0.4
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 0.0            # max global grad norm, 0 disables
    ema_start: float = 0.996          # target-encoder EMA momentum at step 0, linear to ema_end
    ema_end: float = 1.0

    def peak_lr(self, global_batch):
        return self.lr * global_batch / 256


def schedule_values(step, optim, *, total_steps, warmup_steps, global_batch):
    """{lr, weight_decay, momentum} at `step` for OptimConfig `optim`."""
    peak_lr = optim.peak_lr(global_batch)
    return dict(
        lr=learning_rate(step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                         warmup_start_lr=peak_lr * optim.warmup_start_factor, min_lr=optim.min_lr),
        weight_decay=weight_decay(step, total_steps=total_steps, start=optim.weight_decay,
                                  end=optim.final_weight_decay),
        momentum=ema_momentum(step, total_steps=total_steps, start=optim.ema_start, end=optim.ema_end))


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
