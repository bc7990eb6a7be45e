"""Loader throughput: the seed's torchvision/PIL pipeline vs our FFCV train loader vs the JPEG decode ceiling.

    python bench/loader_throughput.py [--bench.data_dir=DIR] [--bench.num_images=N] --bench.out=FILE.json

Both pipelines start from the same folder of JPEGs and deliver the same thing to the training step:
normalised float32 (B, 3, S, S) crops (S = data.image_size, scale data.crop_scale, flip data.flip,
colour jitter) on the consumer device (the GPU if there is one, else the CPU). DIR is an
ImageNet-style folder (DIR/train/<class>/*.JPEG, or class folders directly in DIR); without one,
bench.num_images photo-like JPEGs of ImageNet's typical sizes (300-500 px, landscape and portrait) are
drawn into bench.work_dir (hjepa.synthetic.write_photo_like_folder) and reused by later runs.
  (a) seed: torchvision ImageFolder + the seed repository's JEPATransform (Resize(S + 32) and
      RandomResizedCrop bicubic, flip, ColorJitter of strength SEED_COLOR_JITTER, ToTensor, Normalize)
      in a DataLoader(num_workers, shuffle, pin_memory);
  (b) ours: the beton written from the folder by write_beton with the project's default storage
      policy (timed separately), read by hjepa.loaders.build_train_loader; on a CPU consumer the
      loader's threads normalise (output="float32"), on a GPU the consumer does (normalize_images);
      also timed: uint8 batches alone, and on the CPU the consumer normalising uint8 batches;
  (c) ceiling: single-thread OpenCV (libjpeg-turbo) decode of the beton's stored JPEG bytes, x workers;
  (d) where one loader thread's time goes: ms per image for FFCV's decode alone and for decode + our
      resize op into uint8 and into normalised float32 (`one_thread_ms`).
All use bench.num_workers workers and bench.batch_size; (a) and (b) are timed over bench.epochs
epochs after one untimed warm-up epoch. The machine's speed drifts (a shared VM: a few per cent from one
minute to the next), so (b) runs bench.repeats such windows, each right after a measurement of (c), and the
fraction of the ceiling is the median of the paired ratios (uint8 batches alike); every window's figures
go into the JSON.
"""
import json
import os
import time

import hjepa  # noqa: F401  (before ffcv: its import hook spares every run numba's typed-dict compile)
import cv2
import numpy as np
import torch
import torchvision
from ffcv.reader import Reader
from PIL import Image
from torchvision import transforms

from hjepa.beton import read_manifest, write_beton
from hjepa.config import config_from_cli, format_config, save_config
from hjepa.loaders import (IMAGENET_MEAN, IMAGENET_STD, TRAIN_CROP_ASPECT, DataConfig, build_train_loader,
                           normalize_images)
from hjepa.errors import UserError, exit_on_user_error
from hjepa.runlog import cpu_model
from hjepa.sources import image_folder_samples
from hjepa.synthetic import write_photo_like_folder

NUM_SYNTHETIC_CLASSES = 10
READS = ("bench", "data.image_size", "data.crop_scale", "data.flip", "cfg.short_side", "cfg.jpeg_quality")
# The seed's JEPATransform(color_jitter=0.1): ColorJitter(brightness 0.04, contrast 0.04, saturation 0.02, hue 0.01).
SEED_COLOR_JITTER = 0.1
OUR_COLOR_JITTER = 0.4 * SEED_COLOR_JITTER  # our ColorJitter's strength for brightness, contrast and saturation


