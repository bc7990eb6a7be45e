"""The writers: betons and manifests from every source format, bad input, atomic writes, multi.py.

Sources are made here in the official byte layouts (CIFAR python pickles, STL-10 column-major
binaries, ImageNet trees in both val layouts). Betons are read back with ffcv's Reader plus OpenCV
JPEG decoding (no numba compilation); one test goes through a real ffcv Loader.
"""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from beton_files import cli_error, mean_abs_error, read_beton, run_cli
from conftest import REPO_ROOT
from hjepa.sources import imagenet100_class_list
from hjepa.beton import file_checksum, manifest_path, read_manifest, write_beton
from hjepa.errors import UserError
from hjepa.storage import IMAGE_RESIZE
from hjepa.synthetic import make_images, make_imagenet_tree

PYTHON = sys.executable


# ----------------------------------------------------------------------------------------------
# write_beton and manifests


def test_beton_holds_the_images_and_labels_it_was_given(tiny_beton):
    source = make_images(16, 4, size=(64, 48), seed=0)
    images, labels, _ = read_beton(tiny_beton)
    assert labels.tolist() == [label for _, label in source]
    assert all(image.shape == (48, 64, 3) for image in images)
    # JPEG q90 with 4:2:0 chroma on small noisy images: ~6 grey levels off; another image: ~70.
    assert max(mean_abs_error(image, s) for image, (s, _) in zip(images, source)) < 12


def test_manifest_describes_the_beton(tiny_beton):
    manifest = read_manifest(tiny_beton, verify_checksum=True)
    assert manifest["num_samples"] == 64
    assert manifest["class_names"] == ["c0", "c1", "c2", "c3"]
    assert manifest["per_class_counts"] == {"c0": 16, "c1": 16, "c2": 16, "c3": 16}
    assert manifest["fields"] == {"image": "RGBImageField", "label": "IntField"}
    assert manifest["storage"] == {"short_side": 256, "max_side": None, "resize": IMAGE_RESIZE, "enlarge": False,
                                   "write_mode": "jpg", "jpeg_quality": 90, "compress_probability": 0.5}
    assert manifest["size_bytes"] == os.path.getsize(tiny_beton)
    assert manifest["checksum"]["hex"] == file_checksum(tiny_beton)
    assert manifest["bad_images"] == [] and manifest["num_bad_images"] == 0


def test_read_manifest_rejects_a_truncated_beton(tiny_beton, tmp_path):
    copy = tmp_path / "cut.beton"
    copy.write_bytes(open(tiny_beton, "rb").read()[:100_000])
    shutil.copy(manifest_path(tiny_beton), manifest_path(copy))
    with pytest.raises(UserError, match="cut.beton"):
        read_manifest(copy)


def test_read_manifest_rejects_a_beton_without_manifest(tiny_beton, tmp_path):
    shutil.copy(tiny_beton, tmp_path / "lonely.beton")
    with pytest.raises(UserError, match="manifest missing"):
        read_manifest(tmp_path / "lonely.beton")


def test_read_manifest_rejects_a_file_that_is_not_a_beton(tiny_beton, tmp_path):
    fake = tmp_path / "fake.beton"
    fake.write_bytes(b"not a beton at all" * 100)
    manifest = json.load(open(manifest_path(tiny_beton)))
    manifest["size_bytes"] = os.path.getsize(fake)
    json.dump(manifest, open(manifest_path(fake), "w"))
    with pytest.raises(UserError, match="not a .beton"):
        read_manifest(fake)


