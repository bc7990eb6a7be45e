"""Procedurally drawn images for tests, the demo and the benchmarks.

The class of an image is the *kind* of its foreground object (a shape or a textured patch); its
colours, the background, position, scale and rotation are random, so colour alone is no shortcut.
Images look a little like photos to a JPEG codec: smooth colour gradients, low-frequency blotches
and fine grain noise, so decoding costs about what it costs on real pictures.

Everything is a pure function of its seed: the same call draws the same pixels.
"""
import csv
import multiprocessing
import os

import cv2
import numpy as np
from PIL import Image

KINDS = ("circle", "square", "triangle", "ring", "cross", "star", "hexagon", "ellipse",
         "stripes", "checker", "dots", "crescent")


def _object_mask(kind, u, v):
    """Boolean mask of `kind` in object coordinates: (u, v) rotated, centred, unit = object radius."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if kind == "circle":
        return r < 1
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if kind == "triangle":
        return (v > -0.5) & (v < 1.0 - 1.732 * np.abs(u))
    if kind == "ring":
        return (r < 1) & (r > 0.6)
    if kind == "cross":
        return ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
    if kind == "star":
        return r < 0.55 + 0.45 * np.cos(5 * theta)
    if kind == "hexagon":
        sector = np.pi / 3
        return r * np.cos((theta % sector) - sector / 2) < 0.85
    if kind == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 < 1
    if kind == "stripes":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.sin(u * 9) > 0)
    if kind == "checker":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & ((np.sin(u * 7) * np.sin(v * 7)) > 0)
    if kind == "dots":
        return (np.maximum(np.abs(u), np.abs(v)) < 0.9) & (np.hypot((u * 2.5) % 1 - 0.5, (v * 2.5) % 1 - 0.5) < 0.28)
    if kind == "crescent":
        return (r < 1) & (np.hypot(u - 0.45, v) > 0.8)
    raise ValueError(f"unknown kind {kind!r}")


def _smooth_noise(rng, height, width, cells):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled with bicubic interpolation."""
    grid = rng.uniform(-1, 1, size=(cells, max(2, cells * width // max(height, 1)))).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def draw_image(kind, rng, size=(64, 48), *, radius_range=(0.2, 0.42), clutter=35.0, contrast=0.0):
    """One (H, W, 3) uint8 image of an object of `kind` at a random colour, place, scale and angle.

    radius_range: object radius as a fraction of the shorter side. clutter: amplitude (0-255 scale)
    of the background's low-frequency blotches. contrast > 0 draws the background's colour channels
    from one end of [0, 255] and the object's from the other (which end is a coin flip), with a gap of
    `contrast` between the two ranges: the object's outline always stands out in luminance, while its
    hue, and whether it is the darker or brighter part, stay random.
    """
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    # Background: a gradient between two random colours along a random direction, plus blotches.
    angle = np.float32(rng.uniform(0, 2 * np.pi))
    ramp = (x * np.cos(angle) + y * np.sin(angle)) / max(width, height)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    if contrast > 0:
        low, high = (0.0, (255 - contrast) / 2), ((255 + contrast) / 2, 255.0)
        background_range, object_range = (low, high) if rng.random() < 0.5 else (high, low)
    else:
        background_range = object_range = (0.0, 255.0)
    colour_a, colour_b = rng.uniform(*background_range, size=(2, 3)).astype(np.float32)
    image = colour_a + ramp[..., None] * (colour_b - colour_a)  # (H, W, 3)
    image += clutter * _smooth_noise(rng, height, width, int(rng.integers(3, 9)))[..., None]
    # Foreground object, with its own colour and shading texture.
    radius = np.float32(rng.uniform(*radius_range) * min(width, height))
    cx = np.float32(rng.uniform(radius, width - radius))
    cy = np.float32(rng.uniform(radius, height - radius))
    rotation = np.float32(rng.uniform(0, 2 * np.pi))
    dx, dy = (x - cx) / radius, (y - cy) / radius
    u = dx * np.cos(rotation) + dy * np.sin(rotation)
    v = -dx * np.sin(rotation) + dy * np.cos(rotation)
    mask = _object_mask(kind, u, v)
    colour = rng.uniform(*object_range, size=3).astype(np.float32)
    shade = colour + 40 * _smooth_noise(rng, height, width, 12)[..., None]
    image = np.where(mask[..., None], shade, image)
    image += 6 * rng.standard_normal(size=image.shape, dtype=np.float32)  # sensor-like grain
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(num_per_class, num_classes, *, size=(64, 48), seed=0):
    """In-memory samples [(image (H, W, 3) uint8, label)], class c drawn as KINDS[c % len(KINDS)]."""
    samples = []
    for label in range(num_classes):
        for i in range(num_per_class):
            rng = np.random.default_rng([seed, label, i])
            samples.append((draw_image(KINDS[label % len(KINDS)], rng, size), label))
    return samples


def _draw_and_save(job):
    path, kind, rng_key, size, jpeg_quality, draw_options = job
    image = draw_image(kind, np.random.default_rng(rng_key), size, **draw_options)
    Image.fromarray(image).save(path, format="JPEG", quality=jpeg_quality)


def photo_like_size(rng, sides):
    """(width, height) of a photo-like image: the long side uniform in [mean of sides, sides[1]], the
    short side in [sides[0], long side], landscape or portrait with equal odds."""
    low, high = sides
    long_side = int(rng.integers((low + high) // 2, high + 1))
    short_side = int(rng.integers(low, long_side + 1))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def write_photo_like_folder(root, num_images, *, sides=(300, 500), num_classes=10, seed=0, jpeg_quality=90,
                            num_workers=1):
    """Write num_images JPEGs as root/<kind>/<i>.jpg (an image folder, class k = KINDS[k]), each of a
    random photo_like_size, images dealt to the classes in turn. Returns root."""
    jobs = []
    for label, kind in enumerate(KINDS[:num_classes]):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for i in range(label, num_images, num_classes):
            size = photo_like_size(np.random.default_rng([seed, 2, label, i]), sides)
            jobs.append((os.path.join(root, kind, f"{i}.jpg"), kind, [seed, 3, label, i], size, jpeg_quality, {}))
    _draw_all(jobs, num_workers)
    return root


def _draw_all(jobs, num_workers):
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            pool.map(_draw_and_save, jobs, chunksize=16)
    else:
        for job in jobs:
            _draw_and_save(job)


def make_imagenet_tree(root, *, wnids, decoy_wnids=(), train_per_class, val_per_class,
                       size=(500, 375), seed=0, val_layout="folders", jpeg_quality=90, num_workers=1,
                       draw_options=None):
    """Write an ImageNet-1k-style tree of JPEGs under `root`; return {split: number of images}.

    train/<wnid>/<wnid>_<i>.JPEG for every wnid in wnids + decoy_wnids; val either as
    val/<wnid>/ILSVRC2012_val_<n>.JPEG (val_layout="folders") or flat val/ILSVRC2012_val_<n>.JPEG plus
    LOC_val_solution.csv in the official Kaggle format (`ImageId,PredictionString` with
    `wnid x_min y_min x_max y_max` boxes) (val_layout="flat"). Class k of the combined list is drawn
    as KINDS[k % len(KINDS)]; draw_options (a dict) passes keyword arguments on to draw_image.
    """
    if val_layout not in ("folders", "flat"):
        raise ValueError(f"val_layout must be 'folders' or 'flat', got {val_layout!r}")
    all_wnids = list(wnids) + list(decoy_wnids)
    draw_options = dict(draw_options or {})
    jobs, solution = [], []
    for k, wnid in enumerate(all_wnids):
        os.makedirs(os.path.join(root, "train", wnid), exist_ok=True)
        for i in range(train_per_class):
            path = os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG")
            jobs.append((path, KINDS[k % len(KINDS)], [seed, 0, k, i], size, jpeg_quality, draw_options))
    val_number = 0
    for i in range(val_per_class):  # interleave classes, as the real val set does
        for k, wnid in enumerate(all_wnids):
            val_number += 1
            name = f"ILSVRC2012_val_{val_number:08d}"
            folder = os.path.join(root, "val", wnid) if val_layout == "folders" else os.path.join(root, "val")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, name + ".JPEG"), KINDS[k % len(KINDS)], [seed, 1, k, i],
                         size, jpeg_quality, draw_options))
            solution.append((name, wnid))
    _draw_all(jobs, num_workers)
    if val_layout == "flat" and solution:
        width, height = size
        with open(os.path.join(root, "LOC_val_solution.csv"), "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["ImageId", "PredictionString"])
            for name, wnid in solution:
                # The official file gives object boxes; ours span the image (readers use the wnid only).
                rows.writerow([name, f"{wnid} 0 0 {width - 1} {height - 1} "])
    return {"train": train_per_class * len(all_wnids), "val": val_per_class * len(all_wnids)}