def image_folder(data_dir, num_images, work_dir, num_workers):
    """(folder holding <class>/<images>, number of images); draws a synthetic tree if no data_dir."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise UserError(f"bench.data_dir not found: {data_dir}")
        root = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
        return root, len(image_folder_samples(root, ".")[0])
    tree = os.path.join(work_dir, f"photos_{num_images}")
    if not os.path.isdir(tree):
        print(f"drawing {num_images} photo-like JPEGs (300-500 px) into {tree} ...", flush=True)
        write_photo_like_folder(tree + ".partial", num_images, num_classes=NUM_SYNTHETIC_CLASSES,
                                num_workers=num_workers)
        os.replace(tree + ".partial", tree)
    return tree, num_images


def write_bench_beton(root, work_dir, *, jpeg_quality, num_workers):
    """(path, seconds) of the beton of `root`, written by write_beton with its default storage policy."""
    path = os.path.join(work_dir, f"{os.path.basename(os.path.abspath(root))}_q{jpeg_quality}.beton")
    samples, class_names = image_folder_samples(root, ".")[:2]
    start = time.perf_counter()
    write_beton(samples, path, dataset="bench", split="train", class_names=class_names,
                source=os.path.abspath(root), jpeg_quality=jpeg_quality, write_mode="jpg", num_workers=num_workers)
    return path, time.perf_counter() - start


def size_summary(sizes):
    """{"min", "mean", "max"} of the shorter and the longer side of (width, height) pairs."""
    short, long = np.min(sizes, axis=1), np.max(sizes, axis=1)
    return {name: {"min": int(v.min()), "mean": round(float(v.mean()), 1), "max": int(v.max())}
            for name, v in (("short_side", short), ("long_side", long))}


def timed_epochs(batches_of_epoch, epochs, *, repeats=1, before_each=None):
    """Images/s of each of `repeats` windows of `epochs` epochs, after one untimed warm-up epoch;
    before_each() runs, untimed, before every window."""
    for _ in batches_of_epoch():
        pass
    rates = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        images, start = 0, time.perf_counter()
        for _ in range(epochs):
            for batch_size in batches_of_epoch():
                images += batch_size
        rates.append(images / (time.perf_counter() - start))
    return rates


def seed_transform(image_size, crop_scale, flip):
    """The seed repository's JEPATransform (train), with its jitter setting."""
    bicubic = transforms.InterpolationMode.BICUBIC
    steps = [transforms.Resize(image_size + 32, interpolation=bicubic),
             transforms.RandomResizedCrop(image_size, scale=crop_scale, interpolation=bicubic)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    j = SEED_COLOR_JITTER
    steps += [transforms.ColorJitter(brightness=0.4 * j, contrast=0.4 * j, saturation=0.2 * j, hue=0.1 * j),
              transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def seed_pipeline_img_s(root, *, num_workers, batch_size, image_size, crop_scale, flip, epochs, device):
    """(a) torchvision ImageFolder + PIL, as the seed repository loads ImageNet."""
    dataset = torchvision.datasets.ImageFolder(root, transform=seed_transform(image_size, crop_scale, flip))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True)

    def batches_of_epoch():
        for images, _ in loader:
            x = images.to(device, non_blocking=True)  # (B, 3, S, S) float32, normalised
            yield x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed_epochs(batches_of_epoch, epochs)[0]


def ffcv_img_s(beton, *, num_workers, batch_size, image_size, crop_scale, flip, epochs, device, output,
               normalize_on_consumer, repeats=1, before_each=None):
    """(b) our train loader with loader output `output`, normalised on `device` when asked: images/s
    of each of `repeats` timed windows (`timed_epochs`)."""
    config = DataConfig(train_dataset=beton, batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                        crop_scale=crop_scale, flip=flip, color_jitter=OUR_COLOR_JITTER)
    with build_train_loader(config, output=output) as loader:
        reused = {}  # one float batch buffer, as a training loop's allocator would give it

        def batches_of_epoch():
            for images, _, _ in loader:
                if normalize_on_consumer:
                    x = normalize_images(images, device, torch.float32, out=reused.get(images.shape))
                    reused[images.shape] = x  # (B, 3, S, S)
                else:
                    x = images
                yield x.shape[0]
            if device.type == "cuda":
                torch.cuda.synchronize()

        return timed_epochs(batches_of_epoch, epochs, repeats=repeats, before_each=before_each)


def stored_jpegs(beton):
    """The JPEG byte strings stored in the beton's image field, their (width, height)s, and the stored
    (width, height)s of every image."""
    reader = Reader(beton)
    images = reader.metadata["f0"]  # (mode, width, height, data_ptr) per sample
    table = np.sort(reader.alloc_table, order="ptr")
    sizes = table["size"][np.searchsorted(table["ptr"], images["data_ptr"])]
    data = np.fromfile(beton, dtype=np.uint8)
    is_jpeg = images["mode"] == 0  # mode 0 = jpg (ffcv.fields.rgb_image.IMAGE_MODES)
    jpegs = [data[int(p):int(p) + int(s)] for p, s in zip(images["data_ptr"][is_jpeg], sizes[is_jpeg])]
    all_sizes = np.stack([images["width"], images["height"]], axis=1)
    return jpegs, all_sizes[is_jpeg], all_sizes


def decode_ceiling_img_s(jpegs, *, num_workers, repeats=2):
    """(c) one thread decoding every stored JPEG (OpenCV uses libjpeg-turbo), times num_workers."""
    if not jpegs:
        raise UserError("the beton stores no JPEG images")
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for data in jpegs[:50]:
            cv2.imdecode(data, cv2.IMREAD_COLOR)
        start = time.perf_counter()
        for _ in range(repeats):
            for data in jpegs:
                cv2.imdecode(data, cv2.IMREAD_COLOR)
        single = repeats * len(jpegs) / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    return single * num_workers


def one_thread_ms(jpegs, sizes, *, image_size, crop_scale, ring, seed=0):
    """(d) Where one loader thread's time goes, ms per image, best of 3 passes over the stored JPEGs:
    FFCV's decode alone (libjpeg-turbo with its fast integer IDCT, as the loader decodes; the ceiling's
    OpenCV decode uses the accurate one), and decode + `resize_crop` (random crops of scale crop_scale,
    flip every other image, jitter factors 1.02 / 0.98 / 1.01) into uint8 and into normalised float32,
    written round a ring of `ring` images as the loader's output slots are. Full-scale decodes only
    (the loader decodes at 1/2 or less when a crop is at least twice the output)."""
    from ffcv.libffcv import imdecode
    from hjepa.augment import CROP_STREAM, output_conversion, random_crop, resize_crop, sample_key, scratch_floats

    sizes = np.asarray(sizes, np.int64)  # the beton stores them as uint16: width * height would overflow
    log_ratio = np.log(TRAIN_CROP_ASPECT[0]), np.log(TRAIN_CROP_ASPECT[1])
    crops = [tuple(float(v) for v in random_crop(height, width, *crop_scale, *log_ratio,
                                                 np.uint64(sample_key(np.uint64(seed), CROP_STREAM, 0, 0, i))))
             for i, (width, height) in enumerate(sizes)]  # the loader's own seeded crop draw
    buffer = np.empty(int(np.max(sizes[:, 0] * sizes[:, 1])) * 3, np.uint8)
    scratch = np.empty(scratch_floats(int(sizes[:, 0].max()), image_size, image_size), np.float32)

    def decode(i):
        width, height = (int(v) for v in sizes[i])
        imdecode(jpegs[i], buffer, height, width, height, width, 0, 0, 1, 1, False, False)
        return buffer[:3 * height * width].reshape(height, width, 3)

    def best_ms(step):
        step(0)  # compiles on first use
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(len(jpegs)):
                step(i)
            times.append(time.perf_counter() - start)
        return 1e3 * min(times) / len(jpegs)

    result = {"decode_ms": best_ms(decode)}
    for name, normalize in (("uint8", None), ("float32", (IMAGENET_MEAN, IMAGENET_STD))):
        dtype, scale, shift = output_conversion(normalize)
        out = np.ones((ring, image_size, image_size, 3), dtype)  # written: in memory, as the loader's slots are

        def decode_and_resize(i):
            resize_crop(decode(i), *crops[i], out[i % ring], i % 2 == 1, scratch, scale, shift, 1.02, 0.98, 1.01)

        result[f"decode_resize_{name}_ms"] = best_ms(decode_and_resize)
    return result


def source_sizes(root):
    """(width, height) of every image in the folder, read from the file headers."""
    sizes = []
    for path, _ in image_folder_samples(root, ".")[0]:
        with Image.open(path) as image:
            sizes.append(image.size)
    return np.array(sizes)


@exit_on_user_error
def main(argv=None):
    cfg = config_from_cli(__doc__, argv, reads=READS)
    print(format_config(cfg, READS), flush=True)
    out = cfg["bench.out"]
    if not out:
        raise UserError("bench.out is empty: pass --bench.out=FILE.json")
    num_workers = cfg["bench.num_workers"] or os.cpu_count() or 1
    batch_size, image_size = cfg["bench.batch_size"], cfg["data.image_size"]
    crop_scale = cfg["data.crop_scale"]
    flip, epochs, work_dir = cfg["data.flip"], cfg["bench.epochs"], cfg["bench.work_dir"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(work_dir, exist_ok=True)

    root, num_images = image_folder(cfg["bench.data_dir"], cfg["bench.num_images"], work_dir, num_workers)
    if num_images < batch_size:
        raise UserError(f"{root} holds {num_images} images, fewer than bench.batch_size={batch_size}")
    print(f"writing the beton ({num_images} images, {num_workers} writer processes) ...", flush=True)
    beton, write_s = write_bench_beton(root, work_dir, jpeg_quality=cfg["cfg.jpeg_quality"], num_workers=num_workers)
    jpegs, jpeg_sizes, stored = stored_jpegs(beton)
    common = dict(num_workers=num_workers, batch_size=batch_size, image_size=image_size, crop_scale=crop_scale,
                  flip=flip, epochs=epochs, device=device)
    print(f"{num_images} images, {num_workers} workers, batch {batch_size}, crop {image_size} scale {crop_scale}, "
          f"flip {flip}, jitter; consumer {device.type}; {epochs} timed epochs after 1 warm-up", flush=True)
    print("(a) seed pipeline ...", flush=True)
    seed = seed_pipeline_img_s(root, **common)
    print(f"(b) ffcv loader, {cfg['bench.repeats']} timed windows, each after a run of (c) the decode ceiling ...",
          flush=True)
    # What a training loop on this device should use: normalised by the loader's threads on a CPU
    # consumer, by the device itself on a GPU.
    on_gpu = device.type == "cuda"
    # ... each timed window right after a measurement of (c), so that both see the machine as it is then
    def paired_windows(output, normalize_on_consumer):
        """(our images/s, the ceiling's, their ratio) of each timed window."""
        ceilings = []
        windows = ffcv_img_s(beton, output=output, normalize_on_consumer=normalize_on_consumer,
                             repeats=cfg["bench.repeats"],
                             before_each=lambda: ceilings.append(decode_ceiling_img_s(jpegs, num_workers=num_workers)),
                             **common)
        return windows, ceilings, [w / c for w, c in zip(windows, ceilings)]

    windows, ceilings, fractions = paired_windows("uint8" if on_gpu else "float32", on_gpu)
    ours, ceiling = float(np.median(windows)), float(np.median(ceilings))
    uint8_windows, uint8_ceilings, uint8_fractions = paired_windows("uint8", False)
    ours_uint8 = float(np.median(uint8_windows))
    consumer_normalised = (None if on_gpu else
                           ffcv_img_s(beton, output="uint8", normalize_on_consumer=True, **common)[0])

    print("(d) one thread: decode, decode + resize ...", flush=True)
    per_image = one_thread_ms(jpegs, jpeg_sizes, image_size=image_size, crop_scale=crop_scale,
                              ring=5 * batch_size)  # FFCV's output slots: batches_ahead (3) + 2 batches

    manifest = read_manifest(beton)
    results = {
        "seed_pipeline_img_s": seed,
        "ffcv_img_s": ours,
        "uint8_img_s": ours_uint8,
        "ffcv_consumer_normalize_img_s": consumer_normalised,
        "decode_ceiling_img_s": ceiling,
        "speedup_vs_seed": ours / seed,
        "fraction_of_ceiling": float(np.median(fractions)),
        "uint8_fraction_of_ceiling": float(np.median(uint8_fractions)),
        "repeats": len(windows),
        "ffcv_img_s_windows": windows,
        "decode_ceiling_img_s_windows": ceilings,
        "fraction_of_ceiling_windows": fractions,
        "uint8_img_s_windows": uint8_windows,
        "uint8_decode_ceiling_img_s_windows": uint8_ceilings,
        "uint8_fraction_of_ceiling_windows": uint8_fractions,
        "one_thread_ms": per_image,
        "ffcv_normalised_by": "consumer device" if on_gpu else "loader threads (output=float32)",
        "beton_write_s": write_s,
        "storage_policy": {k: v for k, v in manifest.items() if k in ("writer", "storage")},
        "source_image_sizes": size_summary(source_sizes(root)),
        "stored_image_sizes": size_summary(stored),
        "cores": os.cpu_count(),
        "workers": num_workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "crop_scale": list(crop_scale),
        "flip": flip,
        "seed_color_jitter": SEED_COLOR_JITTER,
        "our_color_jitter": OUR_COLOR_JITTER,
        "num_images": num_images,
        "timed_epochs": epochs,
        "image_folder": os.path.abspath(root),
        "beton": os.path.abspath(beton),
        "beton_jpeg_quality": cfg["cfg.jpeg_quality"],
        "consumer_device": device.type,
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = [("(a) seed: ImageFolder + PIL JEPATransform, DataLoader", seed),
            (f"(b) ours: FFCV, normalised by the {'GPU' if on_gpu else 'loader threads'} (median)", ours),
            ("    ours, uint8 batches (no normalisation) (median)", ours_uint8)]
    if consumer_normalised is not None:
        rows.append(("    ours, uint8 + consumer normalize_images", consumer_normalised))
    rows.append(("(c) ceiling: 1-thread decode x workers (median)", ceiling))
    print(f"\n{'pipeline':<56}{'images/s':>10}")
    for name, value in rows:
        print(f"{name:<56}{value:>10.0f}")
    print(f"speedup (b)/(a): {results['speedup_vs_seed']:.2f}x (goal >= 8x); (b)/(c): "
          f"{results['fraction_of_ceiling']:.2f} (goal >= 0.6; median of "
          f"{', '.join(f'{f:.2f}' for f in fractions)}); uint8 {results['uint8_fraction_of_ceiling']:.2f}; "
          f"beton written in {write_s:.1f} s; "
          f"stored short side {results['stored_image_sizes']['short_side']}; CPU: {results['cpu_model']}")
    print(f"(d) one thread, ms per image: decode {per_image['decode_ms']:.3f}; decode + resize to uint8 "
          f"{per_image['decode_resize_uint8_ms']:.3f}, to normalised float32 "
          f"{per_image['decode_resize_float32_ms']:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    save_config(cfg, out + ".params.json", sections=READS)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
