"""Operations numba cannot express, written in LLVM IR as numba intrinsics, for the loaders' ops.

- `void_pointer`: an address as a pointer, to read memory that changes between calls of compiled
  code (numba freezes closure variables as constants).
- `transpose_8x8` / `transpose`: matrix transposes, 8x8 tiles at a time as SIMD shuffles. The
  loaders' resize (`hjepa.augment.resize_crop`) transposes twice per image so that both of its passes
  run on contiguous memory. Written as scalar loops, those transposes took about 40% of the resize:
  numba has no way to ask for vector shuffles, and LLVM does not find them in a scalar transpose.
  `shufflevector` is target-independent IR, so this compiles on any CPU (AVX: vunpcklps / vshufps /
  vperm2f128), not only x86.
- `prefetch_for_write`: PREFETCHW of a line about to be written (the resize's output rows, in a batch
  buffer far larger than the caches).
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic


@intrinsic
def void_pointer(typingctx, address):
    """uint64 address -> void* in nopython code (read with numba.carray)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.uint64), codegen


# Shuffle masks of the three stages: interleave 32-bit elements, then 64-bit pairs (within 128-bit
# lanes), then swap 128-bit halves. Output k of stage 3 is column k of the tile.
_UNPACK_32 = ((0, 8, 1, 9, 4, 12, 5, 13), (2, 10, 3, 11, 6, 14, 7, 15))
_UNPACK_64 = ((0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15))
_HALVES = ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))


def _mask(indices):
    i32 = ir.IntType(32)
    return ir.Constant(ir.VectorType(i32, 8), [ir.Constant(i32, i) for i in indices])


def _shuffle_pairs(builder, vectors, pairs, masks):
    """For each (a, b) in pairs: the low and the high shuffle of vectors[a], vectors[b]."""
    out = []
    for a, b in pairs:
        out += [builder.shuffle_vector(vectors[a], vectors[b], _mask(m)) for m in masks]
    return out


@intrinsic
def transpose_8x8(typingctx, src, src_offset, src_stride, dst, dst_offset, dst_stride):
    """dst.flat[dst_offset + j * dst_stride + i] = src.flat[src_offset + i * src_stride + j] for
    i, j < 8 (flat element indices into C-contiguous arrays; no bounds checks). src float32, dst
    float32 or uint8 (converted as numba converts a float to uint8: truncation)."""
    if not (isinstance(src, types.Array) and src.dtype == types.float32):
        raise TypingError(f"transpose_8x8 reads float32 arrays, got {src}")
    if not (isinstance(dst, types.Array) and dst.dtype in (types.float32, types.uint8)):
        raise TypingError(f"transpose_8x8 writes float32 or uint8 arrays, got {dst}")

    def codegen(context, builder, signature, args):
        source, source_offset, source_stride, target, target_offset, target_stride = args
        source_type, _, _, target_type, _, _ = signature.args
        source_data = context.make_array(source_type)(context, builder, source).data
        target_data = context.make_array(target_type)(context, builder, target).data

        def element(data, offset, stride, k):
            return builder.gep(data, [builder.add(offset, builder.mul(stride, ir.Constant(stride.type, k)))])

        row_type = ir.VectorType(ir.FloatType(), 8)
        rows = [builder.load(builder.bitcast(element(source_data, source_offset, source_stride, k),
                                             row_type.as_pointer()), align=4) for k in range(8)]
        pairs = _shuffle_pairs(builder, rows, [(0, 1), (2, 3), (4, 5), (6, 7)], _UNPACK_32)
        quads = _shuffle_pairs(builder, pairs, [(0, 2), (1, 3), (4, 6), (5, 7)], _UNPACK_64)
        halves = _shuffle_pairs(builder, quads, [(0, 4), (1, 5), (2, 6), (3, 7)], _HALVES)
        columns = [halves[0], halves[2], halves[4], halves[6], halves[1], halves[3], halves[5], halves[7]]
        out_type = ir.VectorType(context.get_value_type(target_type.dtype), 8)
        for k, column in enumerate(columns):
            if target_type.dtype == types.uint8:
                column = builder.fptoui(column, out_type)
            builder.store(column, builder.bitcast(element(target_data, target_offset, target_stride, k),
                                                  out_type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(src, src_offset, src_stride, dst, dst_offset, dst_stride), codegen


@njit(inline="always")
def transpose(src, src_offset, src_stride, dst, dst_offset, dst_stride, rows, cols):
    """Transpose a rows x cols block between C-contiguous arrays, by flat element index:
    dst.flat[dst_offset + j * dst_stride + i] = src.flat[src_offset + i * src_stride + j].
    Whole 8x8 tiles as shuffles (`transpose_8x8`), the edges element by element."""
    tile_rows, tile_cols = rows - rows % 8, cols - cols % 8
    for j in range(0, tile_cols, 8):  # 8 rows of dst at a time, written left to right
        for i in range(0, tile_rows, 8):
            transpose_8x8(src, src_offset + i * src_stride + j, src_stride,
                          dst, dst_offset + j * dst_stride + i, dst_stride)
    source, target = src.reshape(src.size), dst.reshape(dst.size)
    for i in range(rows):
        for j in range(tile_cols if i < tile_rows else 0, cols):
            target[dst_offset + j * dst_stride + i] = source[src_offset + i * src_stride + j]


@intrinsic
def prefetch_for_write(typingctx, array, offset):
    """Ask the cache for the line holding array.flat[offset], to be written soon (llvm.prefetch with
    rw=1: PREFETCHW on x86; a no-op on targets without one). No effect on results."""
    if not isinstance(array, types.Array):
        raise TypingError(f"prefetch_for_write takes an array, got {array}")

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        signature_ir = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        prefetch = builder.module.declare_intrinsic("llvm.prefetch", [address.type], signature_ir)
        builder.call(prefetch, [address, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, offset), codegen
