"""Seeded FFCV image operations (numba bodies) for the JEPA train pipeline.

Why not FFCV's own RandomResizedCropRGBImageDecoder / RandomHorizontalFlip / RandomBrightness...:
in ffcv 1.0.2 they draw from numba's `np.random`, whose state is per thread and seeded from OS
entropy; `Loader(seed=...)` only seeds the sample order. Their augmentations can therefore not be
reproduced, and a resumed run would not see the batches it would have seen.

Here every random number is a counter-based hash (splitmix64) of
(seed, op stream, epoch, batch number, position in batch, draw number): independent of the thread
that runs the sample, of the number of workers and of earlier epochs. The epoch and the next batch
number live in a small numpy array (`EpochCell`) that the compiled code reads through its address:
numba freezes closure variables as constants, so a value that changes every epoch without
recompiling must be read from memory. Batches of one epoch run one after the other on FFCV's single
EpochIterator thread, so each op counts its own batches; `hjepa.data` resets the cells before each
epoch (and to batch k when an epoch starts at batch k).
"""
import numba
import numpy as np
from dataclasses import replace
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

CROP_STREAM, FLIP_STREAM, JITTER_STREAM = 1, 2, 3
_U64 = np.uint64


@intrinsic
def _void_pointer(typingctx, address):
    """uint64 address -> void* in nopython code (to read an EpochCell that changes between calls)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.uint64), codegen


class EpochCell:
    """[epoch, next batch number] shared between Python and the compiled op that owns it."""

    def __init__(self):
        self.values = np.zeros(2, dtype=np.int64)
        self.address = _U64(self.values.ctypes.data)

    def set(self, epoch, batch=0):
        self.values[0], self.values[1] = epoch, batch


@njit(inline="always")
def _read_cell_and_advance(address):
    """Return (epoch, batch number) and count one more batch."""
    cell = numba.carray(_void_pointer(address), (2,), np.int64)
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
def _random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, key):
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
    """Taps per output pixel: the filter spans 2 * max(shrink factor, 1) source pixels, capped at the
    pixels the crop touches."""
    touched = int(np.ceil(start + length)) - int(np.floor(start))
    return min(int(np.ceil(2.0 * max(length / out_size, 1.0))) + 1, touched)


_BLOCK = 8  # rows (and columns) resampled together so that the transposes below move whole tiles


@njit(fastmath=True, nogil=True)
def resize_crop(image, top, left, height, width, dst, flip, columns, scale, shift):
    """Resample the crop [top, top+height) x [left, left+width) of image (H, W, 3) uint8 into dst (h, w, 3).

    Antialiased bilinear (`_filter_taps`): matches torchvision's resized_crop(antialias=True) on uint8
    images within rounding. The crop may be fractional (a crop drawn at full size, decoded at a
    reduced DCT scale). `flip` writes the mirror image. Each output value is
    clamp(v, 0, 255) * scale[c] + shift[c], stored as dst's dtype: scale 1, shift 0.5 rounds to uint8;
    scale 1/(255 std), shift -mean/std gives normalised floats. columns: float32 scratch of at least
    (ceil(left + width) - floor(left) + 1) * h * 3 values.

    Two separable passes: vertical on image rows (contiguous, vectorised), written transposed so that
    the horizontal pass also runs on contiguous memory; the transposes move 8x8-pixel tiles.
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
    m = out_h * 3
    cols = columns[:nx * m].reshape(nx, m)  # cols[x, 3 * oy + c]: the vertical pass, transposed
    rows = np.empty((_BLOCK, nx * 3), np.float32)
    for oy0 in range(0, out_h, _BLOCK):
        nb = min(_BLOCK, out_h - oy0)
        for b in range(nb):
            row = rows[b]
            row[:] = 0.0
            for k in range(taps_y):
                wk = weights_y[oy0 + b, k]
                source = rows_in[first_y[oy0 + b] + k]
                for i in range(nx * 3):
                    row[i] += wk * np.float32(source[i])
        for x in range(nx):
            tile = cols[x, 3 * oy0:3 * (oy0 + nb)]
            for b in range(nb):
                tile[3 * b] = rows[b, 3 * x]
                tile[3 * b + 1] = rows[b, 3 * x + 1]
                tile[3 * b + 2] = rows[b, 3 * x + 2]
    acc = np.empty((_BLOCK, m), np.float32)
    out_rows = dst.reshape(out_h, out_w * 3)
    zero, full = np.float32(0.0), np.float32(255.0)
    s0, s1, s2 = np.float32(scale[0]), np.float32(scale[1]), np.float32(scale[2])
    t0, t1, t2 = np.float32(shift[0]), np.float32(shift[1]), np.float32(shift[2])
    for ox0 in range(0, out_w, _BLOCK):
        nb = min(_BLOCK, out_w - ox0)
        for b in range(nb):
            a = acc[b]
            a[:] = 0.0
            for k in range(taps_x):
                wk = weights_x[ox0 + b, k]
                column = cols[first_x[ox0 + b] + k - x0]
                for i in range(m):
                    a[i] += wk * column[i]
            for i in range(m):
                a[i] = min(max(a[i], zero), full)
        for oy in range(out_h):
            for b in range(nb):
                x = out_w - 1 - (ox0 + b) if flip else ox0 + b
                out_rows[oy, 3 * x] = acc[b, 3 * oy] * s0 + t0
                out_rows[oy, 3 * x + 1] = acc[b, 3 * oy + 1] * s1 + t1
                out_rows[oy, 3 * x + 2] = acc[b, 3 * oy + 2] * s2 + t2


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
    costs several times an interpolating resize. Subclasses choose the crop (`crop_code`) and say
    whether they draw flips. normalize=(mean, std) writes float32 (x/255 - mean)/std instead of uint8.
    """

    def __init__(self, output_size, *, normalize=None, dct_scaling=True):
        super().__init__(output_size)
        self.normalize, self.dct_scaling = normalize, dct_scaling

    def declare_state_and_memory(self, previous_state):
        widths, heights = self.metadata["width"], self.metadata["height"]
        max_width, max_height = np.uint64(widths.max()), np.uint64(heights.max())
        out_h, out_w = self.output_size
        dtype = output_conversion(self.normalize)[0]
        output_shape = (out_h, out_w, 3)
        return (replace(previous_state, jit_mode=True, shape=output_shape, dtype=dtype),
                (AllocationQuery(output_shape, dtype),
                 AllocationQuery((max_height * max_width * np.uint64(3),), np.dtype(np.uint8)),
                 AllocationQuery(((max_width + np.uint64(1)) * np.uint64(out_h * 3),), np.dtype(np.float32))))

    def crop_code(self):
        """A compiled (height, width, epoch, batch, position) -> (top, left, h, w, flip)."""
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

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, columns = my_storage
            epoch, batch = _read_cell_and_advance(address)
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                top, left, h, w, flip = crop(height, width, epoch, batch, dst_ix)
                divisor = 1
                if field["mode"] == jpg:
                    divisor = _dct_scale(h, w, out_h, out_w, dct_scaling)
                    # libjpeg-turbo's scaled size: ceil(size / divisor) (TJSCALED)
                    dec_h, dec_w = (height + divisor - 1) // divisor, (width + divisor - 1) // divisor
                    buffer = decoded[dst_ix]
                    imdecode_c(image_data, buffer, np.uint32(height), np.uint32(width), np.uint32(height),
                               np.uint32(width), 0, 0, 1, np.uint32(divisor), False, False)
                    image = buffer[:3 * dec_h * dec_w].reshape(dec_h, dec_w, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                resize_crop(image, top / divisor, left / divisor, h / divisor, w / divisor, destination[dst_ix],
                            flip, columns[dst_ix], scale, shift)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededRandomResizedCrop(CropResizeDecoder):
    """Random-resized crop (torchvision's crop distribution) and horizontal flip, seeded per sample.

    The crop and the flip are hashes of (seed, epoch, batch, position) (streams CROP_STREAM and
    FLIP_STREAM), so they do not depend on threads or earlier epochs; flip_prob=0 never flips.
    """

    def __init__(self, output_size, *, scale, ratio, seed, flip_prob=0.0, normalize=None, dct_scaling=True):
        super().__init__(output_size, normalize=normalize, dct_scaling=dct_scaling)
        self.scale, self.ratio = scale, ratio
        self.seed, self.flip_prob = seed, flip_prob
        self.cell = EpochCell()

    def crop_code(self):
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_ratio_lo, log_ratio_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))
        seed, flip_prob = _U64(self.seed), float(self.flip_prob)

        @njit(inline="always")
        def crop(height, width, epoch, batch, position):
            key = sample_key(seed, CROP_STREAM, epoch, batch, position)
            top, left, h, w = _random_crop(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, key)
            flip = uniform(sample_key(seed, FLIP_STREAM, epoch, batch, position), 0) < flip_prob
            return top, left, h, w, flip

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
            return (height - side) // 2, (width - side) // 2, side, side, False

        return crop


class ColorJitter(Operation):
    """Brightness, then contrast, then saturation, each factor uniform in [max(0, 1-s), 1+s], seeded.

    Where it differs from torchvision's ColorJitter(brightness=s, contrast=s, saturation=s):
    - order: always brightness, contrast, saturation; torchvision applies its steps in a random order
      drawn per image;
    - hue: none (torchvision's hue step converts to HSV and back, several times the cost of the rest);
    - rounding: one rounding at the end; torchvision rounds uint8 images after every step.
    The contrast step blends towards the mean grey (ITU-R 601 luma) of the brightened image, as
    torchvision's does. Takes (B, H, W, 3) uint8 images; writes uint8, or with normalize=(mean, std)
    float32 (x/255 - mean)/std, as `resize_crop` does.
    """

    def __init__(self, strength, *, seed, normalize=None):
        super().__init__()
        self.strength, self.seed, self.normalize = float(strength), seed, normalize
        self.cell = EpochCell()

    def generate_code(self):
        my_range = Compiler.get_iterator()
        seed, address = _U64(self.seed), self.cell.address
        lo, hi = max(0.0, 1.0 - self.strength), 1.0 + self.strength
        _, scale, shift = output_conversion(self.normalize)

        def jitter(images, dst):
            epoch, batch = _read_cell_and_advance(address)
            for i in my_range(images.shape[0]):
                key = sample_key(seed, JITTER_STREAM, epoch, batch, i)
                bright = np.float32(lo + (hi - lo) * uniform(key, 0))
                contrast = np.float32(lo + (hi - lo) * uniform(key, 1))
                saturation = np.float32(lo + (hi - lo) * uniform(key, 2))
                image = images[i].reshape(-1, 3)  # (H * W, 3)
                out = dst[i].reshape(-1, 3)
                num_pixels = image.shape[0]
                full = np.float32(255.0)
                gray_sum = 0.0  # contrast blends towards the mean grey of the brightened image
                for p in range(num_pixels):
                    r = min(full, bright * np.float32(image[p, 0]))
                    g = min(full, bright * np.float32(image[p, 1]))
                    b = min(full, bright * np.float32(image[p, 2]))
                    gray_sum += np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
                offset = np.float32((1.0 - contrast) * gray_sum / num_pixels)
                for p in range(num_pixels):
                    r = min(full, bright * np.float32(image[p, 0]))
                    g = min(full, bright * np.float32(image[p, 1]))
                    b = min(full, bright * np.float32(image[p, 2]))
                    r = min(full, max(np.float32(0.0), contrast * r + offset))
                    g = min(full, max(np.float32(0.0), contrast * g + offset))
                    b = min(full, max(np.float32(0.0), contrast * b + offset))
                    gray = (np.float32(1.0) - saturation) * (np.float32(0.299) * r + np.float32(0.587) * g
                                                            + np.float32(0.114) * b)
                    out[p, 0] = min(full, max(np.float32(0.0), saturation * r + gray)) * scale[0] + shift[0]
                    out[p, 1] = min(full, max(np.float32(0.0), saturation * g + gray)) * scale[1] + shift[1]
                    out[p, 2] = min(full, max(np.float32(0.0), saturation * b + gray)) * scale[2] + shift[2]
            return dst[:images.shape[0]]

        jitter.is_parallel = True
        return jitter

    def declare_state_and_memory(self, previous_state):
        dtype = output_conversion(self.normalize)[0]
        return (replace(previous_state, jit_mode=True, dtype=dtype),
                AllocationQuery(previous_state.shape, dtype))
