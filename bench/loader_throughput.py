"""Loader throughput: the seed's torchvision/PIL pipeline vs our FFCV train loader vs the JPEG decode ceiling.

    python bench/loader_throughput.py [--bench.data_dir=DIR] [--bench.num_images=N] --bench.out=FILE.json

DIR is an ImageNet-style folder (DIR/train/<class>/*.JPEG, or class folders directly in DIR). Without
one, bench.num_images photo-like 500x375 JPEGs are drawn into bench.work_dir (hjepa.synthetic) and
reused by later runs. All three measurements use the same images, bench.num_workers workers and
bench.batch_size, and (a), (b) the same crop (data.image_size, scale data.crop_scale_*) and flip:
  (a) seed pipeline: torchvision ImageFolder + PIL RandomResizedCrop/flip/ToTensor/Normalize in a
      torch DataLoader(num_workers, shuffle, pin_memory);
  (b) ours: the beton written from the folder (max side cfg.max_resolution, JPEG cfg.jpeg_quality) read by
      hjepa.data.build_train_loader, normalised to float by the consumer (normalize_images);
  (c) ceiling: single-thread OpenCV (libjpeg-turbo) decode of the beton's stored JPEG bytes, x workers.
(a) and (b) are timed over bench.epochs epochs after one untimed warm-up epoch.
"""
import json
import os
import time

import cv2
import numpy as np
import torch
import torchvision
from ffcv.reader import Reader
from torchvision import transforms

from hjepa.beton import read_manifest, write_beton
from hjepa.config import config_from_cli, format_config, save_config
from hjepa.data import IMAGENET_MEAN, IMAGENET_STD, build_train_loader, normalize_images
from hjepa.errors import UserError, exit_on_user_error
from hjepa.runlog import cpu_model
from hjepa.sources import image_folder_samples
from hjepa.synthetic import make_imagenet_tree

NUM_SYNTHETIC_CLASSES = 10
READS = ("bench", "data.image_size", "data.crop_scale", "data.flip",
         "cfg.max_resolution", "cfg.jpeg_quality")


def image_folder(data_dir, num_images, work_dir, num_workers):
    """(folder holding <class>/<images>, number of images); draws a synthetic tree if no data_dir."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise UserError(f"bench.data_dir not found: {data_dir}")
        root = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
        return root, len(image_folder_samples(root, ".")[0])
    per_class = -(-num_images // NUM_SYNTHETIC_CLASSES)
    tree = os.path.join(work_dir, f"synthetic_{per_class * NUM_SYNTHETIC_CLASSES}")
    root = os.path.join(tree, "train")
    if not os.path.isdir(root):
        print(f"drawing {per_class * NUM_SYNTHETIC_CLASSES} synthetic 500x375 JPEGs into {tree} ...", flush=True)
        make_imagenet_tree(tree + ".partial", wnids=[f"n{k:08d}" for k in range(NUM_SYNTHETIC_CLASSES)],
                           train_per_class=per_class, val_per_class=0, size=(500, 375), seed=0,
                           num_workers=num_workers)
        os.replace(tree + ".partial", tree)
    return root, per_class * NUM_SYNTHETIC_CLASSES


def beton_for(root, work_dir, *, max_resolution, jpeg_quality, num_workers):
    """The beton of `root` in work_dir, written once per (folder, writer params)."""
    name = f"{os.path.basename(os.path.dirname(os.path.abspath(root)))}_{max_resolution}_q{jpeg_quality}.beton"
    path = os.path.join(work_dir, name)
    if os.path.isfile(path):
        try:
            manifest = read_manifest(path)
            if manifest.get("source") == os.path.abspath(root):
                return path
        except UserError:
            pass  # stale or partial: rewrite it
    samples, class_names = image_folder_samples(root, ".")
    write_beton(samples, path, dataset="bench", split="train", class_names=class_names,
                source=os.path.abspath(root), max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                write_mode="jpg", num_workers=num_workers)
    return path


def timed_epochs(batches_of_epoch, epochs):
    """Images/s over `epochs` epochs after one untimed warm-up epoch."""
    for _ in batches_of_epoch():
        pass
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch_size in batches_of_epoch():
            images += batch_size
    return images / (time.perf_counter() - start)


def seed_pipeline_img_s(root, *, num_workers, batch_size, image_size, crop_scale, flip, epochs):
    """(a) torchvision ImageFolder + PIL, as the seed repository loads ImageNet."""
    steps = [transforms.RandomResizedCrop(image_size, scale=crop_scale)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    dataset = torchvision.datasets.ImageFolder(root, transform=transforms.Compose(steps))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), drop_last=True,
                                         persistent_workers=True)

    def batches_of_epoch():
        for images, _ in loader:  # (B, 3, S, S) float32, normalised
            yield images.shape[0]

    return timed_epochs(batches_of_epoch, epochs)


def ffcv_img_s(beton, *, num_workers, batch_size, image_size, crop_scale, flip, epochs, device):
    """(b) our train loader normalised to float32 by the consumer on `device`; and uint8 out alone."""
    with build_train_loader(beton, batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                            crop_scale=crop_scale, flip=flip, color_jitter=0.0, in_memory=True,
                            order="random", seed=0) as loader:
        reused = {}  # one float batch buffer, as a training loop's allocator would give it

        def batches_of_epoch(normalize=True):
            for images, _, _ in loader:
                if normalize:
                    buffer = reused.get(images.shape)
                    x = normalize_images(images, device, torch.float32, out=buffer)  # (B, 3, S, S)
                    reused[images.shape] = x
                else:
                    x = images
                yield x.shape[0]

        img_s = timed_epochs(batches_of_epoch, epochs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        # The loader alone (uint8 out): on a CPU consumer the float normalisation is a large share.
        uint8_img_s = timed_epochs(lambda: batches_of_epoch(normalize=False), epochs)
    return img_s, uint8_img_s


def stored_jpegs(beton):
    """The JPEG byte strings stored in the beton's image field."""
    reader = Reader(beton)
    images = reader.metadata["f0"]  # (mode, width, height, data_ptr) per sample
    table = np.sort(reader.alloc_table, order="ptr")
    sizes = table["size"][np.searchsorted(table["ptr"], images["data_ptr"])]
    data = np.fromfile(beton, dtype=np.uint8)
    return [data[int(p):int(p) + int(s)] for p, s, mode in zip(images["data_ptr"], sizes, images["mode"])
            if mode == 0]  # mode 0 = jpg (ffcv.fields.rgb_image.IMAGE_MODES)


