"""The image decoders of the loaders (numba bodies): decode, seeded crop, antialiased resize, flip,
colour jitter and normalisation in one pass per image.

Why not FFCV's own RandomResizedCropRGBImageDecoder / RandomHorizontalFlip / RandomBrightness...:
in ffcv 1.0.2 they draw from numba's `np.random`, whose state is per thread and seeded from OS
entropy; `Loader(seed=...)` only seeds the sample order. Their augmentations can therefore not be
reproduced, and a resumed run would not see the batches it would have seen. And FFCV's resize is
OpenCV's INTER_AREA, nearest-neighbour when enlarging (`CropResizeDecoder`).

Here every random number is a counter-based hash (splitmix64) of
(seed, op stream, epoch, batch number, position in batch, draw number): independent of the thread
that runs the sample, of the number of workers and of earlier epochs. The epoch and the next batch
number live in a small numpy array (`EpochCell`) that the compiled code reads through its address:
numba freezes closure variables as constants, so a value that changes every epoch without
recompiling must be read from memory. Batches of one epoch run one after the other on FFCV's single
EpochIterator thread, so each op counts its own batches; `hjepa.loaders` resets the cells before each
epoch (and to batch k when an epoch starts at batch k).
"""
import numba
import numpy as np
from dataclasses import replace
from numba import njit

from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from hjepa.intrinsics import prefetch_for_write, transpose, void_pointer

CROP_STREAM, FLIP_STREAM, JITTER_STREAM = 1, 2, 3
_U64 = np.uint64
_LINE_BYTES = 64  # a cache line


class EpochCell:
    """[epoch, next batch number] shared between Python and the compiled op that owns it."""

    def __init__(self):
        self.values = np.zeros(2, dtype=np.int64)
        self.address = _U64(self.values.ctypes.data)

    def set(self, epoch, batch=0):
        self.values[0], self.values[1] = epoch, batch


