"""The weighted/random epoch orders as pure functions (hjepa.sampler)."""
import numpy as np
import pytest

from hjepa.errors import UserError
from hjepa.sampler import (expected_counts, parse_mixture, random_epoch_indices, weighted_epoch_indices)

SIZES = [500, 300, 100]  # members occupy [0, 500), [500, 800), [800, 900)
WEIGHTS = [0.6, 0.25, 0.15]


def member_of(indices):
    return np.searchsorted(np.cumsum(SIZES), indices, side="right")


def test_seed_example_counts_are_rounded_shares_of_epoch_samples():
    counts = expected_counts([126689, 105000, 50000], WEIGHTS, epoch_samples=276000)
    assert counts.tolist() == [165600, 69000, 41400]


def test_default_epoch_samples_is_sum_of_member_sizes():
    assert expected_counts(SIZES, WEIGHTS).sum() == sum(SIZES)


def test_counts_sum_exactly_to_epoch_samples_by_largest_remainder():
    assert expected_counts([10, 10, 10], [1, 1, 1], epoch_samples=10).tolist() == [4, 3, 3]


def test_epoch_samples_round_down_to_full_batches_on_every_rank():
    counts = expected_counts(SIZES, WEIGHTS, epoch_samples=1000, world_size=3, batch_size=16)
    assert counts.sum() == (1000 // 48) * 48


def test_weighted_epoch_gives_each_member_its_share():
    indices = weighted_epoch_indices(SIZES, WEIGHTS, seed=0, epoch=0)
    assert np.bincount(member_of(indices), minlength=3).tolist() == expected_counts(SIZES, WEIGHTS).tolist()
    assert expected_counts(SIZES, WEIGHTS).tolist() == [540, 225, 135]


def all_ranks(sizes, weights, *, epoch, world_size, batch_size, seed=1, epoch_samples=-1):
    return [weighted_epoch_indices(sizes, weights, epoch_samples=epoch_samples, seed=seed, epoch=epoch, rank=r,
                                   world_size=world_size, batch_size=batch_size) for r in range(world_size)]


def test_rank_shards_are_disjoint_equal_and_add_up_to_the_counts():
    # E = 2500 on 4 ranks x batch 8 is 2496, no member drawn beyond its size: no sample twice.
    weights, sizes = [0.3, 0.3, 0.4], [1000, 1000, 1000]
    expected = expected_counts(sizes, weights, epoch_samples=2500, world_size=4, batch_size=8)
    assert expected.tolist() == [749, 749, 998]
    for epoch in range(6):
        shards = all_ranks(sizes, weights, epoch=epoch, world_size=4, batch_size=8, epoch_samples=2500)
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) % 8 == 0
        union = np.concatenate(shards)
        assert len(np.unique(union)) == len(union)
        counts = np.bincount(np.searchsorted([1000, 2000, 3000], union, side="right"), minlength=3)
        assert counts.tolist() == expected.tolist()


def test_random_epochs_hold_no_sample_twice_when_batches_do_not_divide_the_dataset():
    # 1000 samples, 3 ranks x batch 16: each epoch holds 960, so epochs straddle passes over the data.
    for epoch in range(30):
        union = np.concatenate([random_epoch_indices(1000, seed=0, epoch=epoch, rank=r, world_size=3, batch_size=16)
                                for r in range(3)])
        assert len(union) == 960 and len(np.unique(union)) == 960 and union.max() < 1000


def test_weighted_epochs_repeat_a_sample_only_in_a_member_drawn_beyond_its_size():
    sizes, weights = [500, 300, 100], [0.5, 0.2, 0.3]  # quotas 448, 179, 269 of E = 896 (2 ranks x 64)
    quotas = expected_counts(sizes, weights, world_size=2, batch_size=64)
    assert quotas.tolist() == [448, 179, 269]
    for epoch in range(12):
        union = np.concatenate(all_ranks(sizes, weights, epoch=epoch, world_size=2, batch_size=64))
        times = np.bincount(union, minlength=900)
        assert times[:800].max() == 1  # members 0 and 1: quota below size, no repeats
        assert sorted(set(times[800:].tolist())) == [2, 3]  # member 2: 269 draws of 100 = 2 or 3 each


