"""Procedural images: deterministic, class = object kind (not colour), ImageNet-style trees."""
import csv
import os

import numpy as np
from PIL import Image

from hjepa.synthetic import KINDS, _object_mask, draw_image, make_images, make_imagenet_tree, write_photo_like_folder


def test_images_are_a_pure_function_of_the_seed():
    first, again, other = (make_images(2, 3, size=(40, 30), seed=s) for s in (5, 5, 6))
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert not any(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_make_images_labels_classes_in_blocks_with_requested_size():
    samples = make_images(3, 4, size=(40, 30))
    assert [label for _, label in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert all(image.shape == (30, 40, 3) and image.dtype == np.uint8 for image, _ in samples)


def test_colour_says_nothing_about_the_class():
    # Mean colour per class over many images sits near mid-grey for every kind: colours are random.
    means = [np.mean([draw_image(kind, np.random.default_rng([i, k]), (32, 24)).mean(axis=(0, 1))
                      for i in range(40)], axis=0) for k, kind in enumerate(KINDS[:4])]
    assert np.ptp(np.array(means), axis=0).max() < 30


def test_every_kind_covers_part_of_its_box_but_not_all_of_it():
    # The mask itself: a kind drawn as nothing (or as a full square) would still give a busy image,
    # since the background alone has gradients, blotches and grain.
    v, u = np.mgrid[-1.2:1.2:97j, -1.2:1.2:97j]
    for kind in KINDS:
        covered = _object_mask(kind, u, v).mean()
        assert 0.05 < covered < 0.95, (kind, covered)


def test_contrast_puts_object_and_background_channels_on_opposite_sides_of_the_gap():
    # A circle of radius 0.45 x 80 px always covers the centre and never the corners.
    centre_minus_corner = []
    for i in range(20):
        image = draw_image("circle", np.random.default_rng(i), (80, 80), radius_range=(0.45, 0.45),
                           clutter=0.0, contrast=100.0).astype(np.float32)
        centre_minus_corner.append(image[35:45, 35:45].mean(axis=(0, 1)) - image[:4, :4].mean(axis=(0, 1)))
    gaps = np.array(centre_minus_corner)  # (20, 3)
    assert (np.abs(gaps) > 60).all()
    # Bright-on-dark and dark-on-bright both occur, and in each image all three channels agree.
    assert (gaps > 0).all(axis=1).any() and (gaps < 0).all(axis=1).any()
    assert ((gaps > 0).all(axis=1) | (gaps < 0).all(axis=1)).all()


def test_draw_options_reach_every_image_of_a_tree(tmp_path):
    make_imagenet_tree(str(tmp_path), wnids=["n01749939"], train_per_class=2, val_per_class=1, size=(32, 24),
                       draw_options=dict(clutter=0.0, contrast=100.0, radius_range=(0.3, 0.3)))
    expected = draw_image(KINDS[0], np.random.default_rng([0, 0, 0, 1]), (32, 24), clutter=0.0, contrast=100.0,
                          radius_range=(0.3, 0.3))
    written = np.asarray(Image.open(tmp_path / "train" / "n01749939" / "n01749939_1.JPEG"))
    assert np.abs(written.astype(np.float32) - expected).mean() < 10  # JPEG error on the grain only


def test_flat_val_tree_has_official_solution_file(tmp_path):
    counts = make_imagenet_tree(str(tmp_path), wnids=["n01749939", "n02869837"], decoy_wnids=["n01440764"],
                                train_per_class=2, val_per_class=2, size=(32, 24), val_layout="flat")
    assert counts == {"train": 6, "val": 6}
    assert sorted(os.listdir(tmp_path / "train")) == ["n01440764", "n01749939", "n02869837"]
    val_files = sorted(os.listdir(tmp_path / "val"))
    assert val_files[0] == "ILSVRC2012_val_00000001.JPEG" and len(val_files) == 6
    with open(tmp_path / "LOC_val_solution.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    image_id, prediction = rows[1]
    wnid, *box = prediction.split()
    assert image_id == "ILSVRC2012_val_00000001" and wnid == "n01749939" and len(box) == 4


def test_folder_val_tree_puts_val_images_under_their_wnid(tmp_path):
    make_imagenet_tree(str(tmp_path), wnids=["n01749939"], train_per_class=1, val_per_class=3, size=(32, 24))
    assert len(os.listdir(tmp_path / "val" / "n01749939")) == 3
    assert not (tmp_path / "LOC_val_solution.csv").exists()


def test_photo_like_folder_holds_landscape_and_portrait_jpegs_within_the_sides(tmp_path):
    root = write_photo_like_folder(str(tmp_path / "images"), 12, sides=(40, 64), num_classes=3)
    sizes = [Image.open(os.path.join(root, kind, name)).size
             for kind in sorted(os.listdir(root)) for name in os.listdir(os.path.join(root, kind))]
    assert sorted(os.listdir(root)) == sorted(KINDS[:3]) and len(sizes) == 12
    assert all(40 <= min(w, h) <= max(w, h) <= 64 and max(w, h) >= 52 for w, h in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
