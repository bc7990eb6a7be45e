"""What the writers store: the size and filter of the resize, header probes, and disk estimates.

The shorter side is brought down to `short_side` (default 256) with the resize torchvision's
`Resize(256)` applies to PIL images, so a centre crop of 224/256 of the stored image is the seed's
`Resize(256) + CenterCrop(224)` up to JPEG loss, and 224-px training crops of at least 80% of the
image are never upsampled. Smaller images are stored as they are (never enlarged).
"""
import os
import shutil

import numpy as np
from PIL import Image

from hjepa.errors import UserError

# ----------------------------------------------------------------------------------------------
# Images


def is_path_source(source):
    """True for a file path sample (decoded when written), False for an array sample."""
    return isinstance(source, (str, os.PathLike))


IMAGE_RESIZE = "PIL bilinear, antialiased (torchvision Resize on PIL images)"


def storage_size(width, height, *, short_side, max_side=None):
    """(width, height) an image is stored at.

    The shorter side becomes short_side with the longer side truncated, as torchvision's
    Resize(short_side) computes it; an image whose shorter side is already <= short_side keeps its
    size (never enlarged). max_side, when set, then caps the longer side (a guard against panoramas).
    """
    short, long = min(width, height), max(width, height)
    if short > short_side:
        short, long = short_side, int(short_side * long / short)
    if max_side and long > max_side:
        short, long = max(1, int(max_side * short / long)), max_side
    return (long, short) if width >= height else (short, long)


def resize_for_storage(image, *, short_side, max_side=None):
    """PIL image -> PIL image at storage_size. PIL's bilinear resize filters over the whole footprint
    when shrinking (antialiased), and is exactly what torchvision's Resize runs on PIL images."""
    size = storage_size(*image.size, short_side=short_side, max_side=max_side)
    return image if size == image.size else image.resize(size, Image.BILINEAR)


def load_for_storage(source, *, short_side, max_side=None):
    """A file path (decoded with PIL, any mode converted to RGB, as torchvision's ImageFolder does) or an
    (H, W, 3) uint8 array -> the (H', W', 3) uint8 array to store."""
    if is_path_source(source):
        with Image.open(source) as image:
            image = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(resize_for_storage(image, short_side=short_side, max_side=max_side))
    height, width = source.shape[:2]
    if storage_size(width, height, short_side=short_side, max_side=max_side) == (width, height):
        return np.ascontiguousarray(source)  # strided views (memory-mapped STL-10) -> contiguous
    return np.asarray(resize_for_storage(Image.fromarray(source), short_side=short_side, max_side=max_side))


def probe_image(path):
    """((width, height), None) when PIL recognises the file as an image, else (None, one-line reason).

    Reads the header only: the pixels are decoded once, when the beton is written, where a file
    that fails (truncated, corrupt) is dropped from the beton afterwards.
    """
    try:
        with Image.open(path) as image:
            return image.size, None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------
# Disk space


def estimate_beton_bytes(stored_sizes, *, write_mode, compress_probability=0.5):
    """A generous estimate of the beton size from the stored (width, height) of every image: 3 bytes
    a pixel raw, a quarter of that as JPEG (q90 photos take 2-4 bits a pixel, a quarter is 6), plus
    one FFCV page per worker and 10% slack."""
    raw_bytes = 3 * sum(width * height for width, height in stored_sizes)
    jpeg_fraction = {"jpg": 1.0, "raw": 0.0, "proportion": compress_probability}[write_mode]
    data_bytes = raw_bytes * (jpeg_fraction / 4 + (1 - jpeg_fraction))
    return int(1.1 * data_bytes + 64 * len(stored_sizes) + 64 * 2**20)


def check_free_space(write_path, needed_bytes):
    """UserError when the disk holding `write_path` has less free space than `needed_bytes`."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(write_path))).free
    if free < needed_bytes:
        raise UserError(f"not enough disk space for {write_path}: about {needed_bytes / 2**30:.2f} GiB "
                        f"needed, {free / 2**30:.2f} GiB free")