def test_every_sample_is_drawn_equally_often_to_within_one_over_epochs():
    sizes, weights = [500, 300, 100], [0.5, 0.2, 0.3]
    quotas = expected_counts(sizes, weights, world_size=2, batch_size=64)
    seen = np.zeros(900, dtype=np.int64)
    for epoch in range(1, 13):
        seen += np.bincount(np.concatenate(all_ranks(sizes, weights, epoch=epoch - 1, world_size=2, batch_size=64)),
                            minlength=900)
        for member, (lo, hi) in enumerate([(0, 500), (500, 800), (800, 900)]):
            share = epoch * quotas[member] / sizes[member]
            assert set(seen[lo:hi].tolist()) <= {int(np.floor(share)), int(np.ceil(share))}


def test_oversampled_member_repeats_as_little_as_possible():
    indices = weighted_epoch_indices([10, 90], [0.5, 0.5], seed=0, epoch=0)  # 50 draws from 10 samples
    repeats = np.bincount(indices[indices < 10], minlength=10)
    assert repeats.min() == repeats.max() == 5


def test_undersampled_member_continues_its_permutation_in_the_next_epoch():
    # member 0 (10 samples) gets 4 draws per epoch: epochs 0-1 repeat none, epochs 0-4 use each twice.
    draws = [[i for i in weighted_epoch_indices([10, 90], [0.04, 0.96], seed=3, epoch=e) if i < 10]
             for e in range(5)]
    assert [len(d) for d in draws] == [4] * 5
    assert len(set(draws[0] + draws[1])) == 8
    assert np.bincount(np.concatenate(draws), minlength=10).tolist() == [2] * 10


def test_member_order_is_redrawn_once_the_windows_have_gone_round_it():
    # 4 of 10 per epoch: epochs 0-4 go round exactly twice; epochs 5-9 use a fresh permutation.
    def member_sets(first):
        return [frozenset(i for i in weighted_epoch_indices([10, 90], [0.04, 0.96], seed=3, epoch=e) if i < 10)
                for e in range(first, first + 5)]

    assert member_sets(0) != member_sets(5)


def test_order_is_a_pure_function_of_seed_epoch_rank_world():
    def order(**kw):
        args = dict(seed=0, epoch=0, rank=0, world_size=2)
        args.update(kw)
        return weighted_epoch_indices(SIZES, WEIGHTS, **args)

    assert np.array_equal(order(), order())
    for change in (dict(seed=1), dict(epoch=1), dict(rank=1)):
        assert not np.array_equal(order(), order(**change))


def test_random_order_is_a_permutation_when_batches_divide_the_dataset():
    indices = random_epoch_indices(64, seed=0, epoch=5, batch_size=8)
    assert sorted(indices.tolist()) == list(range(64)) and indices.tolist() != list(range(64))


def test_parse_mixture_normalises_and_gives_missing_members_zero():
    weights = parse_mixture("b:1, a:3", ["a", "b", "c"])
    assert weights == {"a": 0.75, "b": 0.25, "c": 0.0}


@pytest.mark.parametrize("text", ["a:-1", "a:0,b:0", "a:nan", "a:inf", "zzz:1", "a", "a:x", "a:1,a:2", ""])
def test_parse_mixture_rejects_bad_strings(text):
    with pytest.raises(UserError):
        parse_mixture(text, ["a", "b"])


def test_bad_weights_are_rejected_before_sampling():
    with pytest.raises(UserError):
        weighted_epoch_indices(SIZES, [1, -1, 1], seed=0, epoch=0)
    with pytest.raises(UserError):
        weighted_epoch_indices(SIZES, [1, float("nan"), 1], seed=0, epoch=0)
