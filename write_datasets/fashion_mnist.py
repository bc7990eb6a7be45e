"""Write Fashion-MNIST (official gzipped idx files) to a .beton: the project's small real-image set.

  python write_datasets/fashion_mnist.py --cfg.data_dir=/usr/share/datasets/fashion-mnist \\
      --cfg.split=train --cfg.per_class=300 --cfg.image_size=64 --cfg.write_path=betons/fmnist_train.beton

cfg.data_dir holds {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (Debian: apt-get install
dataset-fashion-mnist). Splits: train (60,000 images), test (10,000). Labels 0..9 (T-shirt/top ...
Ankle boot). --cfg.per_class=K keeps the first K images of each class in file order (0 = all), after
skipping the first --cfg.skip_per_class=J of each class (default 0): J=300 with K=300 gives 3,000 train
images disjoint from the default 3,000, a held-back set for checking a recipe chosen on the first;
--cfg.image_size=S enlarges the 28x28 grey images to SxS with bicubic interpolation (0 = native 28),
stored as RGB with the grey value in all three channels.
Beside the beton: <name>.json (manifest) and <name>.beton.params.json (this config).
"""
import numpy as np
from PIL import Image

from hjepa.errors import UserError, exit_on_user_error
from hjepa.sources import FASHION_MNIST_CLASSES, fashion_mnist_arrays
from hjepa.writers import write_split, writer_config


def per_class_window(labels, per_class, skip=0):
    """Indices of the first `per_class` samples of every class in file order after the first `skip` of
    it, class-sorted (per_class 0 = every sample after the skipped ones)."""
    order = np.argsort(labels, kind="stable")  # (N,) class-sorted, file order within a class
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])  # position within its class
    keep = rank >= skip
    if per_class:
        keep &= rank < skip + per_class
    return order[keep]


def to_rgb(image, size):
    """(28, 28) grey uint8 -> (size, size, 3) uint8, bicubic when size != 28."""
    if size and size != image.shape[0]:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return np.repeat(image[:, :, None], 3, axis=2)


@exit_on_user_error
def main(argv=None):
    cfg = writer_config(__doc__, argv)
    images, labels = fashion_mnist_arrays(cfg["cfg.data_dir"], cfg["cfg.split"])
    keep = per_class_window(labels, cfg["cfg.per_class"], cfg["cfg.skip_per_class"])
    if len(keep) == 0:
        raise UserError(f"no {cfg['cfg.split']} images left after skipping the first {cfg['cfg.skip_per_class']} "
                        "of each class")
    samples = [(to_rgb(images[i], cfg["cfg.image_size"]), int(labels[i])) for i in keep]
    return write_split(cfg, samples, dataset="fashion_mnist", class_names=FASHION_MNIST_CLASSES)


if __name__ == "__main__":
    main()
