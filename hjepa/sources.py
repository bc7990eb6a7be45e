"""Readers of the source datasets: each returns the samples `hjepa.beton.write_beton` takes.

Every reader returns `(samples, class_names)` first, with samples a list of (image_source, label):
image_source is a file path (ImageNet, image folders) or an (H, W, 3) uint8 array view (CIFAR, STL-10;
STL-10 views are memory-mapped, so the 2.7 GB unlabeled split is never held in RAM). The folder readers
add a third item naming the files they left out for lacking an image extension. A missing or
malformed source is a UserError that says what should be where.
"""
import csv
import os
import pickle
import sys

import numpy as np

from hjepa.errors import UserError

CLASS_LIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100_classes.txt")
# Images of the 100 classes in ImageNet-1k's train and val sets (CMC's subset).
IMAGENET100_SPLIT_SIZES = {"train": 126_689, "val": 5_000}
# What torchvision's ImageFolder takes for an image; other files in a class folder are not samples.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Official archives, as torchvision.datasets knows them (url, md5, folder the archive extracts to).
ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "91f7769df0f17e558f3565bffb0c7dfb", "stl10_binary"),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _require_dir(data_dir, what):
    if not data_dir:
        raise UserError(f"no data_dir given: pass --cfg.data_dir=the folder holding {what}")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir not found: {data_dir} (it should hold {what})")


def _visible_entries(folder):
    return sorted(e for e in os.listdir(folder) if not e.startswith("."))


# ----------------------------------------------------------------------------------------------
# ImageNet-100 and generic image folders


def imagenet100_class_list():
    """The 100 CMC ImageNet-100 wnids (Tian et al. 2019); label = position in this list."""
    with open(CLASS_LIST_PATH) as f:
        return f.read().split()


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folder_samples(split_dir, class_to_label):
    """([(path, label)] for every visible image file in <split_dir>/<class>/, [paths of the other
    visible files]): a file is a sample by its extension (IMAGE_EXTENSIONS), as in ImageFolder."""
    samples, ignored = [], []
    for name, label in class_to_label.items():
        folder = os.path.join(split_dir, name)
        if os.path.isdir(folder):
            files = [os.path.join(folder, f) for f in _visible_entries(folder)]
            files = [f for f in files if os.path.isfile(f)]
            samples += [(f, label) for f in files if is_image_file(f)]
            ignored += [f for f in files if not is_image_file(f)]
    return samples, ignored


def _flat_val_solution(data_dir, split_dir):
    # Kaggle's copy keeps the csv three levels above ILSVRC/Data/CLS-LOC (the folder holding val/).
    folders = [split_dir, data_dir] + [os.path.join(data_dir, *[".."] * up) for up in (1, 2, 3)]
    for folder in folders:
        candidate = os.path.normpath(os.path.join(folder, "LOC_val_solution.csv"))
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"{split_dir} holds images but no class folders, and no LOC_val_solution.csv was found "
                    f"in {split_dir}, {data_dir} or up to three folders above it: use val/<wnid>/*.JPEG or "
                    "flat val/*.JPEG plus LOC_val_solution.csv")


