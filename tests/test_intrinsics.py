"""The LLVM-IR operations of the loaders' ops: the tile transpose is exact at any shape, offset and
stride; the write prefetch changes nothing."""
import numpy as np
import pytest
from numba import njit

from hjepa.intrinsics import prefetch_for_write, transpose


@njit
def transpose_block(src, src_offset, src_stride, dst, dst_offset, dst_stride, rows, cols):
    transpose(src, src_offset, src_stride, dst, dst_offset, dst_stride, rows, cols)


@pytest.mark.parametrize("rows, cols", [(8, 8), (16, 24), (13, 21), (3, 5), (24, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_a_block_lands_transposed_and_nothing_around_it_moves(rows, cols, dtype):
    rng = np.random.default_rng(rows * 100 + cols)
    src = (rng.random((rows + 3, cols + 11)) * 250).astype(np.float32)  # the block sits inside a wider matrix
    dst = np.full((cols + 2, rows + 9), 7, dtype)
    transpose_block(src, 1 * src.shape[1] + 2, src.shape[1], dst, 1 * dst.shape[1] + 4, dst.shape[1], rows, cols)
    expected = np.full_like(dst, 7)
    expected[1:1 + cols, 4:4 + rows] = src[1:1 + rows, 2:2 + cols].T.astype(dtype)  # uint8: truncation
    assert np.array_equal(dst, expected)


@njit
def prefetch_every_line(a):
    for i in range(0, a.size, 16):
        prefetch_for_write(a, i)


def test_prefetching_for_write_emits_a_prefetch_and_leaves_the_memory_as_it_was():
    a = np.arange(1000, dtype=np.float32)
    prefetch_every_line(a)
    assert np.array_equal(a, np.arange(1000, dtype=np.float32))
    assert "@llvm.prefetch" in next(iter(prefetch_every_line.inspect_llvm().values()))
