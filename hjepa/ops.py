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
from ffcv.libffcv import imdecode, resize_crop
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


class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
    """FFCV's RandomResizedCropRGBImageDecoder with seeded, per-epoch reproducible crops."""

    def __init__(self, output_size, *, scale, ratio, seed):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.seed = seed
        self.cell = EpochCell()

    def generate_code(self):
        # Same body as ffcv.fields.rgb_image.ResizedCropRGBImageDecoder.generate_code, crop draw aside.
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_ratio_lo, log_ratio_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))
        seed, address = _U64(self.seed), self.cell.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch, batch = _read_cell_and_advance(address)
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                key = sample_key(seed, CROP_STREAM, epoch, batch, dst_ix)
                i, j, h, w = _random_crop(np.int64(height), np.int64(width), scale_lo, scale_hi,
                                          log_ratio_lo, log_ratio_hi, key)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """Flip (B, H, W, C) uint8 images left-right with probability flip_prob, seeded per sample."""

    def __init__(self, *, seed, flip_prob=0.5):
        super().__init__()
        self.seed, self.flip_prob = seed, flip_prob
        self.cell = EpochCell()

    def generate_code(self):
        my_range = Compiler.get_iterator()
        seed, address, flip_prob = _U64(self.seed), self.cell.address, self.flip_prob

        def flip(images, dst):
            epoch, batch = _read_cell_and_advance(address)
            for i in my_range(images.shape[0]):
                if uniform(sample_key(seed, FLIP_STREAM, epoch, batch, i), 0) < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst[:images.shape[0]]

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class ColorJitter(Operation):
    """Brightness, then contrast, then saturation, each factor uniform in [max(0, 1-s), 1+s].

    As torchvision's ColorJitter(s, s, s) without hue, but in a fixed order and without rounding
    between the three steps (one rounding at the end). Operates on (B, H, W, 3) uint8 images.
    """

    def __init__(self, strength, *, seed):
        super().__init__()
        self.strength, self.seed = float(strength), seed
        self.cell = EpochCell()

    def generate_code(self):
        my_range = Compiler.get_iterator()
        seed, address = _U64(self.seed), self.cell.address
        lo, hi = max(0.0, 1.0 - self.strength), 1.0 + self.strength

        def jitter(images, dst):
            epoch, batch = _read_cell_and_advance(address)
            for i in my_range(images.shape[0]):
                key = sample_key(seed, JITTER_STREAM, epoch, batch, i)
                bright = lo + (hi - lo) * uniform(key, 0)
                contrast = lo + (hi - lo) * uniform(key, 1)
                saturation = lo + (hi - lo) * uniform(key, 2)
                image, out = images[i], dst[i]
                height, width = image.shape[0], image.shape[1]
                gray_sum = 0.0  # contrast blends towards the mean gray of the brightened image
                for y in range(height):
                    for x in range(width):
                        r = min(255.0, bright * image[y, x, 0])
                        g = min(255.0, bright * image[y, x, 1])
                        b = min(255.0, bright * image[y, x, 2])
                        gray_sum += 0.299 * r + 0.587 * g + 0.114 * b
                mean_gray = gray_sum / (height * width)
                for y in range(height):
                    for x in range(width):
                        r = min(255.0, bright * image[y, x, 0])
                        g = min(255.0, bright * image[y, x, 1])
                        b = min(255.0, bright * image[y, x, 2])
                        r = min(255.0, max(0.0, contrast * r + (1.0 - contrast) * mean_gray))
                        g = min(255.0, max(0.0, contrast * g + (1.0 - contrast) * mean_gray))
                        b = min(255.0, max(0.0, contrast * b + (1.0 - contrast) * mean_gray))
                        gray = 0.299 * r + 0.587 * g + 0.114 * b
                        out[y, x, 0] = np.uint8(min(255.0, max(0.0, saturation * r + (1.0 - saturation) * gray)) + 0.5)
                        out[y, x, 1] = np.uint8(min(255.0, max(0.0, saturation * g + (1.0 - saturation) * gray)) + 0.5)
                        out[y, x, 2] = np.uint8(min(255.0, max(0.0, saturation * b + (1.0 - saturation) * gray)) + 0.5)
            return dst[:images.shape[0]]

        jitter.is_parallel = True
        return jitter

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