def _read_val_solution(csv_path):
    """{ImageId: wnid} from the official `ImageId,PredictionString` file (first box's wnid)."""
    labels = {}
    with open(csv_path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise UserError(f"{csv_path} must start with the header 'ImageId,PredictionString'")
        for row in rows:
            if len(row) >= 2 and row[1].split():
                labels[row[0].strip()] = row[1].split()[0]
    return labels


def imagenet_samples(data_dir, split, *, class_list, allow_missing_classes=False):
    """Samples of `split` (train | val) of an ImageNet-1k tree, keeping only the wnids of class_list.

    Layouts: <data_dir>/<split>/<wnid>/*.JPEG, or for val the flat <data_dir>/val/*.JPEG with
    LOC_val_solution.csv in <data_dir> or <data_dir>/val. Returns (samples, class_list, info) where
    info = {"present": wnids found, "missing": wnids absent, "dropped_classes": other wnids seen,
    "ignored_files": files kept out for lacking an image extension}.
    """
    layout = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or val/*.JPEG + LOC_val_solution.csv)"
    _require_dir(data_dir, layout)
    if split not in ("train", "val"):
        raise UserError(f"ImageNet split must be train or val, got '{split}'")
    split_dir = os.path.join(data_dir, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} not found: data_dir must hold {layout} (ImageNet is never downloaded)")
    entries = _visible_entries(split_dir)
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(split_dir, e))]
    files = [e for e in entries if os.path.isfile(os.path.join(split_dir, e)) and e != "LOC_val_solution.csv"]
    label_of = {wnid: i for i, wnid in enumerate(class_list)}
    if class_dirs:
        seen = set(class_dirs)
        samples, ignored = _class_folder_samples(split_dir, {w: label_of[w] for w in class_list if w in seen})
    elif files and split == "val":
        ignored = [os.path.join(split_dir, f) for f in files if not is_image_file(f)]
        files = [f for f in files if is_image_file(f)]
        solution = _read_val_solution(_flat_val_solution(data_dir, split_dir))
        unlisted = [f for f in files if os.path.splitext(f)[0] not in solution]
        if unlisted:
            raise UserError(f"{len(unlisted)} images in {split_dir} are not in LOC_val_solution.csv, "
                            f"first: {unlisted[0]}")
        wnid_of = {f: solution[os.path.splitext(f)[0]] for f in files}
        seen = set(wnid_of.values())
        samples = sorted(((os.path.join(split_dir, f), label_of[w]) for f, w in wnid_of.items() if w in label_of),
                         key=lambda s: (s[1], s[0]))
    else:
        raise UserError(f"{split_dir} holds no class folders: expected {split}/<wnid>/*.JPEG")
    info = {"present": [w for w in class_list if w in seen],
            "missing": [w for w in class_list if w not in seen],
            "dropped_classes": sorted(seen - set(class_list)), "ignored_files": ignored}
    if info["missing"]:
        message = (f"{len(info['missing'])} of the {len(class_list)} ImageNet-100 classes are missing from "
                   f"{split_dir}: {' '.join(info['missing'])}")
        if not allow_missing_classes:
            raise UserError(message + " (pass --cfg.allow_missing_classes=1 to write anyway)")
        print(f"warning: {message}; writing anyway (allow_missing_classes=1)", file=sys.stderr)
    return samples, list(class_list), info


def image_folder_samples(data_dir, split):
    """Samples of <data_dir>/<split>/<class>/<image files> with labels = sorted class folder names
    (split "." reads class folders directly under data_dir). Returns (samples, class_names, ignored):
    ignored lists the files kept out for lacking an image extension."""
    _require_dir(data_dir, "<split>/<class>/<images>")
    split_dir = os.path.normpath(os.path.join(data_dir, split))
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} not found: data_dir must hold {split}/<class>/<images> "
                        "(or pass --cfg.split=. for class folders directly in data_dir)")
    class_names = [e for e in _visible_entries(split_dir) if os.path.isdir(os.path.join(split_dir, e))]
    if not class_names:
        raise UserError(f"{split_dir} holds no class folders: expected {split}/<class>/<images>")
    samples, ignored = _class_folder_samples(split_dir, {c: i for i, c in enumerate(class_names)})
    return samples, class_names, ignored


# ----------------------------------------------------------------------------------------------
# CIFAR (official "python version" pickles) and STL-10 (official binaries)


def _missing_files_error(dataset, base, missing):
    url, _, folder = ARCHIVES[dataset]
    return UserError(f"missing {dataset} files: {', '.join(missing)}; extract {url} into "
                     f"{os.path.dirname(base) or '.'} so that {base}/ holds them, or pass --cfg.download=1")


def locate_files(dataset, data_dir, names):
    """Paths of `names` in <data_dir>/<official folder>/ (or directly in data_dir); UserError naming
    each missing file and where it should be."""
    _, _, folder = ARCHIVES[dataset]
    if not data_dir:
        raise UserError(f"no data_dir given: pass --cfg.data_dir=the folder that contains {folder}/")
    base = os.path.join(data_dir, folder)
    if not os.path.isdir(base) and all(os.path.isfile(os.path.join(data_dir, n)) for n in names):
        base = data_dir  # data_dir is the official folder itself
    missing = [os.path.join(base, n) for n in names if not os.path.isfile(os.path.join(base, n))]
    if missing:
        raise _missing_files_error(dataset, base, missing)
    return [os.path.join(base, n) for n in names]


def download(dataset, data_dir):
    """Fetch and extract the official archive into data_dir with torchvision's helper (md5-checked)."""
    from torchvision.datasets.utils import download_and_extract_archive

    url, md5, _ = ARCHIVES[dataset]
    download_and_extract_archive(url, download_root=data_dir, md5=md5)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches: plain containers and numpy arrays only, so a tampered file cannot
    run code (pickle.load would import and call anything the file names)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how protocol-2 pickles made by Python 3 store bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_pickle(path):
    try:
        with open(path, "rb") as f:
            # The official batches are Python 2 pickles: latin1 keeps numpy's byte strings intact.
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a CIFAR python-version batch ({e})")


def _cifar_images(batch, path):
    data = np.asarray(batch.get("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)


def cifar_samples(data_dir, split, *, variant):
    """CIFAR-10 (variant "cifar10") or CIFAR-100 ("cifar100", fine labels) samples of train | test."""
    if split not in ("train", "test"):
        raise UserError(f"{variant} split must be train or test, got '{split}'")
    if variant == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, class_names = "labels", CIFAR10_CLASSES
        paths = locate_files(variant, data_dir, names)
    else:
        label_key = "fine_labels"
        *paths, meta_path = locate_files(variant, data_dir, [split, "meta"])
        class_names = list(_load_cifar_pickle(meta_path)["fine_label_names"])
    samples = []
    for path in paths:
        batch = _load_cifar_pickle(path)
        images, labels = _cifar_images(batch, path), np.asarray(batch.get(label_key, []), dtype=np.int64)
        if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(class_names)):
            raise UserError(f"{path}: '{label_key}' must hold {len(images)} labels in 0..{len(class_names) - 1}")
        samples += list(zip(images, labels.tolist()))
    return samples, class_names


STL_IMAGE_BYTES = 3 * 96 * 96
STL_SPLITS = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
              "train+unlabeled": ["train", "unlabeled"]}


def _stl_images(path):
    size = os.path.getsize(path)
    if size % STL_IMAGE_BYTES:
        raise UserError(f"{path} is {size} bytes, not a multiple of 3*96*96: not an STL-10 image file")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    # Each image is stored channel by channel in column-major (Fortran) order: axis 2 is x, axis 3 is y.
    return raw.transpose(0, 3, 2, 1)  # (N, 96 rows, 96 cols, 3)


def stl10_samples(data_dir, split):
    """STL-10 samples of train | test | unlabeled | train+unlabeled; labels 1..10 -> 0..9, unlabeled -1."""
    if split not in STL_SPLITS:
        raise UserError(f"stl10 split must be one of {', '.join(STL_SPLITS)}, got '{split}'")
    parts = STL_SPLITS[split]
    names = [n for p in parts for n in ([f"{p}_X.bin"] + ([f"{p}_y.bin"] if p != "unlabeled" else []))]
    paths = dict(zip(names, locate_files("stl10", data_dir, names)))
    samples = []
    for part in parts:
        images = _stl_images(paths[f"{part}_X.bin"])
        if part == "unlabeled":
            labels = np.full(len(images), -1)
        else:
            y_path = paths[f"{part}_y.bin"]
            labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
                raise UserError(f"{y_path} must hold {len(images)} labels in 1..10")
        samples += list(zip(images, labels.tolist()))
    return samples, STL10_CLASSES


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (official gzipped idx files, as the Debian package dataset-fashion-mnist installs them)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_UBYTE_MAGIC = {1: 0x00000801, 3: 0x00000803}  # idx format: 0x0000, type 0x08 (ubyte), number of dims


def read_idx_ubyte(path, ndim):
    """The uint8 array of an idx file (gzipped or not) with `ndim` dimensions (LeCun's MNIST format:
    big-endian magic 0x0000 08 <ndim>, then ndim big-endian uint32 sizes, then the bytes)."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read as {'gzip' if path.endswith('.gz') else 'a file'} ({e})")
    header_bytes = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != IDX_UBYTE_MAGIC[ndim]:
        found = "a too short file" if magic is None else f"magic 0x{magic:08x}"
        raise UserError(f"{path}: expected an idx ubyte file with {ndim} dimensions (magic "
                        f"0x{IDX_UBYTE_MAGIC[ndim]:08x}), found {found}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_bytes + int(np.prod(shape)):
        raise UserError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes of data), "
                        f"the file holds {len(raw) - header_bytes}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def fashion_mnist_arrays(data_dir, split):
    """(images (N, 28, 28) uint8, labels (N,) int64) of Fashion-MNIST train | test."""
    if split not in FASHION_MNIST_FILES:
        raise UserError(f"fashion_mnist split must be train or test, got '{split}'")
    _require_dir(data_dir, " and ".join(FASHION_MNIST_FILES[split]))
    paths = [os.path.join(data_dir, name) for name in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"missing Fashion-MNIST files: {', '.join(missing)} (Debian: apt-get install "
                        "dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")
    images, labels = read_idx_ubyte(paths[0], 3), read_idx_ubyte(paths[1], 1).astype(np.int64)
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise UserError(f"{paths[0]} holds images of shape {images.shape}, {paths[1]} {len(labels)} labels: "
                        "expected (N, 28, 28) and N")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{paths[1]}: labels must be in 0..9, found {labels.max()}")
    return images, labels
