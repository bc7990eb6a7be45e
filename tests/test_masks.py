"""I-JEPA multi-block masks (hjepa.masks.sample_masks)."""
import pytest
import torch

from hjepa.masks import sample_masks

GRID = (14, 14)
DEFAULTS = dict(batch_size=32, grid_size=GRID, num_targets=4, target_scale=(0.15, 0.2),
                target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), context_aspect=1.0,
                allow_overlap=False, min_keep=10, seed=0, rank=0)


def masks(step=0, **overrides):
    return sample_masks(**{**DEFAULTS, **overrides}, step=step)


def test_masks_are_int64_index_tensors_of_the_documented_shapes():
    m = masks()
    th, tw = m.tgt_shape
    assert m.ctx_idx.dtype == m.tgt_idx.dtype == torch.int64
    assert m.ctx_idx.shape[0] == 32 and m.tgt_idx.shape == (4, 32, th * tw)
    assert 0 <= int(m.ctx_idx.min()) and int(m.ctx_idx.max()) < 196 and int(m.tgt_idx.max()) < 196


def test_target_blocks_are_rectangles_listed_row_major():
    m = masks()
    th, tw = m.tgt_shape
    rows, cols = m.tgt_idx // GRID[1], m.tgt_idx % GRID[1]  # (T, B, Nt)
    top, left = rows[..., :1], cols[..., :1]
    assert torch.equal(rows - top, torch.arange(th).repeat_interleave(tw).expand_as(rows))
    assert torch.equal(cols - left, torch.arange(tw).repeat(th).expand_as(cols))


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
