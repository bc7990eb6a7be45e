"""I-JEPA multi-block masks (hjepa.masks.sample_masks)."""
import numpy as np
import pytest
import torch

from hjepa.masks import MaskConfig, _random_subset, mask_sizes, sample_masks, unpadded

GRID = (14, 14)
DRAW = dict(batch_size=32, grid_size=GRID, seed=0, rank=0)  # the rest: MaskConfig's defaults (I-JEPA's masks)


def split(overrides):
    """(MaskConfig, sample_masks' other arguments) of the defaults with `overrides`."""
    draw = {k: overrides.pop(k) for k in list(overrides) if k in DRAW}
    return MaskConfig(**overrides), {**DRAW, **draw}


def masks(step=0, **overrides):
    config, draw = split(overrides)
    return sample_masks(config, **draw, step=step)


def sizes(**overrides):
    config, draw = split(overrides)
    return mask_sizes(config, draw["grid_size"])


def test_masks_are_int64_index_tensors_of_the_documented_shapes():
    m = masks()
    num_context, num_target = sizes()
    assert m.ctx_idx.dtype == m.tgt_idx.dtype == m.tgt_pos.dtype == torch.int64
    assert m.ctx_idx.shape == (32, num_context) and m.tgt_idx.shape == (4, 32, num_target)
    assert m.tgt_pos.shape == (num_target, 2)
    assert 0 <= int(m.ctx_idx.min()) and int(m.ctx_idx.max()) < 196 and int(m.tgt_idx.max()) < 196


def test_shapes_are_fixed_per_configuration_whatever_the_step_or_batch_draw():
    num_context, num_target = sizes()
    shapes = {(m.ctx_idx.shape[1], m.tgt_idx.shape[2]) for m in (masks(step) for step in range(30))}
    assert shapes == {(num_context, num_target)}
    assert masks(batch_size=1).ctx_idx.shape == (1, num_context)
    assert len({masks(step).tgt_shape for step in range(30)}) > 2  # while the block size still varies


def test_target_blocks_are_rectangles_listed_row_major_then_padding():
    for step in range(10):
        m = masks(step)
        th, tw = m.tgt_shape
        real = m.tgt_idx[..., :th * tw]
        rows, cols = real // GRID[1], real % GRID[1]  # (T, B, th*tw)
        top, left = rows[..., :1], cols[..., :1]
        assert torch.equal(rows - top, torch.arange(th).repeat_interleave(tw).expand_as(rows))
        assert torch.equal(cols - left, torch.arange(tw).repeat(th).expand_as(cols))
        assert torch.equal(m.tgt_pos[:th * tw], torch.stack([rows[0, 0] - top[0, 0], cols[0, 0] - left[0, 0]], 1))
        # Padding: marked (-1, -1), and pointing at the block's top-left patch (a real patch of the block).
        assert (m.tgt_pos[th * tw:] == -1).all()
        assert torch.equal(m.tgt_idx[..., th * tw:], real[..., :1].expand(-1, -1, m.tgt_idx.shape[2] - th * tw))


def test_unpadded_masks_keep_exactly_the_real_target_tokens_and_the_same_context():
    for step in range(10):
        m = masks(step)
        th, tw = m.tgt_shape
        cut = unpadded(m)
        assert cut.tgt_idx.shape == (m.tgt_idx.shape[0], m.tgt_idx.shape[1], th * tw)
        assert torch.equal(cut.tgt_idx, m.tgt_idx[..., :th * tw])
        assert torch.equal(cut.tgt_pos, m.tgt_pos[:th * tw]) and (cut.tgt_pos >= 0).all()
        assert torch.equal(cut.ctx_idx, m.ctx_idx) and cut.tgt_shape == m.tgt_shape

def test_a_steps_block_size_does_not_depend_on_the_batch_size():
    # Drawn first from the step's stream: a scan of block sizes can use one-image batches.
    assert [masks(step, batch_size=1).tgt_shape for step in range(40)] == [masks(step).tgt_shape for step in range(40)]

def test_target_padding_is_the_largest_block_the_scale_and_aspect_allow():
    # keep = int(196 * [0.15, 0.2]) = 29..39 patches at h/w in [0.75, 1.5]: the largest is 7 x 6 = 42
    # (keep 39 at h/w 7/6: round(sqrt(39 * 1.17)) = 7, round(sqrt(39 / 1.17)) = 6).
    assert sizes()[1] == 42
    assert max(a * b for a, b in (masks(step).tgt_shape for step in range(300))) == 42
    # 4 x 4 grid, exactly 4 patches at aspect 1: 2 x 2 blocks, no padding.
    assert sizes(grid_size=(4, 4), target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0), min_keep=1)[1] == 4


