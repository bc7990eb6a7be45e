"""What the writers store: the shorter side at 256 px as torchvision's Resize(256) makes it, never
enlarged, so the eval crop equals the seed's Resize(256) + CenterCrop(224) on the original file."""
import cv2
import numpy as np
import pytest
from PIL import Image

from beton_files import mean_abs_error, read_beton, run_cli
from hjepa.beton import write_beton
from hjepa.storage import storage_size
from hjepa.synthetic import _smooth_noise


def test_raw_mode_stores_exact_pixels_and_shrinks_the_shorter_side(tmp_path):
    wide = np.random.default_rng(0).integers(0, 256, size=(100, 200, 3), dtype=np.uint8)
    small = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = str(tmp_path / "raw.beton")
    write_beton([(wide, 0), (small, 1)], path, dataset="t", split="train", class_names=["a", "b"],
                source="test", short_side=64, write_mode="raw", progress=False)
    images, _, _ = read_beton(path)
    assert images[0].shape == (64, 128, 3)
    assert np.array_equal(images[1], small)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (256, 256), (1000, 257), (257, 1000)])
def test_storage_size_is_torchvision_resize_of_the_shorter_side(size):
    from torchvision import transforms

    assert storage_size(*size, short_side=256) == transforms.Resize(256)(Image.new("RGB", size)).size


def test_storage_never_enlarges_and_max_side_caps_the_longer_side():
    assert storage_size(200, 100, short_side=256) == (200, 100)
    assert storage_size(3000, 500, short_side=256, max_side=1024) == (1024, 170)
    assert storage_size(500, 3000, short_side=256, max_side=1024) == (170, 1024)


def photo_like(rng, size):
    """A (H, W, 3) uint8 image with what makes a photo hard to store small: sharp-edged shapes,
    texture at 4-20 px scales and grain on smooth gradients (a stored image with a shorter side of
    192 px instead of 256 loses it: the old longest-side storage was 4-6 grey levels off here)."""
    width, height = size
    x = np.mgrid[0:height, 0:width][1].astype(np.float32)
    c0, c1 = rng.uniform(30, 220, (2, 3))
    image = c0 + (x / width)[..., None] * (c1 - c0) + 25 * _smooth_noise(rng, height, width, 5)[..., None]
    for _ in range(6):
        colour = tuple(float(c) for c in rng.uniform(0, 255) + rng.uniform(-50, 50, 3))
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.circle(image, centre, int(rng.integers(10, 80)), colour, -1, cv2.LINE_AA)
        cv2.fillPoly(image, [rng.integers(0, [width, height], (3, 2)).astype(np.int32)], colour, cv2.LINE_AA)
    image += 30 * sum(_smooth_noise(rng, height, width, cells) for cells in (24, 48, 96))[..., None]
    image += 2 * rng.standard_normal(image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_eval_crop_of_stored_photos_is_torchvision_resize_256_center_crop_224(tmp_path):
    from torchvision import transforms

    from hjepa.loaders import build_eval_loader

    files = []
    for i, (folder, size) in enumerate([("wide", (500, 375))] * 2 + [("tall", (375, 500))] * 2):
        (tmp_path / "photos" / folder).mkdir(parents=True, exist_ok=True)
        files.append(tmp_path / "photos" / folder / f"{i}.jpg")
        Image.fromarray(photo_like(np.random.default_rng(i), size)).save(files[-1], quality=90)
    out = str(tmp_path / "photos.beton")
    run_cli("imagefolder", f"--cfg.data_dir={tmp_path / 'photos'}", "--cfg.split=.", f"--cfg.write_path={out}",
            "--cfg.num_workers=1")
    with build_eval_loader(out, batch_size=4, num_workers=1, image_size=224) as loader:
        ours = [image.permute(1, 2, 0).numpy() for batch in loader for image in batch[0]]  # (224, 224, 3) each
    seed_transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    # Files are read in class-folder order: "tall" before "wide".
    reference = [np.asarray(seed_transform(Image.open(f).convert("RGB"))) for f in sorted(files, key=str)]
    differences = [mean_abs_error(a, b) for a, b in zip(ours, reference)]
    assert len(differences) == 4 and max(differences) <= 3.0, differences