def decode_ceiling_img_s(beton, *, num_workers, repeats=2):
    """(c) one thread decoding every stored JPEG (OpenCV uses libjpeg-turbo), times num_workers."""
    jpegs = stored_jpegs(beton)
    if not jpegs:
        raise UserError(f"{beton} stores no JPEG images; write it with cfg.write_mode=jpg")
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
    beton = beton_for(root, work_dir, max_resolution=cfg["cfg.max_resolution"],
                      jpeg_quality=cfg["cfg.jpeg_quality"], num_workers=num_workers)
    common = dict(num_workers=num_workers, batch_size=batch_size, image_size=image_size, crop_scale=crop_scale,
                  flip=flip, epochs=epochs)
    print(f"{num_images} images, {num_workers} workers, batch {batch_size}, crop {image_size} "
          f"scale {crop_scale}, flip {flip}; {epochs} timed epochs after 1 warm-up", flush=True)
    print("(a) seed pipeline ...", flush=True)
    seed = seed_pipeline_img_s(root, **common)
    print("(b) ffcv loader ...", flush=True)
    ours, ours_uint8 = ffcv_img_s(beton, device=device, **common)
    print("(c) decode ceiling ...", flush=True)
    ceiling = decode_ceiling_img_s(beton, num_workers=num_workers)

    results = {
        "seed_pipeline_img_s": seed,
        "ffcv_img_s": ours,
        "ffcv_uint8_img_s": ours_uint8,
        "decode_ceiling_img_s": ceiling,
        "speedup_vs_seed": ours / seed,
        "fraction_of_ceiling": ours / ceiling,
        "num_workers": num_workers,
        "batch_size": batch_size,
        "image_size": image_size,
        "crop_scale": list(crop_scale),
        "flip": flip,
        "num_images": num_images,
        "timed_epochs": epochs,
        "image_folder": os.path.abspath(root),
        "beton": os.path.abspath(beton),
        "beton_max_resolution": cfg["cfg.max_resolution"],
        "beton_jpeg_quality": cfg["cfg.jpeg_quality"],
        "consumer_device": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = [("(a) seed: ImageFolder + PIL, DataLoader", seed), ("(b) ours: FFCV beton + consumer normalize", ours),
            ("    ours, uint8 out (no normalize)", ours_uint8),
            ("(c) ceiling: 1-thread decode x workers", ceiling)]
    print(f"\n{'pipeline':<44}{'images/s':>10}")
    for name, value in rows:
        print(f"{name:<44}{value:>10.0f}")
    print(f"speedup (b)/(a): {results['speedup_vs_seed']:.2f}x (goal >= 8x); "
          f"(b)/(c): {results['fraction_of_ceiling']:.2f} (goal >= 0.6); CPU: {results['cpu_model']}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    save_config(cfg, out + ".params.json", sections=READS)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