class ThreadScratch:
    """Scratch memory for each of numba's threads (`numba.get_thread_id()`), which compiled code
    reads through its address (as `EpochCell`): size items of dtype per thread, thread t's at
    address + t * row_bytes, each starting `offset` bytes past a 64-byte cache-line boundary."""

    def __init__(self, size, dtype, offset=0):
        itemsize = np.dtype(dtype).itemsize
        if offset % itemsize or not 0 <= offset < _LINE_BYTES:
            raise ValueError(f"offset {offset} must be a multiple of {itemsize} in [0, {_LINE_BYTES})")
        self.size = int(size)
        self.row_bytes = -(-self.size * itemsize // _LINE_BYTES) * _LINE_BYTES  # whole cache lines
        threads, stride = numba.config.NUMBA_NUM_THREADS, self.row_bytes // itemsize
        raw = np.zeros(threads * stride + 2 * _LINE_BYTES // itemsize, dtype)
        start = ((-raw.ctypes.data) % _LINE_BYTES + offset) // itemsize
        self.values = raw[start:start + threads * stride].reshape(threads, stride)
        self.address = _U64(self.values.ctypes.data)


@njit(inline="always")
def _read_cell_and_advance(address):
    """Return (epoch, batch number) and count one more batch."""
    cell = numba.carray(void_pointer(address), (2,), np.int64)
    epoch, batch = cell[0], cell[1]
    cell[1] = batch + 1
    return epoch, batch


@njit(inline="always")
def _splitmix64(x):
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


@njit(inline="always")
def sample_key(seed, stream, epoch, batch, position):
    """One 64-bit key per (seed, stream, epoch, batch, position)."""
    key = _splitmix64(_U64(seed))
    key = _splitmix64(key ^ _U64(stream))
    key = _splitmix64(key ^ _U64(epoch))
    key = _splitmix64(key ^ _U64(batch))
    return _splitmix64(key ^ _U64(position))


@njit(inline="always")
def uniform(key, draw):
    """Draw number `draw` of a sample: a float in [0, 1) with 53 random bits."""
    return (_splitmix64(key ^ _splitmix64(_U64(draw))) >> _U64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always")
def random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, key):
    """torchvision's RandomResizedCrop.get_params with seeded draws: (top, left, h, w)."""
    area = height * width
    for attempt in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * attempt))
        aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * attempt + 1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
            left = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return top, left, h, w
    # Fallback as torchvision: the whole image, clamped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < np.exp(log_ratio_lo):
        w = width
        h = int(round(w / np.exp(log_ratio_lo)))
    elif in_ratio > np.exp(log_ratio_hi):
        h = height
        w = int(round(h * np.exp(log_ratio_hi)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(inline="always")
def _filter_taps(start, length, out_size, num_taps, first, weights):
    """Taps of a resize of [start, start + length) (source pixels, may be fractional) to out_size pixels.

    PIL's and torchvision's antialiased bilinear filter: a triangle of radius 1 output pixel, widened
    to the shrink factor when shrinking (so every source pixel counts, as area averaging does), plain
    bilinear interpolation with half-pixel centres when enlarging. Output pixel o reads source pixels
    first[o] .. first[o] + num_taps - 1 (absolute) with `weights[o]` (zero where the filter ends),
    never outside the crop's pixels.
    """
    scale = length / out_size
    support = max(scale, 1.0)
    lo_bound = int(np.floor(start))
    hi_bound = int(np.ceil(start + length))
    for o in range(out_size):
        center = start + (o + 0.5) * scale
        lo = max(int(np.floor(center - support + 0.5)), lo_bound)
        hi = min(int(np.floor(center + support + 0.5)), hi_bound)
        lo = min(lo, hi_bound - num_taps)
        total = 0.0
        for k in range(num_taps):
            w = 1.0 - abs((lo + k + 0.5 - center) / support)
            if w < 0.0 or lo + k >= hi:
                w = 0.0
            weights[o, k] = w
            total += w
        for k in range(num_taps):
            weights[o, k] /= total
        first[o] = lo


@njit(inline="always")
def _num_taps(start, length, out_size):
    """Taps per output pixel: the widest window of `_filter_taps` (about 2 * max(shrink factor, 1))."""
    scale = length / out_size
    support = max(scale, 1.0)
    lo_bound, hi_bound = int(np.floor(start)), int(np.ceil(start + length))
    taps = 1
    for o in range(out_size):
        center = start + (o + 0.5) * scale
        lo = max(int(np.floor(center - support + 0.5)), lo_bound)
        hi = min(int(np.floor(center + support + 0.5)), hi_bound)
        taps = max(taps, hi - lo)
    return taps


_BLOCK = 16  # output rows of the vertical pass computed together, then transposed as one block
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as torchvision's rgb_to_grayscale
_STRIP = 64  # output rows resampled per strip, so that a strip's buffers stay in the core's L2 cache


def scratch_floats(max_width, out_h, out_w):
    """Length of the float32 scratch `resize_crop` needs for images up to max_width wide: one strip
    of the vertical pass (max_width + 1 columns) and of the converted output (out_w columns)."""
    return (max_width + 1 + out_w) * min(out_h, _STRIP) * 3


@njit(inline="always")
def _mean_gray(rows_in, first_y, weights_y, first_x, weights_x, x0):
    """The resized crop's mean grey (before brightness and clamping), from the source: the resize is
    linear, so the output's grey sum is the source weighted by how much each source row and column
    contributes in total (a dot product per source row, the luma coefficients in the column weights)."""
    out_h, taps_y = weights_y.shape
    out_w, taps_x = weights_x.shape
    column_weight = np.zeros(rows_in.shape[1], np.float32)  # (nx * 3,), interleaved as the rows
    for ox in range(out_w):
        for k in range(taps_x):
            x, w = first_x[ox] + k - x0, weights_x[ox, k]
            for c in range(3):
                column_weight[3 * x + c] += np.float32(_LUMA[c]) * w
    y_lo = first_y[0]
    row_weight = np.zeros(first_y[out_h - 1] + taps_y - y_lo, np.float32)
    for oy in range(out_h):
        for k in range(taps_y):
            row_weight[first_y[oy] + k - y_lo] += weights_y[oy, k]
    total = 0.0
    for y in range(row_weight.shape[0]):
        if row_weight[y] != 0.0:
            source, dot = rows_in[y_lo + y], np.float32(0.0)
            for i in range(column_weight.shape[0]):
                dot += column_weight[i] * np.float32(source[i])
            total += row_weight[y] * dot
    return total / (out_h * out_w)


@njit(inline="always")
def _filter_row(out, table, first, weights, gain, n):
    """out[:n] = gain * sum over k of weights[k] * table[first + k, :n]: one resize tap set applied to
    whole rows, four taps per pass over memory (taps past the end weigh 0 and repeat the last row)."""
    taps, last = weights.shape[0], first + weights.shape[0] - 1
    zero = np.float32(0.0)
    for k in range(0, taps, 4):
        r0, r1 = table[first + k], table[min(first + k + 1, last)]
        r2, r3 = table[min(first + k + 2, last)], table[min(first + k + 3, last)]
        w0 = gain * weights[k]
        w1 = gain * weights[k + 1] if k + 1 < taps else zero
        w2 = gain * weights[k + 2] if k + 2 < taps else zero
        w3 = gain * weights[k + 3] if k + 3 < taps else zero
        if k == 0:
            for i in range(n):
                out[i] = ((w0 * np.float32(r0[i]) + w1 * np.float32(r1[i]))
                          + (w2 * np.float32(r2[i]) + w3 * np.float32(r3[i])))
        else:
            for i in range(n):
                out[i] += ((w0 * np.float32(r0[i]) + w1 * np.float32(r1[i]))
                           + (w2 * np.float32(r2[i]) + w3 * np.float32(r3[i])))


@njit(fastmath=True, nogil=True)
def resize_crop(image, top, left, height, width, dst, flip, scratch, scale, shift, bright, contrast, saturation):
    """Resample the crop [top, top+height) x [left, left+width) of image (H, W, 3) uint8 into dst (h, w, 3).

    Antialiased bilinear (`_filter_taps`): matches torchvision's resized_crop(antialias=True) on uint8
    images within rounding. The crop may be fractional (a crop drawn at full size, decoded at a
    reduced DCT scale). `flip` writes the mirror image. bright, contrast, saturation: colour jitter
    factors, 1 for none (`_jitter_pixel`). Each output value v is then written as
    v * scale[c] + shift[c] in dst's dtype: scale 1, shift 0.5 rounds to uint8; scale 1/(255 std),
    shift -mean/std gives normalised floats. scratch: float32, `scratch_floats` long.

    Strips of _STRIP output rows, each in two separable passes: vertical on image rows (contiguous,
    vectorised), transposed and channel-planar so that the horizontal pass, the jitter and the
    conversion also run on contiguous memory; then the strip, transposed back, into its rows of dst.
    The transposes move 8x8 tiles as SIMD shuffles (`hjepa.intrinsics`): as scalar loops they took
    about 40% of the time. Strips keep a strip's buffers in L2 (the whole image's, ~1.3 MB at 224 px,
    spilled from it beside a float32 output), and each row of dst is prefetched for writing while the
    vertical pass computes its strip (a float32 224-px image is 602 kB of a batch buffer that no cache
    holds).
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    taps_y, taps_x = _num_taps(top, height, out_h), _num_taps(left, width, out_w)
    first_y, weights_y = np.empty(out_h, np.int64), np.empty((out_h, taps_y), np.float32)
    first_x, weights_x = np.empty(out_w, np.int64), np.empty((out_w, taps_x), np.float32)
    _filter_taps(top, height, out_h, taps_y, first_y, weights_y)
    _filter_taps(left, width, out_w, taps_x, first_x, weights_x)
    x0 = int(np.floor(left))
    nx = int(np.ceil(left + width)) - x0  # source columns the crop touches
    rows_in = image.reshape(image.shape[0], image.shape[1] * 3)[:, 3 * x0:3 * (x0 + nx)]  # (H, nx * 3)
    # Contrast blends towards the mean grey of the brightened image, needed before the first strip.
    bright, contrast, saturation = np.float32(bright), np.float32(contrast), np.float32(saturation)
    offset = np.float32(0.0)
    if contrast != 1.0:
        offset = np.float32((1.0 - contrast) * bright * _mean_gray(rows_in, first_y, weights_y, first_x, weights_x, x0))
    s0, s1, s2 = np.float32(scale[0]), np.float32(scale[1]), np.float32(scale[2])
    t0, t1, t2 = np.float32(shift[0]), np.float32(shift[1]), np.float32(shift[2])
    one, full = np.float32(1.0), np.float32(255.0)
    rows = np.empty((_BLOCK, nx * 3), np.float32)
    row_items, line_items = out_w * 3, max(_LINE_BYTES // dst.itemsize, 1)
    acc = np.empty(3 * min(out_h, _STRIP), np.float32)  # one output column of a strip, planar
    for sy0 in range(0, out_h, _STRIP):
        sh = min(_STRIP, out_h - sy0)
        m = 3 * sh
        cols = scratch[:nx * m].reshape(nx, m)  # cols[x, c * sh + oy - sy0]: the vertical pass, transposed
        converted = scratch[nx * m:(nx + out_w) * m].reshape(out_w, 3, sh)
        # 1. vertical pass, _BLOCK output rows at a time
        for oy0 in range(sy0, sy0 + sh, _BLOCK):
            nb = min(_BLOCK, sy0 + sh - oy0)
            for b in range(nb):
                _filter_row(rows[b], rows_in, first_y[oy0 + b], weights_y[oy0 + b], one, nx * 3)
                for e in range((oy0 + b) * row_items, (oy0 + b + 1) * row_items, line_items):
                    prefetch_for_write(dst, e)  # this row of dst is written at the strip's end
            transpose(rows, 0, nx * 3, scratch, oy0 - sy0, sh, nb, nx * 3)  # cols[x, c, oy] = rows[b, 3x + c]
        # 2. horizontal pass, one output column at a time, then the jitter and the output conversion
        # (on contiguous planes) into converted[x, c, oy - sy0], mirrored when flipping
        for ox in range(out_w):
            _filter_row(acc, cols, first_x[ox] - x0, weights_x[ox], bright, m)
            red, green, blue = acc[:sh], acc[sh:2 * sh], acc[2 * sh:m]
            x = out_w - 1 - ox if flip else ox
            out_red, out_green, out_blue = converted[x, 0], converted[x, 1], converted[x, 2]
            for oy in range(sh):
                r, g, bl = _jitter_pixel(min(red[oy], full), min(green[oy], full), min(blue[oy], full),
                                         contrast, offset, saturation)
                out_red[oy] = r * s0 + t0
                out_green[oy] = g * s1 + t1
                out_blue[oy] = bl * s2 + t2
        # 3. the strip into dst: converted is (out_w * 3, sh) read as a matrix, dst (out_h, out_w * 3)
        transpose(scratch, nx * m, sh, dst, sy0 * out_w * 3, out_w * 3, out_w * 3, sh)


@njit(inline="always")
def _jitter_pixel(r, g, b, contrast, offset, saturation):
    """Contrast (a blend with the mean grey, `offset` = (1 - contrast) * mean grey), then saturation
    (a blend with the pixel's own grey), each clamped to [0, 255]; identity for factors 1 and offset 0.

    Colour jitter here = brightness (in `resize_crop`), contrast, saturation, with factors uniform
    in [max(0, 1-s), 1+s] (`_jitter_factor`). Where it differs from torchvision's
    ColorJitter(brightness=s, contrast=s, saturation=s, hue=h):
    - order: always brightness, contrast, saturation; torchvision applies its steps in a random
      order drawn per image;
    - hue: none (torchvision's hue step converts every pixel to HSV and back);
    - rounding: once at the end (torchvision truncates uint8 images to integers after each step);
    - the mean grey that contrast blends towards is the brightened image's before clamping to 255
      (torchvision: after), so that it follows from the resize's column sums without a second pass;
    - it runs on the resized crop, as torchvision's does when it follows RandomResizedCrop.
    Grey is ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), as in torchvision.
    """
    zero, full = np.float32(0.0), np.float32(255.0)
    r = min(max(contrast * r + offset, zero), full)
    g = min(max(contrast * g + offset, zero), full)
    b = min(max(contrast * b + offset, zero), full)
    gray = (np.float32(1.0) - saturation) * (np.float32(_LUMA[0]) * r + np.float32(_LUMA[1]) * g
                                             + np.float32(_LUMA[2]) * b)
    return (min(max(saturation * r + gray, zero), full), min(max(saturation * g + gray, zero), full),
            min(max(saturation * b + gray, zero), full))


@njit(inline="always")
def _jitter_factor(key, draw, strength):
    """A colour jitter factor, uniform in [max(0, 1 - strength), 1 + strength]; 1 for strength 0."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * uniform(key, draw) if strength > 0 else 1.0


@njit(inline="always")
def _dct_scale(height, width, out_h, out_w, enabled):
    """Largest JPEG decoding scale divisor (libjpeg-turbo decodes at 1/2, 1/4, 1/8 in its IDCT, for a
    fraction of the full cost) that keeps the crop at least as large as the output."""
    if enabled:
        for divisor in (8, 4, 2):
            if height >= divisor * out_h and width >= divisor * out_w:
                return divisor
    return 1


def output_conversion(normalize):
    """(dtype, scale (3,), shift (3,)) of `resize_crop`'s write: uint8 for normalize=None, else the
    float32 (x / 255 - mean) / std for normalize=(mean, std)."""
    if normalize is None:
        return np.dtype(np.uint8), np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    mean, std = (np.asarray(v, np.float64) for v in normalize)
    return np.dtype(np.float32), (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


class CropResizeDecoder(RandomResizedCropRGBImageDecoder):
    """Decode, crop, resize with `resize_crop` (antialiased bilinear), optionally mirror and normalise.

    Replaces FFCV's ResizedCropRGBImageDecoder, whose resize is OpenCV's INTER_AREA: on enlargement
    that equals nearest-neighbour (a 32-px image reaches 224 px as 7x7 blocks), and on reduction it
    costs about twice this one. Subclasses choose the crop, flip and colour jitter (`crop_code`).
    normalize=(mean, std) writes float32 (x/255 - mean)/std instead of uint8.
    """

    def __init__(self, output_size, *, normalize=None, dct_scaling=True):
        super().__init__(output_size)
        self.normalize, self.dct_scaling = normalize, dct_scaling
        self.decoded = self.scratch = None  # ThreadScratch, sized from the beton's largest image

    def declare_state_and_memory(self, previous_state):
        out_h, out_w = self.output_size
        max_width, max_height = int(self.metadata["width"].max()), int(self.metadata["height"].max())
        # Decoding buffer and resize scratch per thread, not per sample as AllocationQuery would give:
        # FFCV allocates its buffers afresh for every epoch (EpochIterator), for batches_ahead + 2
        # batches, and the page faults of ~1 MB of new memory per sample cost as much as the resize.
        # FFCV calls this again for every epoch; the compiled code keeps the first buffers' addresses.
        if self.decoded is None:
            # 16 bytes past a cache line, not on a 32-byte boundary: the loader decoded ~10% fewer images/s
            # whenever numpy happened to put this buffer on one (4,130-4,550 normalised images/s against
            # 4,730-4,910 with offsets 8, 16, 48, 80, 1040 and 3472 mod 4096, 2 threads, bench_data's
            # photos); libjpeg-turbo writes the decoded rows here from its own 32-byte-aligned buffers,
            # and equal low address bits between the two stall loads behind stores (our reading).
            self.decoded = ThreadScratch(max_height * max_width * 3, np.uint8, offset=16)
            self.scratch = ThreadScratch(scratch_floats(max_width, out_h, out_w), np.float32)
        dtype = output_conversion(self.normalize)[0]
        output_shape = (out_h, out_w, 3)
        return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=dtype),
                AllocationQuery(output_shape, dtype))

    def crop_code(self):
        """A compiled (height, width, epoch, batch, position) -> (top, left, h, w, flip, brightness,
        contrast, saturation). Scalars, not a tuple of factors: numba's parfor array analysis fails on
        a tuple assigned in a branch (and FFCV's loader thread then hangs on the compile error)."""
        raise NotImplementedError

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        crop = self.crop_code()
        _, scale, shift = output_conversion(self.normalize)
        out_h, out_w = self.output_size
        dct_scaling = self.dct_scaling
        address = self.cell.address
        decoded_address, decoded_size = self.decoded.address, _U64(self.decoded.size)
        scratch_address, scratch_size = self.scratch.address, _U64(self.scratch.size)  # float32 items
        decoded_row_bytes, scratch_row_bytes = _U64(self.decoded.row_bytes), _U64(self.scratch.row_bytes)

        def decode(batch_indices, destination, metadata, storage_state):
            epoch, batch = _read_cell_and_advance(address)
            for dst_ix in my_range(len(batch_indices)):
                thread = _U64(numba.get_thread_id())  # this thread's row of each ThreadScratch
                buffer = numba.carray(void_pointer(decoded_address + thread * decoded_row_bytes), (decoded_size,),
                                      np.uint8)
                scratch = numba.carray(void_pointer(scratch_address + thread * scratch_row_bytes), (scratch_size,),
                                       np.float32)
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                top, left, h, w, flip, bright, contrast, saturation = crop(height, width, epoch, batch, dst_ix)
                divisor = 1
                if field["mode"] == jpg:
                    divisor = _dct_scale(h, w, out_h, out_w, dct_scaling)
                    # libjpeg-turbo's scaled size: ceil(size / divisor) (TJSCALED)
                    dec_h, dec_w = (height + divisor - 1) // divisor, (width + divisor - 1) // divisor
                    imdecode_c(image_data, buffer, np.uint32(height), np.uint32(width), np.uint32(height),
                               np.uint32(width), 0, 0, 1, np.uint32(divisor), False, False)
                    image = buffer[:3 * dec_h * dec_w].reshape(dec_h, dec_w, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                resize_crop(image, top / divisor, left / divisor, h / divisor, w / divisor, destination[dst_ix],
                            flip, scratch, scale, shift, bright, contrast, saturation)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededRandomResizedCrop(CropResizeDecoder):
    """Random-resized crop (torchvision's crop distribution), horizontal flip and colour jitter of
    strength color_jitter (0 = none; `_jitter_pixel` says how it differs from torchvision's
    ColorJitter), seeded per sample.

    The crop, the flip and the jitter factors are hashes of (seed, epoch, batch, position) (streams
    CROP_STREAM, FLIP_STREAM, JITTER_STREAM), so they do not depend on threads or earlier epochs;
    flip_prob=0 never flips.
    """

    def __init__(self, output_size, *, scale, ratio, seed, flip_prob=0.0, color_jitter=0.0, normalize=None,
                 dct_scaling=True):
        super().__init__(output_size, normalize=normalize, dct_scaling=dct_scaling)
        self.scale, self.ratio = scale, ratio
        self.seed, self.flip_prob, self.color_jitter = seed, flip_prob, float(color_jitter)
        self.cell = EpochCell()

    def crop_code(self):
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_ratio_lo, log_ratio_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))
        seed, flip_prob, strength = _U64(self.seed), float(self.flip_prob), self.color_jitter

        @njit(inline="always")
        def crop(height, width, epoch, batch, position):
            key = sample_key(seed, CROP_STREAM, epoch, batch, position)
            top, left, h, w = random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, key)
            flip = uniform(sample_key(seed, FLIP_STREAM, epoch, batch, position), 0) < flip_prob
            jitter_key = sample_key(seed, JITTER_STREAM, epoch, batch, position)
            return (top, left, h, w, flip, _jitter_factor(jitter_key, 0, strength),
                    _jitter_factor(jitter_key, 1, strength), _jitter_factor(jitter_key, 2, strength))

        return crop


class CenterCropResize(CropResizeDecoder):
    """The eval crop: the centred square of side int(ratio * shorter side), resized to output_size.

    The crop is FFCV's CenterCropRGBImageDecoder's (ffcv.fields.rgb_image.get_center_crop); the
    resize interpolates (`resize_crop`) where FFCV's enlarges by nearest neighbour.
    """

    def __init__(self, output_size, *, ratio, normalize=None, dct_scaling=True):
        super().__init__(output_size, normalize=normalize, dct_scaling=dct_scaling)
        self.ratio = float(ratio)
        self.cell = EpochCell()  # counts batches like the seeded ops; the crop does not use it

    def crop_code(self):
        ratio = self.ratio

        @njit(inline="always")
        def crop(height, width, epoch, batch, position):
            side = int(ratio * min(height, width))
            return (height - side) // 2, (width - side) // 2, side, side, False, 1.0, 1.0, 1.0

        return crop
