"""Epoch orders as pure functions of (seed, epoch, rank, world size), and their FFCV TraversalOrder.

`weighted_epoch_indices` is the multi-dataset mixing sampler: each epoch draws a fixed number of
samples (the member's quota) from every member of a combined beton, shuffles the union and gives every
rank a disjoint shard of the same length. The `random` order is the same function with one member of
weight 1, so every training order in this project is reproducible from the epoch number alone (resume
needs nothing else).

How the counts are made exact (the start-of-training table equals what an epoch contains):
- E (epoch_samples, default = sum of member sizes) is first rounded DOWN to a multiple of
  world_size * batch_size, so every rank gets the same number of full batches and nothing is dropped
  or padded later (FFCV's drop_last never bites).
- Counts are round(w_d * E) by largest remainder (Hamilton): floor(w_d * E) each, then the leftover
  units go to the largest fractional parts (ties: earlier member). The counts sum to E exactly and
  differ from plain round() by at most one, only where plain rounding would not sum to E.

Which samples a member gives (`_member_draws`): its quota q is a window of q consecutive positions on
a circle, a random permutation of the member's n samples; epoch e's window starts where epoch e-1's
ended, at e*q mod n, and wraps round as often as q needs. So within one epoch a sample repeats only
when q > n (then every sample comes floor(q/n) or ceil(q/n) times), and after e epochs every sample
has been drawn floor(e*q/n) or ceil(e*q/n) times: samples a full-batch epoch leaves out come first in
the next. The circle is redrawn each time the windows have gone round it a whole number of times
(every n / gcd(n, q) epochs). Cutting epochs from one endless chain of fresh permutations instead
would put the end of one permutation and the start of the next into one epoch whenever E is not a
multiple of n: samples twice in an epoch (14% of ImageNet-100's 126,689 at batch 256 by epoch 99).
"""
import math

import numpy as np
from ffcv.loader.loader import ORDER_MAP
from ffcv.traversal_order.base import TraversalOrder

from hjepa.errors import UserError

# Distinct stream tags so the member permutations and the union shuffle never share random numbers.
_MEMBER_STREAM = 0x6D656D62
_SHUFFLE_STREAM = 0x73687566


def parse_mixture(text, member_names):
    """'imagenet100:0.6,stl10:0.25,cifar100:0.15' -> {name: weight normalised to sum 1}, in member order.

    Members missing from the string get weight 0. Raises UserError for malformed items, unknown or
    repeated names, negative/NaN/infinite weights and an all-zero mixture.
    """
    weights = {}
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"mixture item '{item}' is not name:weight (e.g. imagenet100:0.6)")
        if name not in member_names:
            raise UserError(f"mixture names unknown member '{name}' (the beton has: {', '.join(member_names)})")
        if name in weights:
            raise UserError(f"mixture names member '{name}' twice")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"mixture weight '{value}' of '{name}' is not a number")
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"mixture weight of '{name}' must be a finite number >= 0, got {value}")
        weights[name] = weight
    total = sum(weights.values())
    if total <= 0:
        raise UserError(f"mixture '{text}' has no positive weight")
    return {name: weights.get(name, 0.0) / total for name in member_names}