def test_writer_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr("hjepa.storage.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    path = tmp_path / "full.beton"
    with pytest.raises(UserError, match="not enough disk space"):
        write_beton(make_images(2, 2), path, dataset="t", split="train", class_names=["a", "b"],
                    source="test", progress=False)
    assert os.listdir(tmp_path) == []


def test_killed_writer_leaves_the_previous_beton_intact(tiny_beton, tmp_path):
    path = tmp_path / "data.beton"
    shutil.copy(tiny_beton, path)
    shutil.copy(manifest_path(tiny_beton), manifest_path(path))
    before = file_checksum(path)
    # A write long enough to be killed in the middle: 20,000 JPEG encodes of one noise image.
    script = ("import numpy as np; from hjepa.beton import write_beton; "
              "image = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8); "
              f"write_beton([(image, 0)] * 20000, {str(path)!r}, dataset='t', split='train', "
              "class_names=['a'], source='test', progress=False)")
    writer = subprocess.Popen([PYTHON, "-c", script], cwd=REPO_ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = str(path) + ".partial"
    deadline = time.monotonic() + 60
    while not (os.path.exists(partial) and os.path.getsize(partial) > 2**21) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.poll() is None, "the writer finished before it could be killed"
    os.killpg(writer.pid, signal.SIGKILL)  # the writer and its FFCV worker processes
    writer.wait()
    assert file_checksum(path) == before
    assert read_manifest(path, verify_checksum=True)["num_samples"] == 64


# ----------------------------------------------------------------------------------------------
# Unreadable images and bad folders


@pytest.fixture
def tree_with_bad_files(tmp_path):
    root = tmp_path / "folder"
    make_imagenet_tree(str(root), wnids=["n0000000a", "n0000000b"], train_per_class=6, val_per_class=0,
                       size=(40, 30))
    good = (root / "train" / "n0000000a" / "n0000000a_0.JPEG").read_bytes()
    scan_start = good.index(b"\xff\xda")  # start-of-scan marker: the header before it stays whole
    (root / "train" / "n0000000a" / "truncated.JPEG").write_bytes(good[: (scan_start + len(good)) // 2])
    (root / "train" / "n0000000b" / "empty.JPEG").write_bytes(b"")
    (root / "train" / "n0000000b" / "notes.txt").write_text("not an image")
    return root


def test_unreadable_images_are_skipped_named_and_listed(tree_with_bad_files, tmp_path, capsys):
    out = str(tmp_path / "out.beton")
    manifest = run_cli("imagefolder", f"--cfg.data_dir={tree_with_bad_files}", f"--cfg.write_path={out}",
                       "--cfg.max_bad_fraction=0.5", "--cfg.num_workers=1")
    bad = sorted(os.path.basename(p) for p in manifest["bad_images"])
    assert bad == ["empty.JPEG", "truncated.JPEG"]  # empty: no header; truncated: found when decoded
    assert manifest["num_bad_images"] == 2 and manifest["num_samples"] == 12
    warnings = capsys.readouterr().err
    assert all(name in warnings for name in bad)
    assert read_beton(out)[1].tolist() == [0] * 6 + [1] * 6


def test_too_many_unreadable_images_fail_the_run(tree_with_bad_files, tmp_path, capsys):
    out = tmp_path / "out.beton"
    err = cli_error(capsys, "imagefolder", f"--cfg.data_dir={tree_with_bad_files}", f"--cfg.write_path={out}")
    assert "1 of 14 images are unreadable" in err  # the empty file, found before any image is decoded
    assert not out.exists()


def test_files_without_an_image_extension_are_ignored_not_unreadable(tmp_path):
    make_imagenet_tree(str(tmp_path / "folder"), wnids=["n0000000a"], train_per_class=3, val_per_class=0,
                       size=(40, 30))
    (tmp_path / "folder" / "train" / "n0000000a" / "notes.txt").write_text("not an image")
    manifest = run_cli("imagefolder", f"--cfg.data_dir={tmp_path / 'folder'}", "--cfg.num_workers=1",
                       f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert manifest["num_samples"] == 3 and manifest["bad_images"] == []
    assert manifest["num_ignored_files"] == 1 and manifest["ignored_files"][0].endswith("notes.txt")


def test_writer_fsyncs_beton_and_manifest_before_renaming_them(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.fspath(a), os.fspath(b)))
                        or real_replace(a, b))
    path = str(tmp_path / "d.beton")
    write_beton(make_images(2, 1), path, dataset="t", split="train", class_names=["a"], source="test", progress=False)
    for final in (path, manifest_path(path)):
        rename = events.index(("replace", final + ".partial", final))
        assert ("fsync", final + ".partial") in events[:rename]
        assert ("fsync", str(tmp_path)) in events[rename:]


def test_removed_max_resolution_flag_names_its_replacement(tmp_path, capsys):
    err = cli_error(capsys, "imagefolder", f"--cfg.data_dir={tmp_path}", "--cfg.max_resolution=256",
                    f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert "cfg.max_resolution" in err and "cfg.short_side" in err


@pytest.mark.parametrize("cli", ["imagenet100", "imagefolder", "cifar10", "cifar100", "stl10"])
def test_missing_data_dir_is_a_one_line_error(cli, tmp_path, capsys):
    err = cli_error(capsys, cli, f"--cfg.data_dir={tmp_path / 'nowhere'}", f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cli", ["imagenet100", "imagefolder", "cifar10", "stl10"])
def test_empty_data_dir_is_a_one_line_error(cli, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, cli, f"--cfg.data_dir={tmp_path / 'empty'}", f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert "error:" in err and "empty" in err and len(err.strip().splitlines()) == 1


def test_images_directly_in_the_split_folder_are_a_wrong_layout(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.JPEG")
    err = cli_error(capsys, "imagenet100", f"--cfg.data_dir={tmp_path}", f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert "no class folders" in err


# ----------------------------------------------------------------------------------------------
# ImageNet-100


def test_imagenet_train_keeps_the_100_classes_labelled_by_list_position(tiny_imagenet_tree, tmp_path, capsys):
    tree = tiny_imagenet_tree
    out = str(tmp_path / "train.beton")
    manifest = run_cli("imagenet100", f"--cfg.data_dir={tree.root}", f"--cfg.write_path={out}",
                       "--cfg.allow_missing_classes=1", "--cfg.num_workers=1")
    positions = [imagenet100_class_list().index(w) for w in tree.wnids]
    assert read_beton(out)[1].tolist() == [p for p in positions for _ in range(tree.train_per_class)]
    assert manifest["class_names"] == imagenet100_class_list()
    assert sum(manifest["per_class_counts"].values()) == 3 * tree.train_per_class
    assert "97 of the 100 ImageNet-100 classes are missing" in capsys.readouterr().err
    assert json.load(open(out + ".params.json"))["cfg"]["split"] == "train"


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_imagenet_val_reads_both_official_layouts(layout, tiny_imagenet_tree, tmp_path):
    tree = tiny_imagenet_tree
    root = tree.root if layout == "folders" else tree.flat_root
    out = str(tmp_path / f"val_{layout}.beton")
    manifest = run_cli("imagenet100", f"--cfg.data_dir={root}", "--cfg.split=val", f"--cfg.write_path={out}",
                       "--cfg.allow_missing_classes=1", "--cfg.num_workers=1")
    counts = {w: n for w, n in manifest["per_class_counts"].items() if n}
    assert counts == {w: tree.val_per_class for w in tree.wnids}
    images, labels, _ = read_beton(out)
    assert sorted(labels.tolist()) == sorted(imagenet100_class_list().index(w) for w in tree.wnids for _ in range(2))


def test_missing_imagenet_classes_exit_1_listing_them(tiny_imagenet_tree, tmp_path):
    out = tmp_path / "train.beton"
    result = subprocess.run([PYTHON, "write_datasets/imagenet100.py", f"--cfg.data_dir={tiny_imagenet_tree.root}",
                             f"--cfg.write_path={out}"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    missing = [w for w in imagenet100_class_list() if w not in tiny_imagenet_tree.wnids]
    assert "97 of the 100" in result.stderr and all(w in result.stderr for w in missing)
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_full_imagenet100_tree_with_other_totals_warns(tmp_path, capsys):
    make_imagenet_tree(str(tmp_path / "in100"), wnids=imagenet100_class_list(), train_per_class=1, val_per_class=0,
                       size=(16, 16))
    run_cli("imagenet100", f"--cfg.data_dir={tmp_path / 'in100'}", f"--cfg.write_path={tmp_path / 'o.beton'}")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "ImageNet-100 has" in line]
    assert len(warnings) == 1 and "100 train images" in warnings[0] and "126,689" in warnings[0]


def test_prefiltered_imagenet100_tree_needs_no_flag(tmp_path):
    make_imagenet_tree(str(tmp_path / "in100"), wnids=imagenet100_class_list(), train_per_class=1, val_per_class=0,
                       size=(24, 16))
    out = str(tmp_path / "train.beton")
    manifest = run_cli("imagenet100", f"--cfg.data_dir={tmp_path / 'in100'}", f"--cfg.write_path={out}")
    assert read_beton(out)[1].tolist() == list(range(100))
    assert set(manifest["per_class_counts"].values()) == {1}


def test_subset_spreads_over_all_classes(tmp_path):
    make_imagenet_tree(str(tmp_path / "in100"), wnids=imagenet100_class_list(), train_per_class=2, val_per_class=0,
                       size=(16, 16))
    manifest = run_cli("imagenet100", f"--cfg.data_dir={tmp_path / 'in100'}", "--cfg.subset=100",
                       f"--cfg.write_path={tmp_path / 'sub.beton'}")
    assert manifest["num_samples"] == 100 and set(manifest["per_class_counts"].values()) == {1}


# ----------------------------------------------------------------------------------------------
# CIFAR and STL-10 in their official byte layouts


def cifar_images(n, seed):
    return np.stack([image for image, _ in make_images(n, 1, size=(32, 32), seed=seed)])  # (n, 32, 32, 3)


def pickle_batch(path, content):
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def cifar_rows(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # R plane, G plane, B plane


def test_cifar10_train_reads_all_five_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = cifar_images(15, 0)
    labels = [i % 10 for i in range(15)]
    for b in range(5):
        part = slice(3 * b, 3 * b + 3)
        pickle_batch(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                      "labels": labels[part], "data": cifar_rows(images[part]),
                                                      "filenames": [f"{i}.png" for i in range(3)]})
    out = str(tmp_path / "c10.beton")
    manifest = run_cli("cifar10", f"--cfg.data_dir={tmp_path}", f"--cfg.write_path={out}", "--cfg.write_mode=raw")
    stored, stored_labels, _ = read_beton(out)
    assert stored_labels.tolist() == labels
    assert all(np.array_equal(a, b) for a, b in zip(stored, images))
    assert manifest["class_names"][0] == "airplane" and manifest["split"] == "train"


def test_cifar100_keeps_fine_labels_and_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"fine{i}" for i in range(100)]
    pickle_batch(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    images = cifar_images(6, 1)
    pickle_batch(folder / "test", {"fine_labels": [99, 0, 42, 7, 7, 1], "coarse_labels": [0] * 6,
                                   "data": cifar_rows(images), "filenames": ["x"] * 6})
    out = str(tmp_path / "c100.beton")
    manifest = run_cli("cifar100", f"--cfg.data_dir={folder}", "--cfg.split=test", f"--cfg.write_path={out}",
                       "--cfg.write_mode=raw")
    stored, labels, _ = read_beton(out)
    assert labels.tolist() == [99, 0, 42, 7, 7, 1]
    assert manifest["class_names"] == names
    assert all(np.array_equal(a, b) for a, b in zip(stored, images))


def test_missing_cifar_files_name_each_file_and_place(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    pickle_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", {"labels": [], "data": np.zeros((0, 3072), np.uint8)})
    err = cli_error(capsys, "cifar10", f"--cfg.data_dir={tmp_path}", f"--cfg.write_path={tmp_path / 'o.beton'}")
    assert all(f"cifar-10-batches-py/data_batch_{i}" in err for i in (2, 3, 4, 5))
    assert "data_batch_1" not in err and "--cfg.download=1" in err


def write_stl_binaries(folder, images_by_part, labels_by_part):
    folder.mkdir()
    for part, images in images_by_part.items():
        # Official layout: per image, each channel's 96x96 plane in column-major (Fortran) order.
        planes = [images[i, :, :, c].flatten(order="F") for i in range(len(images)) for c in range(3)]
        (folder / f"{part}_X.bin").write_bytes(np.concatenate(planes).tobytes())
    for part, labels in labels_by_part.items():
        (folder / f"{part}_y.bin").write_bytes(np.array(labels, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def stl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stl")
    rng = np.random.default_rng(0)
    images = {p: rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
              for p, n in (("train", 3), ("test", 2), ("unlabeled", 4))}
    images["train"][0, :10, :, 0] = 255  # a top band: a transposed reader would put it on the left
    labels = {"train": [1, 10, 5], "test": [2, 3]}
    write_stl_binaries(root / "stl10_binary", images, labels)
    return root, images


@pytest.mark.parametrize("split,expected_labels", [("train", [0, 9, 4]), ("test", [1, 2]),
                                                   ("unlabeled", [-1] * 4), ("train+unlabeled", [0, 9, 4] + [-1] * 4)])
def test_stl10_splits_and_labels(split, expected_labels, stl_dir, tmp_path):
    out = str(tmp_path / "stl.beton")
    manifest = run_cli("stl10", f"--cfg.data_dir={stl_dir[0]}", f"--cfg.split={split}", f"--cfg.write_path={out}",
                       "--cfg.write_mode=raw")
    assert read_beton(out)[1].tolist() == expected_labels
    assert manifest["num_unlabeled"] == expected_labels.count(-1)


def test_stl10_pixels_keep_their_orientation(stl_dir, tmp_path):
    root, images = stl_dir
    out = str(tmp_path / "stl.beton")
    run_cli("stl10", f"--cfg.data_dir={root / 'stl10_binary'}", f"--cfg.write_path={out}", "--cfg.write_mode=raw")
    stored = read_beton(out)[0]
    assert all(np.array_equal(a, b) for a, b in zip(stored, images["train"]))
    assert stored[0][:10, :, 0].min() == 255


def test_missing_stl_files_name_each_file(tmp_path, capsys):
    err = cli_error(capsys, "stl10", f"--cfg.data_dir={tmp_path}", "--cfg.split=train+unlabeled",
                    f"--cfg.write_path={tmp_path / 'o.beton'}")
    for name in ("train_X.bin", "train_y.bin", "unlabeled_X.bin"):
        assert f"stl10_binary/{name}" in err


# ----------------------------------------------------------------------------------------------
# Combined betons (write_datasets/multi.py)


def test_multi_members_get_contiguous_ranges_and_dataset_idx(tiny_multi_beton):
    manifest = read_manifest(tiny_multi_beton, verify_checksum=True)
    ranges = [(m["name"], m["index_start"], m["index_end"]) for m in manifest["members"]]
    assert ranges == [("big", 0, 48), ("mid", 48, 72), ("small", 72, 84)]
    _, labels, dataset_idx = read_beton(tiny_multi_beton)
    assert dataset_idx.tolist() == [0] * 48 + [1] * 24 + [2] * 12
    assert labels[48:72].tolist() == [-1] * 24
    for m in manifest["members"]:
        assert m["source_checksum"]["hex"] == file_checksum(m["source"])


def test_multi_copies_the_stored_images_exactly(tiny_multi_beton):
    from ffcv.reader import Reader

    manifest = read_manifest(tiny_multi_beton)
    combined = Reader(tiny_multi_beton).metadata["f0"]
    combined_images = read_beton(tiny_multi_beton)[0]
    for m in manifest["members"]:
        member_images = read_beton(m["source"])[0]
        member_meta = Reader(m["source"]).metadata["f0"]
        part = slice(m["index_start"], m["index_end"])
        assert np.array_equal(combined[part][["mode", "width", "height"]], member_meta[["mode", "width", "height"]])
        assert all(np.array_equal(a, b) for a, b in zip(combined_images[part], member_images))


def test_multi_cli_names_members_from_the_command_line(tiny_beton, tmp_path, capsys):
    out = str(tmp_path / "mix.beton")
    manifest = run_cli("multi", f"--cfg.members=first={tiny_beton},second={tiny_beton}", f"--cfg.write_path={out}")
    assert [(m["name"], m["index_start"], m["index_end"]) for m in manifest["members"]] == [
        ("first", 0, 64), ("second", 64, 128)]
    assert os.path.isfile(out + ".params.json")
    err = cli_error(capsys, "multi", f"--cfg.members=first={tiny_beton},first={tiny_beton}", f"--cfg.write_path={out}")
    assert "'first' appears twice" in err


def test_multi_beton_feeds_an_ffcv_loader(tiny_multi_beton):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(tiny_multi_beton, batch_size=28, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), ratio=1.0)],
                               "label": [IntDecoder(), ToTensor()], "dataset_idx": [IntDecoder(), ToTensor()]})
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(28, 32, 32, 3)] * 3
    assert np.concatenate([b[2].numpy().ravel() for b in batches]).tolist() == [0] * 48 + [1] * 24 + [2] * 12