def test_fixed_context_size_is_the_context_a_draw_always_leaves_when_that_is_fixed():
    # With overlap allowed, the context is the whole context block: 4 x 4 grid, blocks at most 3 x 3.
    num_context, _ = sizes(grid_size=(4, 4), num_targets=1, target_scale=(0.25, 0.25), target_aspect=(1.0, 1.0),
                           context_scale=(1.0, 1.0), allow_overlap=True, min_keep=1)
    assert num_context == 9


def test_random_subset_picks_from_the_kept_positions_in_row_major_order():
    flat = np.array([[True, False, True, True, False, True]])  # kept positions 0, 2, 3, 5
    assert _random_subset(flat, np.array([[0.0, 0.0]])).tolist() == [[0, 2]]
    # 0.99 picks the last of the remaining kept positions each time: 5, then 0 (swapped in its place).
    assert _random_subset(flat, np.array([[0.99, 0.99]])).tolist() == [[0, 5]]


def test_random_subset_keeps_every_available_position_equally_often():
    rng = np.random.default_rng(0)
    flat = np.tile(np.array([True, False, True, True, False, True, True]), (20000, 1))  # 5 kept positions
    chosen = _random_subset(flat, rng.random((20000, 2)))  # (20000, 2)
    frequency = np.bincount(chosen.ravel(), minlength=7) / 20000
    assert frequency[[1, 4]].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(frequency[[0, 2, 3, 5, 6]], 2 / 5, atol=0.015)


def test_context_covers_the_bottom_rows_as_much_as_the_top_rows():
    # Cutting each image's context to the batch minimum in row-major order (I-JEPA) left the last three
    # of 14 rows ~6% of the context and the first three ~40%; a random subset is symmetric.
    rows = torch.zeros(14)
    for step in range(10):
        rows += torch.bincount((masks(step, batch_size=64).ctx_idx // 14).flatten(), minlength=14)
    share = (rows / rows.sum()).tolist()
    assert sum(share[11:]) == pytest.approx(sum(share[:3]), abs=0.04)
    assert sum(share[11:]) > 0.2


def test_target_sizes_follow_scale_and_aspect_ranges():
    shapes = {masks(step).tgt_shape for step in range(100)}
    assert len(shapes) > 2  # one size per batch, different batches differ
    for th, tw in shapes:
        # keep = int(196 * [0.15, 0.2]) = 29..39 patches, then h, w rounded: within one row/column.
        assert (th - 1) * (tw - 1) <= 39 and (th + 1) * (tw + 1) >= 29
        assert 0.75 * tw - 1 <= th <= 1.5 * tw + 1


def test_context_excludes_every_target_patch_without_overlap():
    for step in range(20):
        m = masks(step)
        for b in range(32):
            assert not set(m.ctx_idx[b].tolist()) & set(m.tgt_idx[:, b].reshape(-1).tolist())


def test_context_may_keep_target_patches_with_overlap():
    m = masks(allow_overlap=True, context_scale=(1.0, 1.0))
    shared = [set(m.ctx_idx[b].tolist()) & set(m.tgt_idx[:, b].reshape(-1).tolist()) for b in range(32)]
    assert any(shared)


def test_context_indices_are_distinct_and_sorted():
    m = masks()
    assert torch.equal(m.ctx_idx, m.ctx_idx.sort(dim=1).values)
    assert all(len(set(row.tolist())) == len(row) for row in m.ctx_idx)


def test_every_block_keeps_at_least_min_keep_patches():
    for step in range(50):
        m = masks(step, min_keep=36)
        assert m.tgt_shape[0] * m.tgt_shape[1] >= 36 and m.ctx_idx.shape[1] >= 36


def test_impossible_min_keep_raises():
    with pytest.raises(ValueError, match="min_keep"):
        masks(min_keep=100)


def test_masks_are_a_pure_function_of_seed_step_rank():
    a, b = masks(step=7), masks(step=7)
    assert torch.equal(a.ctx_idx, b.ctx_idx) and torch.equal(a.tgt_idx, b.tgt_idx)
    for other in (masks(step=8), masks(step=7, rank=1), masks(step=7, seed=1)):
        assert not (other.ctx_idx.shape == a.ctx_idx.shape and torch.equal(other.ctx_idx, a.ctx_idx)
                    and torch.equal(other.tgt_idx, a.tgt_idx))
