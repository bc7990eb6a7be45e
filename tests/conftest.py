"""Session-wide test data, made by the tests themselves (small and fast: a few seconds in all).

- tiny_imagenet_tree: ImageNet-1k-style JPEG trees holding a few of the 100 ImageNet-100 wnids plus
  decoy wnids, with the val split in both official layouts.
- tiny_beton: a single beton (fields image, label) of 64 drawn images, 4 classes, 64x48 px.
- tiny_multi_beton: three member betons of different sizes combined into one (image, label,
  dataset_idx), with a manifest listing the members.
"""
import os
import types

import pytest

from hjepa.beton import combine_betons, write_beton
from hjepa.sources import imagenet100_class_list
from hjepa.synthetic import make_images, make_imagenet_tree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Entry points run by path in subprocesses (`python hjepa/train.py`) import the installed hjepa: make that
# this checkout (pyproject's pytest `pythonpath` does the same for this process), whichever checkout
# the environment's editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def tiny_imagenet_tree(tmp_path_factory):
    """Namespace: root (val/<wnid>/ layout), flat_root (val/*.JPEG + LOC_val_solution.csv), wnids
    (the ImageNet-100 wnids present, in list order), decoy_wnids, train_per_class, val_per_class."""
    all_wnids = imagenet100_class_list()
    # Positions 0, 7 and 99 of the list: labels must be list positions, not folder order.
    wnids = [all_wnids[0], all_wnids[7], all_wnids[99]]
    decoy_wnids = ["n01440764", "n15075141"]  # ImageNet-1k classes not in ImageNet-100
    tree = types.SimpleNamespace(
        root=str(tmp_path_factory.mktemp("imagenet_folders")),
        flat_root=str(tmp_path_factory.mktemp("imagenet_flat")),
        wnids=wnids, decoy_wnids=decoy_wnids, train_per_class=4, val_per_class=2, size=(64, 48))
    for root, layout in ((tree.root, "folders"), (tree.flat_root, "flat")):
        make_imagenet_tree(root, wnids=wnids, decoy_wnids=decoy_wnids, train_per_class=tree.train_per_class,
                           val_per_class=tree.val_per_class, size=tree.size, seed=0, val_layout=layout)
    return tree


@pytest.fixture(scope="session")
def tiny_beton(tmp_path_factory):
    """Path of a beton with 64 images (4 classes x 16, 64x48 px, labels 0..3 in blocks of 16)."""
    path = str(tmp_path_factory.mktemp("tiny_beton") / "tiny.beton")
    write_beton(make_images(16, 4, size=(64, 48), seed=0), path, dataset="synthetic", split="train",
                class_names=["c0", "c1", "c2", "c3"], source="hjepa.synthetic.make_images",
                progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_multi_beton(tmp_path_factory):
    """Path of a combined beton of three members: big (48 imgs, 64x48), mid (24, 96x96, unlabeled),
    small (12, 32x32); dataset_idx 0, 1, 2; its manifest has "members" with index ranges."""
    folder = tmp_path_factory.mktemp("tiny_multi")
    specs = [("big", 12, 4, (64, 48)), ("mid", 8, 3, (96, 96)), ("small", 4, 3, (32, 32))]
    members = []
    for seed, (name, per_class, num_classes, size) in enumerate(specs):
        samples = make_images(per_class, num_classes, size=size, seed=seed)
        if name == "mid":
            samples = [(image, -1) for image, _ in samples]
        path = str(folder / f"{name}.beton")
        write_beton(samples, path, dataset=name, split="train",
                    class_names=[f"{name}{c}" for c in range(num_classes)], source="hjepa.synthetic",
                    progress=False)
        members.append((name, path))
    path = str(folder / "multi.beton")
    combine_betons(members, path, progress=False)
    return path
