"""write_datasets/fashion_mnist.py: official gzipped idx files -> beton, made here in LeCun's byte layout."""
import gzip

import numpy as np
import pytest

from test_writers import cli_error, read_beton, run_cli

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    """12 test images: labels 2,0,1,2,0,1,...; image i is filled with grey level 10*i."""
    labels = np.array([2, 0, 1] * 4, dtype=np.uint8)
    images = np.stack([np.full((28, 28), 10 * i, dtype=np.uint8) for i in range(len(labels))])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, LABELS_MAGIC)
    return tmp_path


def fmnist(source, out, *flags):
    return run_cli("fashion_mnist", f"--cfg.data_dir={source}", "--cfg.split=test", "--cfg.write_mode=raw",
                   f"--cfg.write_path={out}", *flags)


def test_keeps_the_first_images_of_each_class_as_enlarged_rgb(fmnist_dir, tmp_path):
    out = tmp_path / "fm.beton"
    manifest = fmnist(fmnist_dir, out, "--cfg.per_class=2", "--cfg.image_size=64")
    images, labels, _ = read_beton(str(out))
    assert manifest["class_names"][0] == "T-shirt/top" and len(manifest["class_names"]) == 10
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    # class 0 first appears at file positions 1 and 4, class 1 at 2 and 5, class 2 at 0 and 3
    assert [int(image[0, 0, 0]) for image in images] == [10, 40, 20, 50, 0, 30]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert all((image == image[:, :, :1]).all() for image in images)  # grey in every channel


def test_skipping_per_class_gives_the_next_images_of_each_class(fmnist_dir, tmp_path):
    fmnist(fmnist_dir, tmp_path / "fm.beton", "--cfg.per_class=1", "--cfg.skip_per_class=2")
    images, labels, _ = read_beton(str(tmp_path / "fm.beton"))
    assert labels.tolist() == [0, 1, 2]
    # the third image of class 0 is at file position 7, of class 1 at 8, of class 2 at 6
    assert [int(image[0, 0, 0]) for image in images] == [70, 80, 60]


def test_skipping_every_image_is_a_one_line_error(fmnist_dir, tmp_path, capsys):
    err = cli_error(capsys, "fashion_mnist", f"--cfg.data_dir={fmnist_dir}", "--cfg.split=test",
                    "--cfg.skip_per_class=4", f"--cfg.write_path={tmp_path / 'fm.beton'}")
    assert "skipping the first 4" in err and len(err.strip().splitlines()) == 1


def test_native_size_keeps_all_images(fmnist_dir, tmp_path):
    fmnist(fmnist_dir, tmp_path / "fm.beton")
    images, labels, _ = read_beton(str(tmp_path / "fm.beton"))
    assert len(images) == 12 and images[0].shape == (28, 28, 3)


def test_a_file_with_the_wrong_magic_is_a_one_line_error(fmnist_dir, tmp_path, capsys):
    write_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz", np.zeros((12, 1), np.uint8), IMAGES_MAGIC - 1)
    err = cli_error(capsys, "fashion_mnist", f"--cfg.data_dir={fmnist_dir}", "--cfg.split=test",
                    f"--cfg.write_path={tmp_path / 'fm.beton'}")
    assert "t10k-labels-idx1-ubyte.gz" in err and "magic 0x00000801" in err and len(err.strip().splitlines()) == 1


def test_a_truncated_file_is_a_one_line_error(fmnist_dir, tmp_path, capsys):
    raw = gzip.open(fmnist_dir / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(fmnist_dir / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    err = cli_error(capsys, "fashion_mnist", f"--cfg.data_dir={fmnist_dir}", "--cfg.split=test",
                    f"--cfg.write_path={tmp_path / 'fm.beton'}")
    assert "header says shape (12, 28, 28)" in err


def test_missing_files_name_the_debian_package(tmp_path, capsys):
    err = cli_error(capsys, "fashion_mnist", f"--cfg.data_dir={tmp_path}", "--cfg.split=train",
                    f"--cfg.write_path={tmp_path / 'fm.beton'}")
    assert "train-images-idx3-ubyte.gz" in err and "dataset-fashion-mnist" in err