def _check_weights(member_sizes, weights):
    sizes = np.asarray(member_sizes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if sizes.ndim != 1 or w.shape != sizes.shape or len(sizes) == 0:
        raise UserError(f"need one weight per member: {len(sizes)} members, {len(w)} weights")
    if np.any(sizes < 0):
        raise UserError(f"member sizes must be >= 0, got {sizes.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise UserError(f"mixture weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    if np.any((w > 0) & (sizes == 0)):
        raise UserError("a member with a positive weight has no samples")
    return sizes, w / w.sum()


def effective_epoch_samples(member_sizes, *, epoch_samples=-1, world_size=1, batch_size=1):
    """E after rounding down to a multiple of world_size * batch_size (-1 = sum of member sizes)."""
    total = int(np.sum(member_sizes)) if epoch_samples is None or epoch_samples < 0 else int(epoch_samples)
    unit = world_size * batch_size
    return (total // unit) * unit


def expected_counts(member_sizes, weights, *, epoch_samples=-1, world_size=1, batch_size=1):
    """Samples drawn from each member per epoch (all ranks together), as an int64 array."""
    sizes, w = _check_weights(member_sizes, weights)
    total = effective_epoch_samples(sizes, epoch_samples=epoch_samples, world_size=world_size,
                                    batch_size=batch_size)
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    # Largest remainder; argsort is stable, so ties go to the earlier member.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


def _member_draws(size, count, *, seed, member, epoch):
    """Member-local indices of epoch `epoch`'s `count` draws from a member of `size` samples (int64).

    The window [epoch*count, (epoch+1)*count) taken round a circle (see the module docstring). The
    circle of lap k (epochs k*cycle .. (k+1)*cycle - 1) is a permutation seeded by (seed, member, k),
    so any epoch is computed without replaying earlier ones.
    """
    if count == 0:
        return np.empty(0, dtype=np.int64)
    cycle = size // math.gcd(size, count)  # epochs until the windows end exactly where they began
    lap, epoch_in_lap = divmod(epoch, cycle)
    circle = np.random.default_rng([seed, _MEMBER_STREAM, member, lap]).permutation(size)
    start = epoch_in_lap * count % size
    return circle[(start + np.arange(count, dtype=np.int64)) % size]


def weighted_epoch_indices(member_sizes, weights, *, epoch_samples=-1, seed, epoch, rank=0, world_size=1,
                           batch_size=1):
    """This rank's sample indices for one epoch of the weighted order (int64, global beton indices).

    Members occupy contiguous index ranges in member order. Every rank gets the same number of
    indices, a multiple of batch_size; the shards of all ranks are disjoint slices of one shuffled
    union whose per-member counts are exactly `expected_counts(...)`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    sizes, _ = _check_weights(member_sizes, weights)
    counts = expected_counts(sizes, weights, epoch_samples=epoch_samples, world_size=world_size,
                             batch_size=batch_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    union = np.concatenate([
        offsets[d] + _member_draws(int(sizes[d]), int(counts[d]), seed=seed, member=d, epoch=epoch)
        for d in range(len(sizes))
    ])  # (E,)
    union = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch]).permutation(union)
    per_rank = len(union) // world_size  # exact: E is a multiple of world_size
    return union[rank * per_rank:(rank + 1) * per_rank]


def random_epoch_indices(num_samples, *, epoch_samples=-1, seed, epoch, rank=0, world_size=1, batch_size=1):
    """The `random` order: the weighted order with one member of weight 1, sharded the same way.

    With the default E (= num_samples, rounded down to a multiple of world_size * batch_size) an epoch
    holds no sample twice, and the few samples a full-batch epoch cannot hold open the next epoch
    instead of being dropped, so all are seen equally often (to within one).
    """
    return weighted_epoch_indices([num_samples], [1.0], epoch_samples=epoch_samples, seed=seed, epoch=epoch,
                                  rank=rank, world_size=world_size, batch_size=batch_size)


class EpochOrder(TraversalOrder):
    """FFCV TraversalOrder calling a pure `indices_for_epoch(epoch) -> np.ndarray`.

    FFCV 1.0.2 cannot take a TraversalOrder instance or class in Loader(order=...): the class fails an
    isinstance test, then an instance is called (fixed on FFCV's main branch after the 1.0.2 release);
    `register_order` puts a factory in ffcv.loader.loader.ORDER_MAP under a fresh key instead. The
    function does its own rank sharding (in FFCV each order shards itself).
    """

    def __init__(self, loader, indices_for_epoch):
        super().__init__(loader)
        self.indices_for_epoch = indices_for_epoch

    def sample_order(self, epoch):
        return self.indices_for_epoch(epoch)


class _OrderKey:
    """A unique hashable ORDER_MAP key (one per Loader), named for error messages."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<hjepa order {self.name}>"


def register_order(name, indices_for_epoch):
    """Register an EpochOrder factory in FFCV's ORDER_MAP; returns the key to pass as Loader(order=key).

    Call `unregister_order(key)` once the Loader is built (it keeps the TraversalOrder instance).
    """
    key = _OrderKey(name)
    ORDER_MAP[key] = lambda loader: EpochOrder(loader, indices_for_epoch)
    return key


def unregister_order(key):
    ORDER_MAP.pop(key, None)


def format_expected_counts(member_names, member_sizes, counts):
    """The start-of-training table: member, size, samples per epoch, share, passes over the member."""
    total = int(np.sum(counts))
    lines = [f"{'member':<16}{'size':>10}{'per epoch':>12}{'share':>8}{'passes':>8}"]
    for name, size, count in zip(member_names, member_sizes, counts):
        passes = count / size if size else 0.0
        lines.append(f"{name:<16}{int(size):>10}{int(count):>12}{count / max(total, 1):>8.3f}{passes:>8.2f}")
    lines.append(f"{'total':<16}{int(np.sum(member_sizes)):>10}{total:>12}")
    return "\n".join(lines)


def expected_counts_table(loader):
    """The table for a hjepa.loaders loader with a weighted/balanced order; "" for other orders."""
    if getattr(loader, "epoch_counts", None) is None:
        return ""
    names, sizes = zip(*loader.members)
    return format_expected_counts(names, sizes, loader.epoch_counts)
